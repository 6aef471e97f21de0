"""The fit step shared by the data-driven methods: per-task statistics, read per parameter.

The engine (or ``merge_deltas``) opens one statistics file per task (collected by
``starmerge.stats`` from the config's ``data:`` section, or given as ``parameters.statistics``)
and hands them to the method's fit step. :class:`StatsFitter` reads nothing up front, and its
state's ``at(key)`` reads that parameter's statistics of every task, so memory per parameter
stays bounded by T x (the parameter's statistics).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starmerge.errors import ConfigError
from starmerge.io.statistics import StatsFile, stat_name
from starmerge.methods.base import Param
from starmerge.tensors.delta import Delta


def check_statistics(value: Any) -> str | None:
    """``Param.check`` for ``statistics``: None or a list of paths."""
    if value is None or (
        isinstance(value, (list, tuple)) and all(isinstance(v, (str, Path)) for v in value)
    ):
        return None
    return "must be a list of statistics file paths (one per task) or null"


def statistics_param(help: str) -> Param:
    """The ``statistics`` data-step parameter: precomputed statistics, one file per task."""
    return Param(None, help, check_statistics)


def require_statistics(
    method: str, statistics: Sequence[StatsFile] | None, n_tasks: int, need: str
) -> tuple[StatsFile, ...]:
    """The opened per-task statistics, or an error that explains how to provide them.

    Raises:
        ConfigError: ``statistics`` is missing or has the wrong length.
    """
    if statistics is None:
        raise ConfigError(
            [
                f"{method}: {need} needs statistics from task data; add a `data:` section to "
                "the config (tasks: one task file per model, n_examples) or pass "
                "parameters.statistics (one statistics file per task)"
            ]
        )
    if len(statistics) != n_tasks:
        raise ConfigError(
            [f"{method}: statistics must list one file per task ({n_tasks}), got {len(statistics)}"]
        )
    return tuple(statistics)


@dataclass(frozen=True)
class TaskStatistics:
    """Per-task statistics files plus global numbers a fitter computed (Fisher norms).

    Args:
        files: One :class:`StatsFile` per task.
        kinds: The statistic kinds the method reads.
        extra: Global values (e.g. ``{"fisher_norms": [...]}``), also put in the summary.
    """

    files: tuple[StatsFile, ...]
    kinds: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict)

    def at(self, key: str) -> dict[str, Any]:
        """``{kind: [tensor per task]}`` for each kind every task has for ``key``, plus extra."""
        out: dict[str, Any] = dict(self.extra)
        for kind in self.kinds:
            name = stat_name(key, kind)
            if name is not None and all(name in f for f in self.files):
                out[kind] = [f.get(name) for f in self.files]
        return out

    def summary(self) -> dict[str, Any]:
        """The statistics files and global values for the manifest."""
        return {
            "statistics": [str(f.path) for f in self.files],
            "meta": self.files[0].meta,
            **self.extra,
        }


class StatsFitter:
    """The fit step of a data-driven method: one pass, reading nothing but the files' headers.

    Args:
        n_tasks: Number of tasks T.
        method: The method's name, for errors.
        statistics: One opened statistics file per task (None: an error that says how to
            provide them).
        kinds: The statistic kinds the method reads.
        fisher_norms: Also compute each task's global Fisher L2 norm over the merged parameters.
        need: What needs the statistics, for the error message (default: the kinds).
    """

    def __init__(
        self,
        n_tasks: int,
        method: str,
        statistics: Sequence[StatsFile] | None,
        kinds: Sequence[str],
        *,
        fisher_norms: bool = False,
        need: str | None = None,
    ):
        need = need or " and ".join(kinds)
        self.files = require_statistics(method, statistics, n_tasks, need)
        self.kinds = tuple(kinds)
        self._norms = [0.0] * n_tasks if fisher_norms else None

    def observe(self, key: str, deltas: Sequence[Delta | None]) -> None:
        """Accumulate squared Fisher norms (when asked); nothing else is needed per parameter."""
        if self._norms is None:
            return
        name = stat_name(key, "fisher")
        for i, f in enumerate(self.files):
            if name in f:
                self._norms[i] += float(f.get(name).double().square().sum())

    def end_pass(self) -> bool:
        """One pass is enough."""
        return False

    def state(self) -> TaskStatistics:
        """The lazily-read statistics."""
        extra = {} if self._norms is None else {"fisher_norms": [n**0.5 for n in self._norms]}
        return TaskStatistics(self.files, self.kinds, extra)
