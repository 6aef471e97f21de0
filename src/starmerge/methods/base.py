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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from starmerge.errors import ConfigError, did_you_mean, short_repr
from starmerge.methods.contract import (
    ALL_SPACES,
    STATISTICS,
    DataRequest,
    Fitter,
    Merged,
    Separable,
    default_spaces,
)
from starmerge.methods.counts import count_problem
from starmerge.methods.footprint import MemoryModel
from starmerge.methods.params import (  # noqa: F401  (re-exported: methods import them here)
    MAX_FACTOR,
    Param,
    as_param_type,
    check_value,
    factor_range,
    in_range,
    optional,
    takes_per_key,
)
from starmerge.registry import Registry
from starmerge.settings import PerKey, is_per_key, layer_depth, parse_setting

Accepts = frozenset[Literal["dense", "lowrank"]]


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
        lowrank_output: True when low-rank inputs give an exactly low-rank result, or
            ``lowrank_output(params) -> bool`` when that depends on the parameters.
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
        spaces: The merge spaces the method runs in (``full``, ``core``, ``knots``); None
            (the default) derives them with :func:`~starmerge.methods.contract.default_spaces`:
            every space for a method that takes dense deltas and has no base tensor, data step
            or artifacts, else ``full`` only.
        fit_reads: ``fit_reads(params) -> names``: the parameters the fit step reads with
            these values (None: all of them). The others may vary per parameter key (layer
            gradients, name filters: :mod:`starmerge.settings`).
        n_models: ``(least, most)`` models the method merges (``most`` None: no limit).
        base_counts_as_model: mergekit hands this method its ``base_model`` as one more
            model (Karcher's mean): a mergekit config's base is then merged as a zero delta.
        memory: ``memory(case) -> Footprint``: the bytes the kernel and the fit step allocate
            for one parameter (:mod:`starmerge.methods.footprint`); None: two float32 copies.
    """

    name: str
    fn: Callable[..., Merged]
    params: Mapping[str, Param]
    accepts: Accepts
    fit: Callable[..., Fitter] | None = None
    lowrank_output: bool | Callable[[Mapping[str, Any]], bool] = False
    paper: str = ""
    summary: str = ""
    artifacts: Mapping[str, tuple[Callable[[tuple[int, ...], int], tuple[int, ...]], Any]] = field(
        default_factory=dict
    )
    data_params: Mapping[str, Param] = field(default_factory=dict)
    data: Callable[[Mapping[str, Any]], DataRequest | None] | None = None
    needs_base: bool = False
    separable: Separable | None = None
    spaces: frozenset[str] | None = None  # None: derived in __post_init__
    fit_reads: Callable[[Mapping[str, Any]], Sequence[str]] | None = None
    n_models: tuple[int, int | None] = (1, None)
    base_counts_as_model: bool = False
    memory: MemoryModel | None = None

    def exact_lowrank(self, params: Mapping[str, Any]) -> bool:
        """Whether low-rank inputs give an exactly low-rank merge with these parameters."""
        if callable(self.lowrank_output):
            return bool(self.lowrank_output(params))
        return self.lowrank_output

    def models_problem(self, n: int) -> str | None:
        """Why ``n`` models cannot be merged by this method (None: they can)."""
        return count_problem(self.name, n, self.n_models)

    def __post_init__(self) -> None:
        if self.spaces is None:
            derived = default_spaces(
                self.accepts,
                needs_base=self.needs_base,
                has_data=self.data is not None,
                has_artifacts=bool(self.artifacts),
            )
            object.__setattr__(self, "spaces", derived)
        elif "full" not in self.spaces or not self.spaces <= ALL_SPACES:
            raise ValueError(
                f"{self.name}: spaces must hold full and only {', '.join(sorted(ALL_SPACES))}, "
                f"got {sorted(self.spaces)}"
            )

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
            param = declared[key]
            if takes_per_key(param) and is_per_key(value):
                values[key], found = self._per_key(key, value, param, values)
                problems += found
                continue
            problem = (
                None if isinstance(value, PerKey) else check_value(self.name, key, value, param)
            )
            if problem:
                problems.append(problem)
        if problems:
            raise ConfigError(problems)
        return values

    def _per_key(
        self, key: str, value: Any, param: Param, values: Mapping[str, Any]
    ) -> tuple[PerKey | None, list[str]]:
        """A gradient / conditional value of ``key`` parsed (see :mod:`starmerge.settings`)."""
        if key in self.data_params or (self.fit is not None and key in self._fit_reads(values)):
            return None, [
                f"{self.name}: {key} is read by the method's fit step over the whole model, so it "
                f"takes one value, got the per-parameter value {short_repr(value)}; give one "
                "number"
            ]
        return parse_setting(
            f"{self.name}: {key}",
            value,
            param.default,
            lambda v: check_value(self.name, key, v, param),
        )

    def _fit_reads(self, values: Mapping[str, Any]) -> frozenset[str]:
        """The parameters the fit step reads with these values (all, unless declared)."""
        if self.fit_reads is None:
            return frozenset(self.all_params)
        return frozenset(self.fit_reads(values))

    def params_at(self, params: Mapping[str, Any], key: str, n_layers: int) -> dict[str, Any]:
        """The kernel's parameters at parameter ``key``, one of ``n_layers`` numbered blocks.

        Per-key values (layer gradients, name filters) are evaluated at the key's depth and
        cast to the parameter's type (:mod:`starmerge.settings`).
        """
        out = self.kernel_args(params)
        for name, value in out.items():
            if isinstance(value, PerKey):
                depth = layer_depth(key, n_layers)
                out[name] = as_param_type(value.at(key, depth), self.params[name].default)
        return out

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


METHODS: Registry[Method] = Registry("method")


def register_method(
    name: str,
    *,
    params: Mapping[str, Param] | None = None,
    accepts: Sequence[str] = ("dense",),
    fit: Callable[..., Fitter] | None = None,
    lowrank_output: bool | Callable[[Mapping[str, Any]], bool] = False,
    paper: str = "",
    artifacts: Mapping[str, tuple[Callable[[tuple[int, ...], int], tuple[int, ...]], Any]]
    | None = None,
    data_params: Mapping[str, Param] | None = None,
    data: Callable[[Mapping[str, Any]], DataRequest | None] | None = None,
    needs_base: bool = False,
    separable: Separable | None = None,
    spaces: Sequence[str] | None = None,
    fit_reads: Callable[[Mapping[str, Any]], Sequence[str]] | None = None,
    n_models: tuple[int, int | None] = (1, None),
    base_counts_as_model: bool = False,
    memory: MemoryModel | None = None,
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
                spaces=None if spaces is None else frozenset(spaces),
                fit_reads=fit_reads,
                n_models=n_models,
                base_counts_as_model=base_counts_as_model,
                memory=memory,
            ),
        )
        return fn

    return wrap
