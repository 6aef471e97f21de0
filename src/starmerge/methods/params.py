"""A method's hyperparameters: ``Param`` and the checks every value goes through.

Every number, and every number in a list, must be finite; then its type, choices and the
parameter's own ``check`` (``in_range``, ``optional``, ``factor_range``) apply. Numeric
parameters may also vary per parameter key (:mod:`starmerge.settings`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

from starmerge.errors import ConfigError, did_you_mean, short_repr

# The largest |factor| a multiplying hyperparameter (scaling, alpha, per-model weights) may take:
# far beyond any useful merge, and it keeps 1e308 (whose product overflows) out.
MAX_FACTOR = 1e3


@dataclass(frozen=True)
class Param:
    """One hyperparameter of a method.

    Args:
        default: The default value (its type is the parameter's type).
        check: Returns an error fragment such as ``"must be in (0, 100]"`` or None when valid.
        help: One line for ``starmerge methods``.
        choices: The allowed values for string parameters.
    """

    default: Any
    help: str
    check: Callable[[Any], str | None] | None = None
    choices: tuple[str, ...] | None = None


def takes_per_key(param: Param) -> bool:
    """Numeric parameters may vary per key (a list-valued parameter's list is its value)."""
    return _is_number(param.default)


def as_param_type(value: Any, default: Any) -> Any:
    """An interpolated value cast back to an int parameter's type (rounded)."""
    if isinstance(default, int) and isinstance(value, float):
        return int(round(value))
    return value


def check_value(method: str, key: str, value: Any, param: Param) -> str | None:
    """Type, finiteness and range check of one hyperparameter value; an error message or None.

    Every number, and every number in a list, must be finite (NaN and +-inf are refused here for
    all methods), before the parameter's own ``check`` sees it.
    """
    want = type(param.default)
    if param.default is None:
        ok_type = True
    elif want is float:
        ok_type = _is_number(value)
    elif want is int:
        ok_type = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok_type = isinstance(value, want)
    if not ok_type:
        return (
            f"{method}: {key} must be {_article(want.__name__)} {want.__name__}, got "
            f"{short_repr(value)} ({type(value).__name__}); fix the value in `parameters:`"
        )
    bad = _non_finite(value)
    if bad is not None:
        return f"{method}: {key} {bad}, got {short_repr(value)}; fix the value in `parameters:`"
    if param.choices is not None and value not in param.choices:
        return (
            f"{method}: {key} must be one of {', '.join(param.choices)}, got {short_repr(value)}."
            f"{did_you_mean(str(value), param.choices)}"
        )
    fragment = param.check(value) if param.check else None
    return f"{method}: {key} {fragment}, got {short_repr(value)}" if fragment else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _non_finite(value: Any) -> str | None:
    """What is wrong with a non-finite number or a list holding one (NaN, +-inf); else None."""
    if isinstance(value, float):  # an int is always finite (and may exceed a float's range)
        return None if math.isfinite(value) else "must be a finite number"
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if isinstance(item, float) and not math.isfinite(item):
                return f"must hold finite numbers (entry {i} is {item})"
    return None


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def in_range(lo: float, hi: float, *, lo_open: bool = True, hi_open: bool = False):
    """A ``Param.check`` for an interval, e.g. ``in_range(0, 100)`` for (0, 100]."""

    def check(value: float) -> str | None:
        if not _is_number(value):
            return "must be a number"
        low_ok = value > lo if lo_open else value >= lo
        high_ok = value < hi if hi_open else value <= hi
        if low_ok and high_ok:
            return None
        return f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    return check


def optional(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    """A ``Param.check`` that also accepts None (null), e.g. ``optional(in_range(0, 1))``."""

    def check_optional(value: Any) -> str | None:
        fragment = None if value is None else check(value)
        return f"{fragment} or null" if fragment else None

    return check_optional


def factor_range() -> Callable[[float], str | None]:
    """A ``Param.check`` for a multiplying factor (scaling, alpha): in [-MAX_FACTOR, MAX_FACTOR]."""
    return in_range(-MAX_FACTOR, MAX_FACTOR, lo_open=False)


def check_weights(value: Any) -> str | None:
    """A ``Param.check``: None or a list of numbers in ``[-MAX_FACTOR, MAX_FACTOR]``."""
    if value is None:
        return None
    ok = isinstance(value, (list, tuple)) and all(
        isinstance(w, Real) and not isinstance(w, bool) for w in value
    )
    if not ok:
        return "must be a list of numbers, one per model (or unset)"
    big = next((i for i, w in enumerate(value) if abs(w) > MAX_FACTOR), None)
    if big is not None:
        return f"must hold numbers in [-{MAX_FACTOR:g}, {MAX_FACTOR:g}] (entry {big} is not)"
    return None


def task_weights(weights: Sequence[float] | None, n_tasks: int, method: str) -> list[float]:
    """Per-task weights: ``weights`` checked against ``n_tasks``, or all 1.0 when None.

    Raises:
        ConfigError: ``weights`` does not have one entry per task.
    """
    if weights is None:
        return [1.0] * n_tasks
    if len(weights) != n_tasks:
        raise ConfigError(
            [
                f"{method}: weights has {len(weights)} entries but there are {n_tasks} models; "
                "give one weight per model (models[].weight) or leave weights unset"
            ]
        )
    return [float(w) for w in weights]
