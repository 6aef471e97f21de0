"""The method contract's types: results, fit steps, data requests and separable merges.

``Merged`` is what a kernel returns, ``Fitter``/``State`` its optional fit step. Beyond its
kernel, a :class:`~starmerge.methods.base.Method` declares as data, so that nothing outside
``methods/`` asks for a method by name:

- ``data(params) -> DataRequest | None``: the statistics (or trained masks) its fit step needs
  from task data with these parameters; ``stats/`` collects them, the fit step reads them.
- ``separable: Separable | None``: the merge is the mean (or sum) over tasks of a per-task
  transform, so callers that merge many task subsets (sweeps) may cache each task's transform.
- ``spaces``: the merge spaces it runs in; by default derived by :func:`default_spaces`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from starmerge.errors import ConfigError
from starmerge.tensors.delta import Delta
from starmerge.tensors.spaces import SPACES

FULL_SPACE: frozenset[str] = frozenset({"full"})  # the merge spaces every method accepts
ALL_SPACES: frozenset[str] = frozenset(SPACES)  # full, core (Core Space) and knots (KnOTS)
STATISTICS = "statistics"  # the data-step parameter that gives precomputed statistics


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


class State(Protocol):
    """Whole-model statistics computed by a fitter; frozen and JSON-summarizable."""

    def at(self, key: str) -> Any:
        """The part of the state the method needs for parameter ``key``."""

    def summary(self) -> dict[str, Any]:
        """Statistics for the manifest (MetaGPT lambdas, TIES thresholds)."""


class Fitter(Protocol):
    """Streams over every parameter's deltas (possibly several passes) to build a ``State``.

    A fitter whose ``needs_deltas`` attribute is False (TIES with ``trim: local``) is not
    streamed at all: one ``end_pass()`` and its ``state()``.

    ``deltas`` holds ``None`` for a task that lacks the parameter: a fitter that counts entries
    per task (TIES's N) must not count it. A method that declares ``needs_base`` also gets
    ``base=`` (the base model's tensor of the parameter).
    """

    def observe(self, key: str, deltas: Sequence[Delta | None]) -> None:
        """See one parameter's deltas in the current pass.

        Keep statistics, not the deltas: in ``core``/``knots`` space they are buffers that the
        next parameter's coordinates overwrite (``space_cache.SpaceCache``).
        """

    def end_pass(self) -> bool:
        """Close the current pass; return True when another pass over the model is needed."""

    def state(self) -> State:
        """The finished statistics (only after ``end_pass`` returned False)."""


@dataclass(frozen=True)
class DataRequest:
    """Statistics to collect per task, and/or Localize-and-Stitch masks to train.

    Args:
        kinds: Statistic kinds (``fisher``, ``gram_in``, ``gram_out``).
        fisher: ``empirical`` or ``true`` labels for the gradient statistics.
        masks: Mask-training settings (``sparsity``, ``steps``, ``lr``, ``l1``,
            ``regularizer``, ``sigmoid_bias``, ``parameter_set``), or None. Part of the cache key.
        covers: Which parameter keys get a trained mask (the parameter set P); None: all.
        reason: What in the parameters asks for data, for messages (``objective regmean``).

    Example:
        >>> DataRequest(("gram_in",)).kinds
        ('gram_in',)
    """

    kinds: tuple[str, ...] = ()
    fisher: str = "empirical"
    masks: Mapping[str, Any] | None = None
    covers: Callable[[str], bool] | None = field(default=None, compare=False)
    reason: str = "statistics"

    def describe(self) -> str:
        """One line for ``starmerge methods``: ``statistics gram_in`` or ``trained masks``."""
        parts = []
        if self.kinds:
            labels = f" ({self.fisher} labels)" if "fisher" in self.kinds else ""
            parts.append(f"statistics {'+'.join(self.kinds)}{labels}")
        if self.masks is not None:
            parts.append("trained masks")
        return " and ".join(parts) or "nothing"


Transform = Callable[..., tuple[Delta, Mapping[str, Any]]]


@dataclass(frozen=True)
class Separable:
    """The merge is ``combine`` over tasks of ``transform(tau_t, **params)``.

    Args:
        transform: ``transform(delta, **params) -> (delta', stats)`` on one task's delta of
            one parameter, with the kernel parameters (a per-task list replaced by the task's
            own entry, see ``per_task``). ``stats`` holds per-task values; the combined stats
            list them in task order under the same names, as the kernel's stats do.
        combine: ``mean`` (divide the sum by the number of tasks T) or ``sum``.
        per_task: Kernel parameters that hold one value per task (``weights``), mapped to the
            transform's keyword for the task's own value (``weight``); an unset (None) list is
            not passed.
    """

    transform: Transform
    combine: Literal["mean", "sum"]
    per_task: Mapping[str, str] = field(default_factory=dict)

    def task_params(
        self, method: str, params: Mapping[str, Any], task: int, n_tasks: int
    ) -> dict[str, Any]:
        """The transform's parameters for task ``task`` of ``n_tasks`` (kernel ``params``).

        Raises:
            ConfigError: A per-task list does not have one entry per task.

        Example:
            >>> Separable(print, "sum", {"weights": "weight"}).task_params(
            ...     "task_arithmetic", {"scaling": 2.0, "weights": [1.0, 3.0]}, 1, 2)
            {'scaling': 2.0, 'weight': 3.0}
        """
        out = {k: v for k, v in params.items() if k not in self.per_task}
        for name, keyword in self.per_task.items():
            values = params.get(name)
            if values is None:
                continue
            if len(values) != n_tasks:
                raise ConfigError(
                    [
                        f"{method}: {name} has {len(values)} entries but there are {n_tasks} "
                        f"models; give one per model or leave {name} unset"
                    ]
                )
            out[keyword] = values[task]
        return out


def default_spaces(
    accepts: Collection[str], *, needs_base: bool, has_data: bool, has_artifacts: bool
) -> frozenset[str]:
    """The merge spaces a method runs in when it does not declare them.

    In ``core`` and ``knots`` a method gets each task's small coordinates as ``Dense`` deltas
    (see :mod:`starmerge.tensors.spaces`), so every method that takes dense deltas runs there,
    except one whose inputs are tied to the parameter itself: the base tensor (``needs_base``),
    statistics or masks of task data (a ``data`` step), or artifacts shaped like the parameter.

    Example:
        >>> sorted(default_spaces({"dense"}, needs_base=False, has_data=False, has_artifacts=False))
        ['core', 'full', 'knots']
    """
    tied = needs_base or has_data or has_artifacts
    return FULL_SPACE if tied or "dense" not in accepts else ALL_SPACES
