"""One safe YAML loader for every file a user writes (merge configs, sweeps, suites, tasks).

On top of ``yaml.SafeLoader`` it refuses, each with one message that names the file, what was
found and the fix:

- bytes that are not UTF-8 (the byte offset is named);
- nesting deeper than :data:`MAX_DEPTH` levels, checked while composing, before Python's
  recursion limit can be reached;
- documents whose anchors and aliases expand to more than :data:`MAX_NODES` values (a
  "billion laughs" bomb is refused in milliseconds, before anything walks the expanded value)
  and recursive aliases;
- duplicate keys in a mapping (both line numbers), where plain YAML keeps the last silently;
- tags outside plain YAML data (``!!python/object``...), which are never constructed.

Command-line ``key=value`` overrides parse their values with :func:`parse_yaml`, so they obey
the same rules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode

from starmerge.errors import ConfigError, short_repr

MAX_DEPTH = 100  # nesting levels, after alias expansion
MAX_NODES = 100_000  # values (scalars, lists, mappings), after alias expansion

_STD = "tag:yaml.org,2002:"
_MERGE = _STD + "merge"  # the `<<: *base` merge key
_TAGS = frozenset(tag for tag in yaml.SafeLoader.yaml_constructors if tag) | {_MERGE}


class _Loader(yaml.SafeLoader):
    """``SafeLoader`` that stops composing past :data:`MAX_DEPTH` nested nodes."""

    def __init__(self, text: str, label: str):
        super().__init__(text)
        self.label = label
        self.depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        """Compose one node, refusing a nesting level beyond ``MAX_DEPTH``."""
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise ConfigError([_too_deep(self.label, self.peek_event().start_mark.line)])
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def load_yaml(path: str | Path, what: str = "config file") -> Any:
    """Read a user-written YAML file safely (see the module docstring for what is refused).

    Args:
        path: The file.
        what: What the file is, for messages (``"config file"``, ``"sweep file"``...).

    Returns:
        The parsed document (``None`` for an empty file).

    Raises:
        ConfigError: The file is missing, unreadable, not UTF-8, or not acceptable YAML.

    Example:
        >>> load_yaml("configs/star_two_adapters.yaml")["method"]  # doctest: +SKIP
        'star'
    """
    path = Path(path)
    label = f"{what} {path}"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{label} does not exist; check the path"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{label} is a directory; give a YAML file"]) from None
    except OSError as exc:
        raise ConfigError(
            [f"cannot read {label} ({exc.strerror}); check the path and its permissions"]
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [
                f"{label} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                f"{exc.start}); save it as UTF-8"
            ]
        ) from None
    return parse_yaml(text, label)


def parse_yaml(text: str, label: str) -> Any:
    """Parse YAML text with the checks of :func:`load_yaml`.

    Args:
        text: The YAML document.
        label: Where it comes from, for messages (``"config file c.yaml"``, ``"override
            'parameters.eta=[1'"``).

    Returns:
        The parsed document (``None`` when empty).

    Raises:
        ConfigError: The text is not acceptable YAML.

    Example:
        >>> parse_yaml("[1, 2]", "override 'x=[1, 2]'")
        [1, 2]
    """
    try:
        loader = _Loader(text, label)
    except yaml.reader.ReaderError as exc:
        raise ConfigError(
            [
                f"{label} holds the control character #x{exc.character:04x} at offset "
                f"{exc.position}, which YAML does not allow; remove it"
            ]
        ) from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _Checker(loader).visit(node, 1)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError([_syntax(label, exc)]) from None
    except yaml.YAMLError as exc:  # unmarked errors; none known beyond the ReaderError above
        raise ConfigError([f"{label} is not valid YAML ({_one_line(exc)}); fix it"]) from None
    except RecursionError:  # last resort: compose_node bounds the depth first
        raise ConfigError([_too_deep(label, None)]) from None
    finally:
        loader.dispose()


class _Checker:
    """Walks a composed node graph once (aliases shared), before anything is constructed."""

    def __init__(self, loader: _Loader):
        self.loader = loader
        self.label = loader.label
        self.done: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, height)
        self.active: set[int] = set()  # nodes on the current path: meeting one is a cycle

    def visit(self, node: Node, level: int) -> tuple[int, int]:
        """Return ``node``'s expanded (size, height), refusing what the module bounds."""
        key = id(node)
        if key in self.active:
            raise ConfigError(
                [
                    f"{self.label} has a recursive alias at line {_line(node)} (a value that "
                    "contains itself); write the value out instead"
                ]
            )
        if key not in self.done:
            self.done[key] = self._measure(node, level)
        size, height = self.done[key]
        if level + height - 1 > MAX_DEPTH:
            raise ConfigError([_too_deep(self.label, _line(node) - 1)])
        return size, height

    def _measure(self, node: Node, level: int) -> tuple[int, int]:
        if node.tag not in _TAGS:
            tag = node.tag.replace(_STD, "!!")
            raise ConfigError(
                [
                    f"{self.label} uses the tag {short_repr(tag)} at line {_line(node)}, which "
                    "starmerge does not load; remove it (only plain YAML data is read)"
                ]
            )
        if isinstance(node, ScalarNode):
            return 1, 1
        self.active.add(id(node))
        children = node.value
        if isinstance(node, MappingNode):
            children = [part for pair in node.value for part in pair]
        size, height = 1, 1
        for child in children:
            child_size, child_height = self.visit(child, level + 1)
            size, height = size + child_size, max(height, child_height + 1)
            if size > MAX_NODES:
                raise ConfigError(
                    [
                        f"{self.label} expands to more than {MAX_NODES} values through its "
                        "anchors (&) and aliases (*); write the values out or reuse fewer"
                    ]
                )
        if isinstance(node, MappingNode):
            self._duplicates(node)
        self.active.discard(id(node))
        return size, height

    def _duplicates(self, node: MappingNode) -> None:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE:
                continue
            key = self.loader.construct_object(key_node)
            if key in seen:
                raise ConfigError(
                    [
                        f"duplicate key {short_repr(key)} at lines {seen[key]} and "
                        f"{_line(key_node)} of {self.label}; keep one"
                    ]
                )
            seen[key] = _line(key_node)


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _too_deep(label: str, line: int | None) -> str:
    where = f" (at line {line + 1})" if line is not None else ""
    return (
        f"{label} nests values deeper than {MAX_DEPTH} levels{where}; a config this deep is "
        "a mistake, flatten it"
    )


def _syntax(label: str, exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    line = f" at line {mark.line + 1}" if mark else ""
    problem = f" ({_one_line(exc.problem)})" if exc.problem else ""
    return f"{label} is not valid YAML{line}{problem}; fix the syntax"


def _one_line(value: object, limit: int = 200) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
