"""Per-parameter values of a method's numeric parameters: layer gradients and name filters.

A scalar method parameter (``density``, ``t``, ``scaling``, ...) may be given, as in mergekit's
YAML, as

- a scalar: the same value for every parameter key;
- a *gradient*, a list of scalars ``[v_0, .., v_{n-1}]``: interpolated linearly over the layer
  depth ``t = layer / (n_layers - 1)`` of the key (``t = 0`` for keys outside the numbered blocks,
  such as embeddings, final norms and ``lm_head``, as mergekit's pre/post weights); strings and
  booleans are not interpolated but picked at index ``int(t * (n - 1))``;
- a list of *conditions* ``[{filter: self_attn, value: 0.5}, {value: 0.2}]``: the first whose
  ``filter`` is a substring of the key (or that has no filter, or ``*``) gives the value, which
  may itself be a gradient; a key that no condition matches takes the parameter's default.

:func:`parse_setting` validates a raw YAML value (every endpoint goes through the parameter's own
check), :func:`evaluate` gives the value at one key.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from starmerge.errors import short_repr

#: A numbered transformer block in a parameter key: ``layers.3.``, ``h.0.``, ``block.11.``.
LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|block|blocks)\.(\d+)\.")
Scalar = bool | int | float | str


@dataclass(frozen=True)
class Condition:
    """One entry of a conditional setting: ``value`` where ``filter`` is in the key."""

    value: Scalar | tuple[Scalar, ...]
    filter: str | None = None

    def matches(self, key: str) -> bool:
        """No filter, ``*``, or a substring of ``key``."""
        return self.filter is None or self.filter == "*" or self.filter in key


@dataclass(frozen=True)
class PerKey:
    """A parameter's value that varies over parameter keys (a gradient and/or conditions).

    Args:
        setting: A gradient (tuple of scalars) or a tuple of :class:`Condition`.
        default: The value where no condition matches.
    """

    setting: tuple[Scalar, ...] | tuple[Condition, ...]
    default: Any

    def at(self, key: str, t: float) -> Any:
        """The value at ``key`` whose layer depth is ``t`` in [0, 1]."""
        return evaluate(self.setting, key, t, self.default)

    def describe(self) -> Any:
        """A JSON-able form for manifests."""
        if self.setting and isinstance(self.setting[0], Condition):
            return [
                {"value": list(c.value) if isinstance(c.value, tuple) else c.value}
                | ({"filter": c.filter} if c.filter is not None else {})
                for c in self.setting  # type: ignore[union-attr]
            ]
        return list(self.setting)


def is_per_key(raw: Any) -> bool:
    """Whether a raw value for a *scalar* parameter is a gradient or a list of conditions."""
    return isinstance(raw, (list, tuple)) or (isinstance(raw, Mapping) and "value" in raw)


def parse_setting(
    name: str, raw: Any, default: Any, check: Callable[[Any], str | None]
) -> tuple[PerKey | None, list[str]]:
    """Validate a gradient / conditional value of scalar parameter ``name``.

    Args:
        name: The parameter (for messages).
        raw: The YAML value: a list of scalars, a ``{value, filter}`` mapping or a list of them.
        default: The parameter's default (where no condition matches).
        check: Validates one scalar endpoint; returns an error message or None.

    Returns:
        The :class:`PerKey` (None when invalid) and the problems found (every one).

    Example:
        >>> parse_setting("t", [0.0, 1.0], 0.5, lambda v: None)[0].at("layers.1.x", 0.5)
        0.5
    """
    items = [raw] if isinstance(raw, Mapping) else list(raw)
    problems: list[str] = []
    if not items:
        return None, [f"{name}: an empty list is not a value; give a number or a gradient"]
    if all(isinstance(i, Mapping) for i in items):
        conds = []
        for i, item in enumerate(items):
            unknown = sorted(set(item) - {"value", "filter"})
            if unknown or "value" not in item:
                problems.append(
                    f"{name}: condition {i} must be {{filter: NAME-PART, value: V}}, got "
                    f"{short_repr(dict(item))}"
                )
                continue
            filt = item.get("filter")
            if filt is not None and not isinstance(filt, str):
                problems.append(
                    f"{name}: condition {i} filter must be text, got {short_repr(filt)}"
                )
            value = item["value"]
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            problems += _check_scalars(f"{name} (condition {i})", values, check)
            conds.append(
                Condition(tuple(values) if isinstance(value, (list, tuple)) else value, filt)
            )
        return (None if problems else PerKey(tuple(conds), default)), problems
    if any(isinstance(i, (Mapping, list, tuple)) for i in items):
        return None, [
            f"{name}: a list must be all numbers (a gradient over the layers) or all "
            f"{{filter, value}} conditions, got {short_repr(raw)}"
        ]
    problems += _check_scalars(f"{name} (gradient)", items, check)
    return (None if problems else PerKey(tuple(items), default)), problems


def _check_scalars(where: str, values: list[Any], check: Callable[[Any], str | None]) -> list[str]:
    out = []
    for i, v in enumerate(values):
        problem = check(v)
        if problem:
            out.append(f"{where} entry {i}: {problem}")
    return out


def evaluate(setting: tuple, key: str, t: float, default: Any) -> Any:
    """The value of a gradient or conditional ``setting`` at ``key`` (layer depth ``t``).

    Example:
        >>> evaluate((0.0, 1.0, 0.0), "x", 0.25, None)
        0.5
        >>> evaluate((Condition(1.0, "mlp"), Condition(2.0)), "layers.0.mlp.up", 0.0, None)
        1.0
    """
    if setting and isinstance(setting[0], Condition):
        for cond in setting:
            if cond.matches(key):
                value = cond.value
                return evaluate(value, key, t, default) if isinstance(value, tuple) else value
        return default
    values = list(setting)
    if len(values) == 1:
        return values[0]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if not numeric:
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = min(int(scaled), len(values) - 1)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def layer_index(key: str) -> int | None:
    """The block number in ``key`` (``model.layers.7.mlp.up_proj.weight`` -> 7), or None."""
    found = LAYER.search(key)
    return int(found.group(1)) if found else None


def count_layers(keys: Iterable[str]) -> int:
    """Number of blocks: the largest block number among ``keys`` plus one (0 without any)."""
    found = [i for i in (layer_index(k) for k in keys) if i is not None]
    return max(found) + 1 if found else 0


def layer_depth(key: str, n_layers: int) -> float:
    """``t`` of ``key``: ``layer / (n_layers - 1)``; 1.0 with one block; 0.0 outside blocks."""
    index = layer_index(key)
    if index is None:
        return 0.0
    return index / (n_layers - 1) if n_layers > 1 else 1.0
