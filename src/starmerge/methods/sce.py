"""SCE (Select, Calculate, Erase), the merge of FuseChat, with mergekit's semantics.

Paper: "FuseChat: Knowledge Fusion of Chat Models" (Wan, Zhong, Huang, Quan, Bi, Shi; 2024),
https://arxiv.org/abs/2408.07990. Reference code: mergekit ``merge_methods/sce.py``.

Update rule for one parameter, with task deltas tau_t (t = 1..T):
    select:    with 0 < select_topk < 1, keep the k = int(select_topk * #{var != 0}) entries of
               largest variance across tasks, var = mean_t (tau_t - mean_t tau_t)^2 (zero
               elsewhere in every task); select_topk <= 0 keeps nothing, >= 1 everything
    calculate: w_t = mean(tau_t^2) / sum_j mean(tau_j^2) over the selected deltas
               (all w_t = 1 / T when that sum is below 1e-6, mergekit's absolute threshold)
    erase:     g = +1 where sum_t tau_t >= 0, else -1;  m_t = (sign(tau_t) == g)
    result:    sum_t w_t m_t tau_t / max(sum_t w_t m_t, 1e-6)

Symbols <-> arguments: the paper's tau (the selected share) = ``select_topk``. SCE has no
per-model weight and no scaling in mergekit, nor here.

Deviations from mergekit: float32 work (mergekit: the input dtype); the top-k by variance uses a
stable sort (equal variances ordered by position) instead of ``torch.topk``. mergekit's 1e-6
thresholds are absolute, so tasks whose mean squared delta sums below 1e-6 (small LoRA deltas)
are weighted uniformly: kept as mergekit does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from starmerge.methods.base import Merged, Param, in_range, register_method
from starmerge.methods.footprint import Footprint
from starmerge.tensors.delta import Delta, Dense

_WEIGHT_EPS = 1e-6  # mergekit: uniform weights below this summed mean square; divisor floor


def variance_mask(taus: Sequence[Tensor], select_topk: float) -> Tensor | None:
    """The entries of largest variance across tasks (SCE's Select); None keeps every entry.

    Args:
        taus: The T task deltas (float32, one shape).
        select_topk: Kept share of the entries whose variance is not zero.

    Returns:
        A boolean mask of the parameter's shape, or None when ``select_topk >= 1``.
    """
    if select_topk >= 1:
        return None
    if select_topk <= 0:
        return torch.zeros(taus[0].shape, dtype=torch.bool, device=taus[0].device)
    mean = sum(taus) / len(taus)
    var = sum((tau - mean) ** 2 for tau in taus) / len(taus)  # population variance
    k = int(int(torch.count_nonzero(var)) * select_topk)
    mask = torch.zeros(var.numel(), dtype=torch.bool, device=var.device)
    if k > 0:
        order = torch.argsort(var.reshape(-1), descending=True, stable=True)
        mask[order[:k]] = True
    return mask.reshape(var.shape)


def sce_weights(taus: Sequence[Tensor]) -> list[float]:
    """SCE's Calculate: each task's mean square over their sum (uniform below 1e-6)."""
    squares = [float((tau * tau).mean()) for tau in taus]
    total = sum(squares)
    if abs(total) < _WEIGHT_EPS:
        return [1.0 / len(taus)] * len(taus)
    return [s / total for s in squares]


@register_method(
    "sce",
    params={
        "select_topk": Param(
            1.0,
            "share of the highest-variance entries kept (1: all)",
            in_range(0, 1, lo_open=False),
        )
    },
    accepts=("dense",),
    paper="https://arxiv.org/abs/2408.07990",
    # memory: the total, majority, merged, divisor, a weighted task and its agree mask
    memory=lambda case: Footprint(case.copies(6.25)),
)
def sce(deltas: Sequence[Delta], *, select_topk: float = 1.0) -> Merged:
    """SCE: select high-variance entries, weight tasks by mean square, erase sign conflicts.

    Args:
        deltas: One delta per task for this parameter (densified if ``LowRank``).
        select_topk: Share of the entries (of nonzero variance) kept, in [0, 1].

    Returns:
        The merged dense delta in the first input's dtype and ``{"kept", "total"}`` (selected
        entries, entries).

    Example:
        >>> sce([Dense(torch.tensor([1.0, -2.0])), Dense(torch.tensor([3.0, 1.0]))]).delta.tensor
        tensor([ 2.3333, -2.0000])
    """
    taus = [d.to_dense(torch.float32) for d in deltas]  # T x (...)
    mask = variance_mask(taus, select_topk)
    if mask is not None:
        taus = [tau * mask for tau in taus]
    weights = sce_weights(taus)
    total = torch.zeros_like(taus[0])
    for tau in taus:
        total += tau
    majority = torch.where(total >= 0, 1.0, -1.0)  # Erase: TIES' "sum" sign election
    merged = torch.zeros_like(total)
    divisor = torch.zeros_like(total)
    for tau, w in zip(taus, weights, strict=True):
        agree = torch.sign(tau) == majority
        merged += tau * (w * agree)
        divisor += w * agree
    merged /= divisor.clamp(min=_WEIGHT_EPS)
    kept = taus[0].numel() if mask is None else int(mask.sum())
    stats = {"kept": kept, "total": taus[0].numel()}
    return Merged(Dense(merged.to(deltas[0].dtype)), stats)
