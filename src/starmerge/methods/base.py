"""What a merge method is: a registered, typed, pure function of one parameter's deltas.

A method is ``fn(deltas, **params) -> Merged``: the deltas of every task for one parameter go in
(in task order, a task that lacks the parameter given as a zero delta), the merged delta and
per-parameter statistics come out. Methods that need whole-model statistics (TIES's global
threshold, MetaGPT's lambdas, masks) declare a ``fit`` factory: the pipeline streams every
parameter through the fitter first, then passes ``state=fitter.state().at(key)`` to ``fn``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from starmerge.errors import ConfigError, did_you_mean
from starmerge.registry import Registry
from starmerge.tensors.delta import Delta

Accepts = frozenset[Literal["dense", "lowrank"]]


@dataclass(frozen=True)
class Merged:
    """A method's result for one parameter.

    Args:
        delta: The merged delta (the pipeline adds the base).
        stats: Small JSON-able per-parameter statistics for the manifest
            (STAR: kept ranks per task; TIES: kept fraction).
        artifacts: Tensors saved next to the output in ``artifacts.safetensors`` under
            ``"<key>::<name>"`` (Localize-and-Stitch masks); shapes must be predictable from the
            parameter's shape and the number of tasks (see ``Method.artifacts``).
    """

    delta: Delta
    stats: Mapping[str, Any] = field(default_factory=dict)
    artifacts: Mapping[str, Any] = field(default_factory=dict)


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


class State(Protocol):
    """Whole-model statistics computed by a fitter; frozen and JSON-summarizable."""

    def at(self, key: str) -> Any:
        """The part of the state the method needs for parameter ``key``."""

    def summary(self) -> dict[str, Any]:
        """Statistics for the manifest (MetaGPT lambdas, TIES thresholds)."""


class Fitter(Protocol):
    """Streams over every parameter's deltas (possibly several passes) to build a ``State``.

    ``deltas`` holds ``None`` for a task that lacks the parameter: a fitter that counts entries
    per task (TIES's N) must not count it.
    """

    def observe(self, key: str, deltas: Sequence[Delta | None]) -> None:
        """See one parameter's deltas in the current pass."""

    def end_pass(self) -> bool:
        """Close the current pass; return True when another pass over the model is needed."""

    def state(self) -> State:
        """The finished statistics (only after ``end_pass`` returned False)."""


@dataclass(frozen=True)
class Method:
    """A registered merge method.

    Args:
        name: Registry name (lowercase snake, recognizable from the paper).
        fn: ``fn(deltas, **params) -> Merged``, or with ``state=`` when ``fit`` is set.
        params: The hyperparameters with defaults and checks.
        accepts: Delta kinds ``fn`` takes; others are densified by the pipeline.
        fit: ``fit(n_tasks, **params) -> Fitter`` for whole-model statistics, or None.
        lowrank_output: True when low-rank inputs give an exactly low-rank result.
        paper: The paper's URL.
        summary: One line for ``starmerge methods``.
        needs_data: True for data-driven methods (statistics collected from task data).
        artifacts: ``{name: (shape_fn, dtype)}``: the per-parameter artifact tensors ``fn``
            returns, ``shape_fn(param_shape, n_tasks) -> shape``, so the writer can plan them.
    """

    name: str
    fn: Callable[..., Merged]
    params: Mapping[str, Param]
    accepts: Accepts
    fit: Callable[..., Fitter] | None = None
    lowrank_output: bool = False
    paper: str = ""
    summary: str = ""
    needs_data: bool = False
    artifacts: Mapping[str, tuple[Callable[[tuple[int, ...], int], tuple[int, ...]], Any]] = field(
        default_factory=dict
    )

    def resolve(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Validate ``given`` hyperparameters and fill defaults.

        Raises:
            ConfigError: Listing every unknown or invalid parameter.
        """
        problems = []
        for key in given:
            if key not in self.params:
                known = ", ".join(self.params) or "none"
                problems.append(
                    f"{self.name}: unknown parameter {key!r}.{did_you_mean(key, self.params)} "
                    f"Parameters: {known}"
                )
        values = {k: given.get(k, p.default) for k, p in self.params.items()}
        for key, value in values.items():
            problem = _check(self.name, key, value, self.params[key])
            if problem:
                problems.append(problem)
        if problems:
            raise ConfigError(problems)
        return values


def _check(method: str, key: str, value: Any, param: Param) -> str | None:
    """Type and range check of one hyperparameter value; an error message or None."""
    want = type(param.default)
    if param.default is None:
        ok_type = True
    elif want is float:
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif want is int:
        ok_type = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok_type = isinstance(value, want)
    if not ok_type:
        return (
            f"{method}: {key} must be {_article(want.__name__)} {want.__name__}, got {value!r} "
            f"({type(value).__name__}); fix the value in `parameters:`"
        )
    if param.choices is not None and value not in param.choices:
        return (
            f"{method}: {key} must be one of {', '.join(param.choices)}, got {value!r}."
            f"{did_you_mean(str(value), param.choices)}"
        )
    fragment = param.check(value) if param.check else None
    return f"{method}: {key} {fragment}, got {value!r}" if fragment else None


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
    needs_data: bool = False,
    artifacts: Mapping[str, tuple[Callable[[tuple[int, ...], int], tuple[int, ...]], Any]]
    | None = None,
) -> Callable[[Callable[..., Merged]], Callable[..., Merged]]:
    """Register ``fn`` as merge method ``name``.

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
                needs_data=needs_data,
                artifacts=dict(artifacts or {}),
            ),
        )
        return fn

    return wrap


def in_range(lo: float, hi: float, *, lo_open: bool = True, hi_open: bool = False):
    """A ``Param.check`` for an interval, e.g. ``in_range(0, 100)`` for (0, 100]."""

    def check(value: float) -> str | None:
        low_ok = value > lo if lo_open else value >= lo
        high_ok = value < hi if hi_open else value <= hi
        if low_ok and high_ok:
            return None
        return f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    return check
