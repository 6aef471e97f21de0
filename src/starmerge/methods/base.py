"""What a merge method is: a registered, typed, pure function of one parameter's deltas.

A method is ``fn(deltas, **params) -> Merged``: the deltas of every task for one parameter go in
(in task order, a task that lacks the parameter given as a zero delta), the merged delta and
per-parameter statistics come out. Methods that need whole-model statistics (TIES's global
threshold, MetaGPT's lambdas, masks) declare a ``fit`` factory: the pipeline streams every
parameter through the fitter first, then passes ``state=fitter.state().at(key)`` to ``fn``.

Everything else a method needs is declared on its :class:`Method` entry, as data: the
parameters of its data step (``data_params``) and the data they ask for (``data``), whether it
needs the base model's tensor (``needs_base``), whether it is a mean or sum of a per-task
transform (``separable``) and the merge spaces it accepts (``spaces``); see
:mod:`starmerge.methods.contract` and ``docs/architecture.md``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from starmerge.errors import ConfigError, did_you_mean, short_repr
from starmerge.methods.contract import (
    FULL_SPACE,
    STATISTICS,
    DataRequest,
    Fitter,
    Merged,
    Separable,
)
from starmerge.registry import Registry

Accepts = frozenset[Literal["dense", "lowrank"]]
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


@dataclass(frozen=True)
class Method:
    """A registered merge method.

    Args:
        name: Registry name (lowercase snake, recognizable from the paper).
        fn: ``fn(deltas, **params) -> Merged`` with its kernel ``params``, plus ``state=`` when
            ``fit`` is set and ``base=`` when ``needs_base``.
        params: The kernel's hyperparameters with defaults and checks.
        accepts: Delta kinds ``fn`` takes; others are densified by the pipeline.
        fit: ``fit(n_tasks, **params) -> Fitter`` for whole-model statistics, or None; it gets
            every resolved parameter but ``statistics``, and with a ``data`` step also
            ``statistics=`` (one opened ``StatsFile`` per task, or None).
        lowrank_output: True when low-rank inputs give an exactly low-rank result.
        paper: The paper's URL.
        summary: One line for ``starmerge methods``.
        artifacts: ``{name: (shape_fn, dtype)}``: the per-parameter artifact tensors ``fn``
            returns, ``shape_fn(param_shape, n_tasks) -> shape``, so the writer can plan them.
        data_params: The data step's parameters (statistics kinds, Fisher labels, mask
            training), validated with ``params`` but never passed to ``fn``.
        data: ``data(params) -> DataRequest | None``: what the method needs from task data with
            these (resolved) parameters; None (the field): a data-free method.
        needs_base: ``fn`` (and the fitter's ``observe``) get ``base=``, the base model's
            tensor of the parameter.
        separable: The merge as a mean or sum of a per-task transform, or None.
        spaces: The merge spaces the method accepts (only ``full`` exists).
    """

    name: str
    fn: Callable[..., Merged]
    params: Mapping[str, Param]
    accepts: Accepts
    fit: Callable[..., Fitter] | None = None
    lowrank_output: bool = False
    paper: str = ""
    summary: str = ""
    artifacts: Mapping[str, tuple[Callable[[tuple[int, ...], int], tuple[int, ...]], Any]] = field(
        default_factory=dict
    )
    data_params: Mapping[str, Param] = field(default_factory=dict)
    data: Callable[[Mapping[str, Any]], DataRequest | None] | None = None
    needs_base: bool = False
    separable: Separable | None = None
    spaces: frozenset[str] = FULL_SPACE

    @property
    def all_params(self) -> dict[str, Param]:
        """Kernel and data-step parameters (a config writes both under ``parameters:``)."""
        return {**self.params, **self.data_params}

    def resolve(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Validate ``given`` hyperparameters (kernel and data step) and fill defaults.

        Raises:
            ConfigError: Listing every unknown or invalid parameter.
        """
        problems = []
        declared = self.all_params
        for key in given:
            if key not in declared:
                known = ", ".join(declared) or "none"
                problems.append(
                    f"{self.name}: unknown parameter {short_repr(key)}."
                    f"{did_you_mean(str(key), declared)} "
                    f"Parameters: {known}"
                )
        values = {k: given.get(k, p.default) for k, p in declared.items()}
        for key, value in values.items():
            problem = _check(self.name, key, value, declared[key])
            if problem:
                problems.append(problem)
        if problems:
            raise ConfigError(problems)
        return values

    def kernel_args(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The resolved ``params`` that ``fn`` takes (no data-step parameters)."""
        return {k: params[k] for k in self.params if k in params}

    def fitter(
        self, n_tasks: int, params: Mapping[str, Any], statistics: Sequence[Any] | None = None
    ) -> Fitter | None:
        """The fit step for resolved ``params`` (None without one).

        Args:
            n_tasks: Number of tasks T.
            params: Resolved parameters (kernel and data step).
            statistics: One opened statistics file per task, or None; given to methods with a
                data step only.
        """
        if self.fit is None:
            return None
        args = {k: v for k, v in params.items() if k != STATISTICS}
        if self.data is not None:
            args[STATISTICS] = statistics
        return self.fit(n_tasks, **args)


def _check(method: str, key: str, value: Any, param: Param) -> str | None:
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


METHODS: Registry[Method] = Registry("method")


def register_method(
    name: str,
    *,
    params: Mapping[str, Param] | None = None,
    accepts: Sequence[str] = ("dense",),
    fit: Callable[..., Fitter] | None = None,
    lowrank_output: bool = False,
    paper: str = "",
    artifacts: Mapping[str, tuple[Callable[[tuple[int, ...], int], tuple[int, ...]], Any]]
    | None = None,
    data_params: Mapping[str, Param] | None = None,
    data: Callable[[Mapping[str, Any]], DataRequest | None] | None = None,
    needs_base: bool = False,
    separable: Separable | None = None,
    spaces: Sequence[str] = tuple(FULL_SPACE),
) -> Callable[[Callable[..., Merged]], Callable[..., Merged]]:
    """Register ``fn`` as merge method ``name`` (the arguments are :class:`Method`'s fields).

    Example:
        >>> @register_method("my_avg", accepts=("dense",))
        ... def my_avg(deltas): ...
    """

    def wrap(fn: Callable[..., Merged]) -> Callable[..., Merged]:
        doc = inspect.getdoc(fn) or ""
        METHODS.add(
            name,
            Method(
                name=name,
                fn=fn,
                params=dict(params or {}),
                accepts=frozenset(accepts),  # type: ignore[arg-type]
                fit=fit,
                lowrank_output=lowrank_output,
                paper=paper,
                summary=doc.splitlines()[0] if doc else "",
                artifacts=dict(artifacts or {}),
                data_params=dict(data_params or {}),
                data=data,
                needs_base=needs_base,
                separable=separable,
                spaces=frozenset(spaces),
            ),
        )
        return fn

    return wrap


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
