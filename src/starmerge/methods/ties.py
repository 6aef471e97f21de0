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
from starmerge.tensors.sparsify import (
    RadixSelect,
    keep_count,
    kth_largest_abs_local,
    l1_rescaled,
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


def _trim(tau: Tensor, threshold: float | None, rescale: bool) -> Tensor:
    trimmed = magnitude_trim(tau, threshold)
    return l1_rescaled(tau, trimmed) if rescale else trimmed


def disjoint_mean(
    taus: Sequence[Tensor],
    thresholds: Sequence[float | None],
    weights: Sequence[float] | None = None,
    *,
    normalize: bool = True,
    rescale: bool = False,
) -> tuple[Tensor, int]:
    """Trim, elect sign and average the agreeing entries; 0 where none agree.

    Works task by task (each task trimmed twice rather than all T trimmed copies held), so the
    temporaries beyond the inputs are about three tensors of one parameter's size.

    Args:
        taus: The T task deltas (float32).
        thresholds: Per task, the smallest kept ``|entry|`` (None keeps nothing).
        weights: Per task w_t (None: all 1), applied before the election.
        normalize: Divide by the summed weights of the agreeing entries (else their sum).
        rescale: Rescale each trimmed task to its L1 norm before weighting.

    Returns:
        The merged tensor and the number of entries kept over all tasks.
    """
    ws = [1.0] * len(taus) if weights is None else list(weights)
    triples = list(zip(taus, thresholds, ws, strict=True))
    total = torch.zeros_like(taus[0])
    for tau, thr, w in triples:
        total += _trim(tau, thr, rescale).mul_(w)
    gamma = torch.sign(total)  # Elect Sign
    total.zero_()
    count = torch.zeros_like(total)
    kept = 0
    for tau, thr, w in triples:  # Disjoint Merge: sum and weight of entries agreeing with gamma
        trimmed = _trim(tau, thr, rescale).mul_(w)
        kept += int(torch.count_nonzero(trimmed))
        agree = (torch.sign(trimmed) == gamma) & (trimmed != 0)
        total += trimmed.mul_(agree)
        count += agree * w
    if not normalize:
        return total, kept
    return total.div_(count.masked_fill_(count == 0, 1.0)), kept


def _memory(case: MemoryCase) -> Footprint:
    """Kernel: total, sign, count, a trimmed task, its sign and masks; fit: |x|, its bits."""
    return Footprint(case.copies(6.5), case.copies(2.5) + case.n_tasks * 2**19)


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
    taus = [d.to_dense(torch.float32) for d in deltas]  # T x (...)
    n_tasks = len(taus)
    ws = per_model("ties", {"weights": weights}, "weight", n_tasks)
    if trim == "local" or state is None or state.thresholds is None:
        ds = per_model("ties", {"density": density, "densities": densities}, "density", n_tasks)
        thresholds = [
            kth_largest_abs_local(t, keep_count(d, t.numel()))
            for t, d in zip(taus, ds, strict=True)
        ]
    else:
        thresholds = list(state.thresholds)
    merged, kept = disjoint_mean(taus, thresholds, ws, normalize=normalize, rescale=rescale)
    stats = {"kept": kept, "total": len(taus) * taus[0].numel()}
    return Merged(Dense(merged.mul_(scaling).to(out_dtype)), stats)
