"""TIES-Merging: trim, elect sign, disjoint merge.

Paper: "TIES-Merging: Resolving Interference When Merging Models" (Yadav, Tam, Choshen, Raffel,
Bansal; NeurIPS 2023), https://arxiv.org/abs/2306.01708.

Update rule, for tasks t = 1..T:
    trim:   tau_hat_t = tau_t where |tau_t| >= thr_t, else 0, with thr_t the floor(density * N_t)-th
            largest |entry| of task t (entries tied with it are kept);
    elect:  gamma = sign(sum_t tau_hat_t)                            (elementwise, "mass" election)
    merge:  tau_m = mean of the tau_hat_t whose sign equals gamma (0 where none agrees)
    result: scaling * tau_m

Symbols <-> arguments: density = k / 100 (the paper's and the seed code's top-k %),
trim = scope of N_t, scaling = lambda.

N_t: ``trim="global"`` counts every entry task t has over the whole merge (an adapter: its adapted
matrices; a task lacking a parameter does not count it), found exactly by a two-pass streaming
radix select (:mod:`starmerge.tensors.sparsify`); ``trim="local"`` counts per parameter (the
threshold from ``kthvalue`` on that tensor, the same exact value; the fit pass then does nothing).

Deviations from the reference code (IBM/STAR ``merger/TIES.py``):
- the global threshold is exact but streamed (two histogram passes, O(65,536) counters per task)
  instead of ``topk`` over the task's concatenated vector; the kept set is identical;
- ``keep = floor(density * N)`` on the decimal value of density; ``keep == 0`` keeps nothing
  instead of raising IndexError; ``density = 1`` keeps everything;
- ``scaling`` (lambda) is exposed, default 1.0 as the seed code's fixed value;
- entries whose trimmed sum is 0 get sign 0 and merge to 0, as in the seed code (the original
  TIES code resolves them to the majority sign; such entries are almost always all zero);
- called without ``state`` (standalone), the given parameter is taken as the whole model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from starmerge.methods.base import Merged, Param, factor_range, in_range, register_method
from starmerge.tensors.delta import Delta, Dense
from starmerge.tensors.sparsify import (
    RadixSelect,
    keep_count,
    kth_largest_abs_local,
    magnitude_trim,
)


@dataclass(frozen=True)
class TiesState:
    """Per-task global thresholds (None: the task keeps nothing), or None for local trimming."""

    thresholds: tuple[float | None, ...] | None
    keep: tuple[int, ...] = ()
    total: tuple[int, ...] = ()

    def at(self, key: str) -> TiesState:
        """The thresholds are global: every parameter gets the whole state."""
        return self

    def summary(self) -> dict[str, Any]:
        """Thresholds, kept and total entry counts per task for the manifest."""
        if self.thresholds is None:
            return {"trim": "local"}
        return {
            "trim": "global",
            "thresholds": list(self.thresholds),
            "keep": list(self.keep),
            "total": list(self.total),
        }


class TiesFitter:
    """Two streaming passes giving each task's exact global top-k threshold.

    Args:
        n_tasks: Number of tasks T.
        density: Kept fraction of each task's entries.
        trim: ``"global"`` (fit thresholds) or ``"local"`` (nothing to fit: one idle pass).
    """

    def __init__(self, n_tasks: int, *, density: float, trim: str = "global", **_: Any):
        self.density = density
        self.local = trim == "local"
        self.selects = [RadixSelect() for _ in range(n_tasks)]
        self.pass_no = 0

    def observe(self, key: str, deltas: Sequence[Delta | None]) -> None:
        """Histogram one parameter's entries per task (``None``: the task lacks it)."""
        if self.local:
            return
        for sel, delta in zip(self.selects, deltas, strict=True):
            if delta is None:
                continue
            x = delta.to_dense(torch.float32)
            if self.pass_no == 0:
                sel.add_high(x)
            else:
                sel.add_low(x)

    def end_pass(self) -> bool:
        """After pass 1 pick buckets; after pass 2 fix thresholds. True: one more pass."""
        self.pass_no += 1
        if self.local:
            return False
        if self.pass_no == 1:
            for sel in self.selects:
                sel.finish_high(keep_count(self.density, sel.n))
            return any(sel.needs_low_pass for sel in self.selects)
        for sel in self.selects:
            sel.finish_low()
        return False

    def state(self) -> TiesState:
        """The per-task thresholds."""
        if self.local:
            return TiesState(None)
        return TiesState(
            thresholds=tuple(sel.threshold for sel in self.selects),
            keep=tuple(keep_count(self.density, sel.n) for sel in self.selects),
            total=tuple(sel.n for sel in self.selects),
        )


def _fit_ties(n_tasks: int, **params: Any) -> TiesFitter:
    return TiesFitter(n_tasks, **params)


def disjoint_mean(taus: Sequence[Tensor], thresholds: Sequence[float | None]) -> tuple[Tensor, int]:
    """Trim, elect sign and average the agreeing entries; 0 where none agree.

    Works task by task (each task trimmed twice rather than all T trimmed copies held), so the
    temporaries beyond the inputs are about three tensors of one parameter's size.

    Args:
        taus: The T task deltas (float32).
        thresholds: Per task, the smallest kept ``|entry|`` (None keeps nothing).

    Returns:
        The merged tensor and the number of entries kept over all tasks.
    """
    pairs = list(zip(taus, thresholds, strict=True))
    total = torch.zeros_like(taus[0])
    for tau, thr in pairs:
        total += magnitude_trim(tau, thr)
    gamma = torch.sign(total)  # Elect Sign
    total.zero_()
    count = torch.zeros_like(total)
    kept = 0
    for tau, thr in pairs:  # Disjoint Merge: sum and count of the entries agreeing with gamma
        trimmed = magnitude_trim(tau, thr)
        kept += int(torch.count_nonzero(trimmed))
        agree = (torch.sign(trimmed) == gamma) & (trimmed != 0)
        total += trimmed.mul_(agree)
        count += agree
    return total.div_(count.clamp_(min=1)), kept


@register_method(
    "ties",
    params={
        "density": Param(0.2, "fraction of each task's entries kept", in_range(0, 1)),
        "trim": Param(
            "global",
            "top-k scope: global (whole task) or local (per parameter)",
            choices=("global", "local"),
        ),
        "scaling": Param(1.0, "lambda: scales the merged delta", factor_range()),
    },
    accepts=("dense",),
    fit=_fit_ties,
    paper="https://arxiv.org/abs/2306.01708",
)
def ties(
    deltas: Sequence[Delta],
    *,
    density: float = 0.2,
    trim: Literal["global", "local"] = "global",
    scaling: float = 1.0,
    state: TiesState | None = None,
) -> Merged:
    """TIES: trim each task to its top density, elect sign, average the agreeing entries.

    Args:
        deltas: One delta per task for this parameter (densified if ``LowRank``).
        density: Kept fraction of each task's entries, in (0, 1].
        trim: ``"global"``: thresholds over each task's whole delta (from ``state``);
            ``"local"``: per parameter.
        scaling: Multiplies the merged delta (lambda).
        state: The fitted :class:`TiesState`; without it the parameter is the whole model.

    Returns:
        The merged dense delta and ``{"kept": kept entries over tasks, "total": T * numel}``.

    Example:
        >>> ties([Dense(torch.tensor([1.0, -2.0])), Dense(torch.tensor([3.0, 1.0]))],
        ...      density=0.5).delta.tensor
        tensor([ 3., -2.])
    """
    out_dtype = deltas[0].dtype
    taus = [d.to_dense(torch.float32) for d in deltas]  # T x (...)
    if trim == "local" or state is None or state.thresholds is None:
        thresholds = [kth_largest_abs_local(t, keep_count(density, t.numel())) for t in taus]
    else:
        thresholds = list(state.thresholds)
    merged, kept = disjoint_mean(taus, thresholds)
    stats = {"kept": kept, "total": len(taus) * taus[0].numel()}
    return Merged(Dense(merged.mul_(scaling).to(out_dtype)), stats)
