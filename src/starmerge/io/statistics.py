"""Per-task statistics files (Fishers, Grams, trained masks), read one tensor at a time.

A task's statistics are a safetensors file, or a cache directory written by
:class:`starmerge.stats.cache.StatsWriter` (``index.json`` + ``part-*.safetensors``). Tensor names:

- ``"<module>.weight::fisher"``, ``"<module>.bias::fisher"``: diagonal Fisher of a parameter;
- ``"<module>::gram_in"``: input Gram matrix ``(in, in)`` of a Linear (RegMean, K-FAC factor A);
- ``"<module>::gram_out"``: output-gradient Gram matrix ``(out, out)`` (K-FAC factor G);
- ``"<key>::mask"``: a trained Localize-and-Stitch mask (bool, the parameter's shape).

The data-driven methods' fit step (:mod:`starmerge.methods.statistics`) reads through
:class:`StatsFile`, one parameter at a time (``safe_open``), so memory per parameter stays
bounded by T x (the parameter's statistics).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from torch import Tensor

from starmerge.errors import InputError

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
        if not self.path.exists():
            raise InputError(self._problem("does not exist"))
        if not (self.path / INDEX).is_file() and not self.path.is_file():
            raise InputError(self._problem(f"is neither a .safetensors file nor has {INDEX}"))
        try:
            if (self.path / INDEX).is_file():
                index = json.loads((self.path / INDEX).read_text())
                self.meta = index.get("meta", {})
                self._where = {k: self.path / f for k, f in index["weight_map"].items()}
            else:
                with safe_open(self.path, framework="pt") as f:
                    self._where = {k: self.path for k in f.keys()}
                    self.meta = dict(f.metadata() or {})
        except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as exc:
            raise InputError(self._problem(f"cannot be read ({type(exc).__name__})")) from None

    def _problem(self, what: str) -> str:
        return (
            f"statistics {self.path} {what}; give the files that `data:` produced, one per "
            "model (or remove parameters.statistics)"
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


def open_statistics(paths: Sequence[str | Path]) -> list[StatsFile]:
    """Open one statistics file (or cache directory) per task, headers only.

    Raises:
        InputError: A path does not exist or is not a statistics file.

    Example:
        >>> files = open_statistics(["stats/a", "stats/b"])  # doctest: +SKIP
    """
    return [StatsFile(p) for p in paths]
