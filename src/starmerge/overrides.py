"""``key.path=value`` overrides of a config mapping, as given on the command line.

``starmerge merge c.yaml OUT parameters.eta=20 models.0.weight=0.5``: each value is parsed as
YAML by :func:`starmerge.yaml_io.parse_yaml` (so it obeys the rules of config files), mappings
are entered by key and lists by index, and every malformed override is refused with one
message that shows the form to write.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from starmerge.errors import ConfigError, short_repr
from starmerge.yaml_io import parse_yaml


def apply_overrides(raw: Any, overrides: Sequence[str]) -> Any:
    """Return ``raw`` with each ``a.b=value`` override set (``method.x`` means ``parameters.x``).

    Values are parsed by :func:`starmerge.yaml_io.parse_yaml`; a list is entered by index
    (``models.0.weight=0.5``). ``raw`` itself is not changed.

    Raises:
        ConfigError: An override is not ``key=value``, its value is not acceptable YAML, or its
            key does not fit the config (a name into a list, a key into a number...).

    Example:
        >>> apply_overrides({"models": [{"adapter": "a"}]}, ["models.0.weight=0.5"])
        {'models': [{'adapter': 'a', 'weight': 0.5}]}
    """
    if not isinstance(raw, dict):
        return raw
    raw = {**raw}
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.split(".")
        if not sep or not all(parts):
            raise ConfigError(
                [f"override {short_repr(item)} is not key=value; write e.g. parameters.eta=20"]
            )
        if parts[0] == "method" and len(parts) > 1:
            parts[0] = "parameters"
        _set(raw, parts, parse_yaml(value, f"the value of override {short_repr(item)}"), item)
    return raw


def _set(root: dict, parts: list[str], value: Any, item: str) -> None:
    """Set ``root[parts[0]][parts[1]]... = value``, copying each container on the way."""
    node: dict | list = root
    for depth, part in enumerate(parts[:-1]):
        slot = _slot(node, part, parts[:depth], item)
        child = node[slot] if isinstance(node, list) else node.get(slot)  # type: ignore[index]
        if child is None:
            child = {}
        elif not isinstance(child, (dict, list)):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(
                [
                    f"override {short_repr(item)}: {where} is {short_repr(child)}, not a mapping, "
                    f"so it has no key {short_repr(parts[depth + 1])}; write {where}=VALUE"
                ]
            )
        child = list(child) if isinstance(child, list) else dict(child)
        node[slot] = child  # type: ignore[index]
        node = child
    node[_slot(node, parts[-1], parts[:-1], item)] = value  # type: ignore[index]


def _slot(node: dict | list, part: str, path: list[str], item: str) -> str | int:
    """The key ``part`` names in ``node``: itself in a mapping, an index in a list."""
    if isinstance(node, dict):
        return part
    if part.isdigit() and int(part) < len(node):
        return int(part)
    where = ".".join(path)
    example = f"{where}.0.weight=0.5" if where == "models" else f"{where}.0=VALUE"
    raise ConfigError(
        [
            f"override {short_repr(item)}: {where} is a list of {len(node)}, so the key after "
            f"it must be an index below {len(node)}, got {short_repr(part)}; write e.g. {example}"
        ]
    )
