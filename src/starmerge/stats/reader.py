"""Read per-task statistics lazily, one parameter at a time, for the data-driven methods.

A task's statistics are a safetensors file, or a cache directory written by
:class:`starmerge.stats.cache.StatsWriter` (``index.json`` + ``part-*.safetensors``). Tensor names:

- ``"<module>.weight::fisher"``, ``"<module>.bias::fisher"``: diagonal Fisher of a parameter;
- ``"<module>::gram_in"``: input Gram matrix ``(in, in)`` of a Linear (RegMean, K-FAC factor A);
- ``"<module>::gram_out"``: output-gradient Gram matrix ``(out, out)`` (K-FAC factor G);
- ``"<key>::mask"``: a trained Localize-and-Stitch mask (bool, the parameter's shape).

:class:`StatsFitter` is the ``fit`` step of a data-driven method: it reads nothing up front, and its
state's ``at(key)`` reads that parameter's statistics of every task (``safe_open``), so memory per
parameter stays bounded by T x (the parameter's statistics).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import Tensor

from starmerge.errors import ConfigError, InputError
from starmerge.tensors.delta import Delta

INDEX = "index.json"
GRAM_KINDS = ("gram_in", "gram_out")  # stored per module, not per parameter


def stat_name(key: str, kind: str) -> str | None:
    """The stored tensor name of statistic ``kind`` for parameter ``key`` (None: not defined).

    Example:
        >>> stat_name("layers.0.q.weight", "gram_in")
        'layers.0.q::gram_in'
    """
    if kind in GRAM_KINDS:
        return f"{key.removesuffix('.weight')}::{kind}" if key.endswith(".weight") else None
    return f"{key}::{kind}"


class StatsFile:
    """One task's statistics, read one tensor at a time.

    Args:
        path: A ``.safetensors`` file or a cache directory with ``index.json``.

    Raises:
        InputError: The path does not exist or is not a statistics file.

    Example:
        >>> StatsFile("stats/task0.safetensors").get("layers.0.q::gram_in")  # doctest: +SKIP
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta: dict[str, Any] = {}
        if (self.path / INDEX).is_file():
            index = json.loads((self.path / INDEX).read_text())
            self.meta = index.get("meta", {})
            self._where = {k: self.path / f for k, f in index["weight_map"].items()}
        elif self.path.is_file():
            with safe_open(self.path, framework="pt") as f:
                self._where = {k: self.path for k in f.keys()}
                self.meta = dict(f.metadata() or {})
        else:
            raise InputError(
                f"statistics {self.path} is neither a .safetensors file nor a directory with "
                f"{INDEX}; give the files that `data:` produced (or remove parameters.statistics)"
            )

    def keys(self) -> list[str]:
        """Every stored tensor name."""
        return list(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def get(self, name: str) -> Tensor:
        """Read one tensor (float statistics are stored in float32)."""
        with safe_open(self._where[name], framework="pt") as f:
            return f.get_tensor(name)


def open_statistics(
    method: str, statistics: Sequence[str | Path] | None, n_tasks: int, need: str
) -> list[StatsFile]:
    """Open one statistics file per task, or explain how to provide them.

    Raises:
        ConfigError: ``statistics`` is missing or has the wrong length.
    """
    if statistics is None:
        raise ConfigError([
            f"{method}: {need} needs statistics from task data; add a `data:` section to the "
            "config (tasks: one task file per model, n_examples) or pass parameters.statistics "
            "(one statistics file per task)"
        ])  # fmt: skip
    if len(statistics) != n_tasks:
        raise ConfigError([
            f"{method}: statistics must list one file per task ({n_tasks}), got "
            f"{len(statistics)}"
        ])  # fmt: skip
    return [StatsFile(p) for p in statistics]


def check_statistics(value: Any) -> str | None:
    """``Param.check`` for ``statistics``: None or a list of paths."""
    if value is None or (
        isinstance(value, (list, tuple)) and all(isinstance(v, (str, Path)) for v in value)
    ):
        return None
    return "must be a list of statistics file paths (one per task) or null"


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
        return {"statistics": [str(f.path) for f in self.files], "meta": self.files[0].meta,
                **self.extra}  # fmt: skip


class StatsFitter:
    """The fit step of a data-driven method: one pass, reading nothing but the files' headers.

    Args:
        n_tasks: Number of tasks T.
        method: The method's name, for errors.
        statistics: One statistics path per task.
        kinds: The statistic kinds the method reads; empty: nothing needed (state is None-like).
        fisher_norms: Also compute each task's global Fisher L2 norm over the merged parameters.
        need: What needs the statistics, for the error message (default: the kinds).
    """

    def __init__(
        self,
        n_tasks: int,
        method: str,
        statistics: Sequence[str | Path] | None,
        kinds: Sequence[str],
        *,
        fisher_norms: bool = False,
        need: str | None = None,
    ):
        need = need or " and ".join(kinds)
        self.files = tuple(open_statistics(method, statistics, n_tasks, need))
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
