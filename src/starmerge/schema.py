"""One way to validate a config section: a dataclass walked by :func:`parse_section`.

Every YAML section (the merge config's ``models[i]``, ``output:`` and ``data:``, sweep files,
suite files, task files) is a dataclass whose fields are the section's keys: a field's annotation
is its type, its default makes the key optional (no default: required), and :func:`option`
adds to ``dataclasses.field(metadata=...)`` a ``check``, ``choices``, the words for the expected
type (``expect``) and the ``fix``. :func:`parse_section` walks one mapping against the class and
appends one line per problem to the caller's list, so a file reports every problem at once:

* unknown keys, with a did-you-mean and the allowed keys;
* wrong types, with what was received (:func:`~starmerge.errors.short_repr`) and the fix;
* choices with a did-you-mean, checks (``check(value) -> "must be ..." | None``), non-finite
  numbers; nested sections (a field typed as a dataclass) with dotted paths (``data.seed``).

Why not pydantic with ``extra="forbid"``: it is not a dependency (the core is torch, safetensors,
numpy and pyyaml), and its messages (``Extra inputs are not permitted [type=extra_forbidden...``)
would be rewritten to our one-line style anyway; the frozen dataclasses that mirror the YAML
exist already, and walking them takes the hundred lines below.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Out:
    ...     format: Literal["model", "adapter"] = "model"
    >>> problems = []
    >>> parse_section(Out, {"formt": "x"}, "output", problems)
    Out(format='model')
    >>> problems
    ['unknown key output.formt. Did you mean: format? Allowed: format']
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Collection, Mapping
from dataclasses import MISSING, field, fields, is_dataclass
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from starmerge.errors import StarmergeError, did_you_mean, short_repr

_BAD = object()  # a value that failed its checks
_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def option(
    default: Any = MISSING,
    *,
    factory: Callable[[], Any] | Any = MISSING,
    check: Callable[[Any], str | None] | None = None,
    choices: Collection[Any] | Callable[[], Collection[Any]] | None = None,
    expect: str | None = None,
    fix: str | None = None,
) -> Any:
    """A dataclass field carrying its validation (no ``default``/``factory``: a required key).

    Args:
        default: The value when the key is absent.
        factory: Builds the value when the key is absent (mutable defaults).
        check: ``check(value)`` returns ``"must be ..."`` or None; it may raise
            :class:`~starmerge.errors.StarmergeError` (its message follows ``key:``).
        choices: The allowed values, or a function returning them (a registry's names).
        expect: The expected type in words (``"a path or hub id"``), instead of the type's.
        fix: What to write instead, appended after ``;``.
    """
    meta = {"check": check, "choices": choices, "expect": expect, "fix": fix}
    meta = {k: v for k, v in meta.items() if v is not None}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def at_least(low: int) -> Callable[[int], str | None]:
    """A ``check`` for an integer count: ``at_least(1)`` refuses 0 with ``must be >= 1``."""
    return lambda value: None if value >= low else f"must be an integer >= {low}"


def count(default: int, low: int) -> Any:
    """An integer field of at least ``low`` (``n_examples`` of at least 1 and so on)."""
    return option(default, check=at_least(low), expect=f"an integer >= {low}")


def section_keys(cls: type) -> list[str]:
    """The keys a section of ``cls`` allows, in declaration order."""
    return [f.name for f in fields(cls)]


def unknown_keys(raw: Mapping[Any, Any], allowed: Collection[str], where: str) -> list[str]:
    """One message per key of ``raw`` that is not in ``allowed`` (did-you-mean, allowed list)."""
    return [
        f"unknown key {key_path(where, key)}.{did_you_mean(str(key), allowed)} "
        f"Allowed: {', '.join(allowed)}"
        for key in raw
        if key not in allowed
    ]


def key_path(where: str, key: Any) -> str:
    """``where.key`` (``key`` as ``short_repr`` unless it is a short identifier)."""
    name = key if isinstance(key, str) and key.isidentifier() and len(key) <= 40 else None
    name = name or short_repr(key, limit=40)
    return f"{where}.{name}" if where else name


def parse_section(cls: type, raw: Any, where: str, problems: list[str]) -> Any:
    """Validate the mapping ``raw`` against the dataclass ``cls``, appending every problem.

    Args:
        cls: A dataclass whose fields are the section's keys.
        raw: The section as parsed YAML.
        where: The section's dotted path for messages (``""`` at a file's top level).
        problems: Collects one line per problem.

    Returns:
        A ``cls`` built from ``raw`` (unknown keys reported and ignored), or None when ``raw``
        is not a mapping or a key is missing or invalid.
    """
    names = section_keys(cls)
    if not isinstance(raw, Mapping):
        what = where or "the file"
        problems.append(
            f"{what} must be a mapping with keys {', '.join(names)}, got {short_repr(raw)}"
        )
        return None
    problems.extend(unknown_keys(raw, names, where))
    hints, values, ok = get_type_hints(cls), {}, True
    for f in fields(cls):
        path = key_path(where, f.name)
        if f.name not in raw:
            if f.default is MISSING and f.default_factory is MISSING:
                problems.append(f"missing required key {path}{_fix(f.metadata)}")
                ok = False
            continue
        value = _value(hints[f.name], raw[f.name], path, f.metadata, problems)
        if value is _BAD:
            ok = False
        else:
            values[f.name] = value
    return cls(**values) if ok else None


def _value(tp: Any, value: Any, path: str, meta: Mapping[str, Any], problems: list[str]) -> Any:
    """``value`` checked against the annotation ``tp`` and the field's metadata, or ``_BAD``."""
    options = list(get_args(tp)) if get_origin(tp) in (Union, types.UnionType) else [tp]
    nullable = type(None) in options
    options = [o for o in options if o is not type(None)]
    if value is None and nullable:
        return None
    if len(options) == 1 and is_dataclass(options[0]):
        parsed = parse_section(options[0], value, path, problems)
        return _BAD if parsed is None else parsed
    converted = next((c for c in (_convert(o, value) for o in options) if c is not _BAD), _BAD)
    if converted is _BAD:
        expect = meta.get("expect") or " or ".join(_words(o) for o in options)
        null = " or null" if nullable and "null" not in expect else ""
        problems.append(f"{path} must be {expect}{null}, got {short_repr(value)}{_fix(meta)}")
        return _BAD
    if isinstance(converted, float) and not math.isfinite(converted):
        problems.append(f"{path} must be a finite number, got {short_repr(value)}{_fix(meta)}")
        return _BAD
    problem = _checked(converted, value, path, meta, _literal(options))
    if problem:
        problems.append(problem)
        return _BAD
    return converted


def _checked(value: Any, given: Any, path: str, meta: Mapping[str, Any], literal: Any) -> str:
    """The message of a failed ``choices`` or ``check``, or an empty string."""
    choices = meta.get("choices", literal)
    choices = choices() if callable(choices) else choices
    if choices is not None and value not in choices:
        names = [str(c) for c in choices]
        hint = did_you_mean(str(value), names)
        return f"{path} must be one of {', '.join(names)}, got {short_repr(given)}.{hint}"
    check = meta.get("check")
    try:
        fragment = check(value) if check is not None else None
    except StarmergeError as exc:
        return f"{path}: {exc}"
    return f"{path} {fragment}, got {short_repr(given)}{_fix(meta)}" if fragment else ""


def _convert(tp: Any, value: Any) -> Any:
    """``value`` as the annotation ``tp`` takes it (a list as a tuple, an int as a float)."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        return value if isinstance(value, (str, int)) and not isinstance(value, bool) else _BAD
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return _BAD
        items = [_convert(args[0], v) for v in value] if args else list(value)
        return _BAD if any(i is _BAD for i in items) else origin(items)
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        return dict(value) if isinstance(value, Mapping) else _BAD
    if tp in (int, float) and isinstance(value, bool):
        return _BAD
    if tp is float and isinstance(value, int):
        return float(value) if abs(value) < 2**1023 else math.inf  # past a float: not finite
    return value if isinstance(tp, type) and isinstance(value, tp) else _BAD


def _words(tp: Any) -> str:
    """The expected type in a message: ``an integer``, ``a list of strings``, ..."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (tuple, list):
        item = _words(args[0]) if args else "values"
        return f"a list of {item.removeprefix('a ').removeprefix('an ')}s"
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        return "a mapping"
    return _WORDS.get(tp, f"a {getattr(tp, '__name__', tp)}")


def _literal(options: list[Any]) -> tuple[Any, ...] | None:
    return get_args(options[0]) if len(options) == 1 and get_origin(options[0]) is Literal else None


def _fix(meta: Mapping[str, Any]) -> str:
    return f"; {meta['fix']}" if "fix" in meta else ""


__all__ = [
    "at_least",
    "count",
    "key_path",
    "option",
    "parse_section",
    "section_keys",
    "unknown_keys",
]
