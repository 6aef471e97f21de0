"""TIES-Merging: trim, elect sign, disjoint merge.

Paper: "TIES-Merging: Resolving Interference When Merging Models" (Yadav, Tam, Choshen, Raffel,
Bansal; NeurIPS 2023), https://arxiv.org/abs/2306.01708.

Update rule, for tasks t = 1..T:
    trim:   tau_hat_t = tau_t where |tau_t| >= thr_t, else 0, with thr_t the floor(density * N_t)-th
            largest |entry| of task t (entries tied with it are kept);
    (rescale: tau_hat_t *= ||tau_t||_1 / ||tau_hat_t||_1 per parameter, mergekit's option)
    elect:  gamma = sign(sum_t w_t tau_hat_t)                        (elementwise, "mass" election)
    merge:  tau_m = sum of the w_t tau_hat_t whose sign equals gamma, divided by the sum of
            their w_t when ``normalize`` (the default: the mean for unit weights; 0 where none
            agrees)
    result: scaling * tau_m

Symbols <-> arguments: density = k / 100 (the paper's and the seed code's top-k %), per model
``densities`` (None: density for every task), trim = scope of N_t, scaling = lambda, w_t =
``weights`` (models[].weight; None: all 1, the paper's rule).

N_t: ``trim="global"`` counts every entry task t has over the whole merge (an adapter: its adapted
matrices; a task lacking a parameter does not count it), found exactly by a two-pass streaming
radix select (:mod:`starmerge.tensors.sparsify`); ``trim="local"`` counts per parameter (the
exact threshold of that tensor by :func:`~starmerge.tensors.select.kth_largest`; no fit pass).
The tasks stream through one buffer each: trimmed once, then added to a one-pass sign vote
(:mod:`starmerge.tensors.vote`) whose result equals the two-pass rule bit for bit.

Deviations from the reference code (IBM/STAR ``merger/TIES.py``):
- the global threshold is exact but streamed (two histogram passes, O(65,536) counters per task)
  instead of ``topk`` over the task's concatenated vector; the kept set is identical;
- ``keep = floor(density * N)`` on the decimal value of density; ``keep == 0`` keeps nothing
  instead of raising IndexError; ``density = 1`` keeps everything;
- ``scaling`` (lambda) is exposed, default 1.0 as the seed code's fixed value;
- entries whose trimmed sum is 0 get sign 0 and merge to 0, as in the seed code (the original
  TIES code resolves them to the majority sign; such entries are almost always all zero);
- called without ``state`` (standalone), the given parameter is taken as the whole model.

mergekit's ``ties`` (``GeneralizedTaskArithmeticMerge``, magnitude sparsification and "sum"
consensus) is this method with ``trim: local`` (mergekit trims per tensor), its ``lambda`` =
scaling, per-model ``weight`` / ``density`` = ``weights`` / ``densities``, ``normalize``
(default true in both) and ``rescale`` (default false in both), except that mergekit
- keeps max(1, int(density * n)) entries by a float product and an argsort (at least one entry,
  ties at the threshold broken arbitrarily); here floor(density * n) on the decimal value, every
  entry tied with the last kept one kept, and none when that floor is 0;
- elects +1 where the weighted trimmed sum is exactly 0 (so the positive entries there merge);
  here such entries merge to 0, as the seed code;
- works in the input dtype (here float32) and requires every ``weight`` (here 1.0 by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from starmerge.methods.base import (
    MAX_FACTOR,
    Merged,
    Param,
    factor_range,
    in_range,
    register_method,
)
from starmerge.methods.footprint import Footprint, MemoryCase
from starmerge.methods.generalized_ta import number_list, per_model
from starmerge.tensors.delta import Delta, Dense
from starmerge.tensors.select import kth_largest
from starmerge.tensors.sparsify import BitScratch, RadixSelect, keep_count, l1_rescale_
from starmerge.tensors.threads import one_thread
from starmerge.tensors.vote import Scratch, SignVote, dense_into, trim_into


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

    def __init__(
        self,
        n_tasks: int,
        *,
        density: float,
        trim: str = "global",
        densities: Sequence[float] | None = None,
        **_: Any,
    ):
        self.local = trim == "local"
        self.needs_deltas = not self.local  # local thresholds come per parameter, in the kernel
        given = {"density": density, "densities": densities}
        self.densities = [] if self.local else per_model("ties", given, "density", n_tasks)
        scratch = BitScratch()  # the selects run one at a time: one set of buffers
        self.selects = [RadixSelect(scratch) for _ in range(n_tasks)]
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
            for sel, density in zip(self.selects, self.densities, strict=True):
                sel.finish_high(keep_count(density, sel.n))
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
            keep=tuple(
                keep_count(d, sel.n) for d, sel in zip(self.densities, self.selects, strict=True)
            ),
            total=tuple(sel.n for sel in self.selects),
        )


def _fit_ties(n_tasks: int, **params: Any) -> TiesFitter:
    return TiesFitter(n_tasks, **params)


def _local_threshold(tau: Tensor, density: float, scratch: Scratch) -> float | None:
    """The ``floor(density * numel)``-th largest ``|entry|`` of ``tau`` (None: keep nothing)."""
    keep = min(keep_count(density, tau.numel()), tau.numel())
    if keep <= 0:
        return None
    magnitudes = torch.abs(tau, out=scratch.get("trimmed")).reshape(-1)
    flags = (
        scratch.get("flag_a", torch.bool).reshape(-1),
        scratch.get("flag_b", torch.bool).reshape(-1),
    )
    return kth_largest(magnitudes, keep, flags)


def _memory(case: MemoryCase) -> Footprint:
    """Bytes beyond the T dense inputs: the kernel's buffers and the fit step's.

    Kernel: a trimmed task, the vote's total, pos, neg and temporary (5 float32), its two float32
    counts (2), two flags (0.5) and selection candidates (0.25) of a local threshold; the L1
    rescale works in the trimmed buffer and the vote's temporary (+0). Fit: |x|, its bits and
    their index (sparsify.BitScratch).
    """
    return Footprint(case.copies(7.75), case.copies(3.5) + case.n_tasks * 2**19)


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
        "densities": Param(None, "per-model density (default: density for all)", number_list(0, 1)),
        "weights": Param(
            None,
            "per-model weights w_t (default: models[].weight, else 1.0)",
            number_list(-MAX_FACTOR, MAX_FACTOR),
        ),
        "normalize": Param(True, "divide by the summed weights of the agreeing entries"),
        "rescale": Param(False, "rescale each trimmed task to its L1 norm (mergekit)"),
    },
    accepts=("dense",),
    fit=_fit_ties,
    fit_reads=lambda params: () if params["trim"] == "local" else ("density", "densities", "trim"),
    paper="https://arxiv.org/abs/2306.01708",
    memory=_memory,
)
def ties(
    deltas: Sequence[Delta],
    *,
    density: float = 0.2,
    trim: Literal["global", "local"] = "global",
    scaling: float = 1.0,
    densities: Sequence[float] | None = None,
    weights: Sequence[float] | None = None,
    normalize: bool = True,
    rescale: bool = False,
    state: TiesState | None = None,
) -> Merged:
    """TIES: trim each task to its top density, elect sign, average the agreeing entries.

    Args:
        deltas: One delta per task for this parameter (densified if ``LowRank``).
        density: Kept fraction of each task's entries, in (0, 1].
        trim: ``"global"``: thresholds over each task's whole delta (from ``state``);
            ``"local"``: per parameter.
        scaling: Multiplies the merged delta (lambda).
        densities: Per-task density (None: ``density`` for every task).
        weights: Per-task w_t (None: all 1).
        normalize: Divide by the summed weights of the agreeing entries (mean for unit weights).
        rescale: Rescale each trimmed task to its L1 norm (per parameter).
        state: The fitted :class:`TiesState`; without it the parameter is the whole model.

    Returns:
        The merged dense delta and ``{"kept": kept entries over tasks, "total": T * numel}``.

    Raises:
        ConfigError: ``densities`` or ``weights`` does not have one entry per task.

    Example:
        >>> ties([Dense(torch.tensor([1.0, -2.0])), Dense(torch.tensor([3.0, 1.0]))],
        ...      density=0.5).delta.tensor
        tensor([ 3., -2.])
    """
    out_dtype = deltas[0].dtype
    n_tasks = len(deltas)
    ws = per_model("ties", {"weights": weights}, "weight", n_tasks)
    local = trim == "local" or state is None or state.thresholds is None
    given = {"density": density, "densities": densities}
    ds = per_model("ties", given, "density", n_tasks) if local else []
    scratch = Scratch(deltas[0].shape, deltas[0].device)
    vote = SignVote(scratch, ws)
    kept = 0
    with one_thread():  # elementwise, memory-bound work: a second thread only waits (vote.py)
        for t, delta in enumerate(deltas):  # one task at a time: no T trimmed copies held
            tau = dense_into(delta, scratch.get("tau"))  # (...) float32
            thr = _local_threshold(tau, ds[t], scratch) if local else state.thresholds[t]
            trimmed = trim_into(tau, thr, scratch.get("trimmed"))  # Trim
            if rescale:  # in place on the trimmed buffer; |entries| go to the vote's temporary
                trimmed = l1_rescale_(tau, trimmed, scratch.get("tmp"))
            if ws[t] != 1.0:
                trimmed.mul_(ws[t])
            kept += vote.add(trimmed, ws[t])  # Elect Sign and Disjoint Merge, accumulated
        merged = vote.merge(zero="zero", normalize=normalize)
        if scaling != 1.0:
            merged.mul_(scaling)
    stats = {"kept": kept, "total": n_tasks * tau.numel()}
    return Merged(Dense(merged.to(out_dtype)), stats)
