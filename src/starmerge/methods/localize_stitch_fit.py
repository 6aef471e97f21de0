"""Localize-and-Stitch's fit step: the parameter set P, the masks' thresholds or files, counts.

Dataless masks need each task's global top-k threshold over P (TIES's streamed radix select);
trained masks come from one mask file per task (:mod:`starmerge.stats.masks` trains them). The
kernel and its paper notes are in :mod:`starmerge.methods.localize_stitch`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from starmerge.io.statistics import StatsFile
from starmerge.methods.statistics import require_statistics
from starmerge.tensors.delta import Delta
from starmerge.tensors.sparsify import BitScratch, RadixSelect, keep_count

BLOCK = re.compile(r"(^|\.)(layers|layer|h|block|blocks)\.\d+\.")
DEFAULT_SPARSITY = {"dataless": 0.05, "trained": 0.01}


def in_parameter_set(key: str, parameter_set: str) -> bool:
    """Whether parameter ``key`` is in P.

    Example:
        >>> in_parameter_set("model.embed_tokens.weight", "blocks")
        False
    """
    return parameter_set == "all" or BLOCK.search(key) is not None


def resolve_sparsity(mode: str, sparsity: float | None) -> float:
    """The given sparsity, or the mode's default (dataless 0.05, trained 0.01)."""
    return DEFAULT_SPARSITY[mode] if sparsity is None else sparsity


def top_k_masks(taus: Tensor, thresholds: Sequence[float | None]) -> Tensor:
    """gamma_i = (|tau_i| >= t_i) & (tau_i != 0) for ``taus`` ``(T, ...)``; None keeps nothing."""
    masks = [
        torch.zeros_like(t, dtype=torch.bool) if thr is None else (t.abs() >= thr) & (t != 0)
        for t, thr in zip(taus, thresholds, strict=True)
    ]
    return torch.stack(masks)


@dataclass(frozen=True)
class LSParam:
    """What the method needs for one parameter: whether it is in P, and its masks' source."""

    in_set: bool
    thresholds: tuple[float | None, ...] | None = None
    masks: list[Tensor] | None = None


@dataclass(frozen=True)
class LSState:
    """Fitted Localize-and-Stitch state: thresholds (dataless) or mask files (trained)."""

    mode: str
    parameter_set: str
    thresholds: tuple[float | None, ...] | None
    files: tuple[StatsFile, ...] | None
    counts: dict[str, Any] = field(default_factory=dict)

    def at(self, key: str) -> LSParam:
        """The parameter's membership in P and its thresholds or stored masks."""
        if not in_parameter_set(key, self.parameter_set):
            return LSParam(False)
        if self.files is None:
            return LSParam(True, thresholds=self.thresholds)
        return LSParam(True, masks=[f.get(f"{key}::mask") for f in self.files])

    def summary(self) -> dict[str, Any]:
        """Per-task sparsity (kept / entries in P) and the overlap fraction of the masks."""
        kept, total = self.counts.get("kept", []), self.counts.get("total", [])
        union = self.counts.get("union", 0)
        return {
            "mode": self.mode,
            "parameter_set": self.parameter_set,
            "thresholds": None if self.thresholds is None else list(self.thresholds),
            "kept": kept,
            "total": total,
            "sparsity": [k / n if n else 0.0 for k, n in zip(kept, total, strict=True)],
            "union": union,
            "overlap": self.counts.get("overlap", 0),
            "overlap_fraction": self.counts.get("overlap", 0) / union if union else 0.0,
        }


class LSFitter:
    """Dataless: radix-select passes for each task's global threshold, then a counting pass.

    Trained: one counting pass over the stored masks (``statistics``: one opened mask file per
    task). ``params``: the resolved parameters (``mode``, ``parameter_set``, ``sparsity``).
    """

    def __init__(
        self, n_tasks: int, *, statistics: Sequence[StatsFile] | None = None, **params: Any
    ):
        self.mode, self.pset = params.get("mode", "dataless"), params.get("parameter_set", "blocks")
        self.sparsity = resolve_sparsity(self.mode, params.get("sparsity"))
        self.files = None
        if self.mode == "trained":
            need = "mode 'trained' (masks trained on task data)"
            self.files = require_statistics("localize_stitch", statistics, n_tasks, need)
        scratch = BitScratch()  # the selects run one at a time: one set of buffers
        self.selects = [RadixSelect(scratch) for _ in range(n_tasks)]
        self.phase = "count" if self.files else "high"
        self.thresholds: tuple[float | None, ...] | None = None
        self.counts = {"kept": [0] * n_tasks, "total": [0] * n_tasks, "union": 0, "overlap": 0}

    def observe(self, key: str, deltas: Sequence[Delta | None]) -> None:
        """Histogram (dataless passes 1-2) or count masks (last pass) for a parameter in P."""
        if not in_parameter_set(key, self.pset):
            return
        if self.phase == "count":
            self._count(key, deltas)
            return
        for sel, d in zip(self.selects, deltas, strict=True):
            if d is not None:
                x = d.to_dense(torch.float32)
                sel.add_high(x) if self.phase == "high" else sel.add_low(x)

    def _count(self, key: str, deltas: Sequence[Delta | None]) -> None:
        present = [i for i, d in enumerate(deltas) if d is not None]
        if not present:
            return
        first = deltas[present[0]].to_dense(torch.float32)  # type: ignore[union-attr]
        taus = torch.stack(
            [torch.zeros_like(first) if d is None else d.to_dense(torch.float32) for d in deltas]
        )
        if self.files is None:
            masks = top_k_masks(taus, self.thresholds or ())
        else:
            stored = torch.stack([f.get(f"{key}::mask").to(taus.device) for f in self.files])
            masks = stored & (taus != 0)
        for i in present:
            self.counts["kept"][i] += int(masks[i].sum())
            self.counts["total"][i] += masks[i].numel()
        on = masks.sum(dim=0)
        self.counts["union"] += int((on >= 1).sum())
        self.counts["overlap"] += int((on >= 2).sum())

    def end_pass(self) -> bool:
        """Advance high -> (low) -> count; True while another pass is needed."""
        if self.phase == "high":
            for sel in self.selects:
                sel.finish_high(keep_count(self.sparsity, sel.n))
            self.phase = "low" if any(s.needs_low_pass for s in self.selects) else "count"
        elif self.phase == "low":
            for sel in self.selects:
                sel.finish_low()
            self.phase = "count"
        else:
            return False
        if self.phase == "count":
            self.thresholds = tuple(s.threshold for s in self.selects)
        return True

    def state(self) -> LSState:
        """The thresholds or mask files, with the mask counts."""
        return LSState(self.mode, self.pset, self.thresholds, self.files, self.counts)
