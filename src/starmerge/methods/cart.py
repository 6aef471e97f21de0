"""CART: Centered Arithmetic with Rank-reduced Task vectors.

Paper: "Revisiting Weight Averaging for Model Merging" (Choi, Kim, Lee, Hong; 2024),
https://arxiv.org/abs/2412.12153. Reference code: JH-GEECS/CART ``src/merging.py``
(``StaticMergeModule._merge_weights("CART")`` and ``_get_truncated_task_vectors``); a second
implementation is ``get_cart_delta_w`` in apanariello4/core-space-merging ``task_merger.py``.

Update rule, per 2-D matrix, for tasks t = 1..T:
    D_bar  = (1 / T) * sum_t D_t                                   (weight averaging)
    k_t    = min(k, numerical rank of D_t - D_bar),
             k = max(1, floor(rank_fraction * min(m, n)))  (k = 0 when rank_fraction = 0)
    merged = D_bar + scaling * sum_t LowRank_{k_t}(D_t - D_bar)      (truncated SVD)
Parameters that are not 2-D matrices (biases, norms) are averaged: D_t - D_bar is not truncated
there, and the centred deltas sum to zero, so the reference code gives D_bar as well.

Symbols <-> arguments: scaling = the reference code's ``prior`` (the paper's lambda);
rank_fraction = ``initial_rank_ratio``. Defaults are the reference code's configuration for the
paper's headline benchmark (``configs/CART/ViT-b-32_8_CART.yaml``, 8 tasks): ``prior: 2.0``,
``initial_rank_ratio: 0.12`` (its 14- and 20-task configs use 1.5 / 0.16 and 1.9 / 0.32).

Low-rank inputs (LoRA, D_t = s_t B_t A_t) are never densified. With B = [s_1 B_1 .. s_T B_T]
= Q_B R_B and [A_1; ..; A_T]^T = Q_A R_A (R = sum_t r_t columns), every weighted sum
sum_j c_j s_j B_j A_j equals Q_B (R_B diag(c) R_A^T) Q_A^T: D_bar (c = 1 / T) and each centred
delta D_t - D_bar (c = e_t - 1 / T) have exact p x q cores (p, q <= R), whose SVDs are the thin
SVDs of the matrices (as in :func:`~starmerge.tensors.lowrank_svd.lowrank_sum_svd`, here with the
bases factored once for all T). The merge is Q_B M Q_A^T, an exact ``LowRank`` of rank q <= R,
at O((m + n) R^2 + T R^3), float64. Dense matrices get a float64 thin SVD per task
(:func:`~starmerge.tensors.lowrank_svd.dense_svd`).

Deviations from the reference code:
- every 2-D matrix is truncated; the reference truncates only keys containing ``attn`` or
  ``mlp`` (and not ``ln``/``bias``) and leaves other matrices (embeddings, projections) at D_bar;
  a method here is a function of one parameter's deltas and never reads parameter names;
- k is capped at the numerical rank of D_t - D_bar (singular values at or below
  ``max(m, n) * eps * s_max`` are noise, eps of the data's precision), so no singular vector of a
  zero singular value enters the merge; the reference keeps such noise directions;
- ``floor`` is taken on the decimal value of rank_fraction (0.29 of 100 is 29; the reference's
  ``int(0.29 * 100)`` is 28); core-space-merging takes ``ceil`` instead of ``floor`` and defaults
  to rank 0.04 with an inner coefficient 0.1, times an outer ``scaling_coeffs``;
- the SVD runs in float64 (the CART reference in float32), the result in the input dtype;
- a zero matrix (all tasks zero) stays exactly zero; one task returns that task.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from starmerge.methods.base import Merged, Param, factor_range, in_range, register_method
from starmerge.methods.footprint import F64, Footprint, MemoryCase
from starmerge.tensors.delta import Delta, Dense, LowRank
from starmerge.tensors.lowrank_svd import dense_svd
from starmerge.tensors.sparsify import keep_count
from starmerge.tensors.spectral import numerical_rtol, orthonormal_factor


def rank_budget(rank_fraction: float, shape: tuple[int, int]) -> int:
    """The reference's kept rank ``max(1, floor(rank_fraction * min(m, n)))`` (0 for 0).

    Example:
        >>> rank_budget(0.12, (768, 3072)), rank_budget(0.01, (8, 4)), rank_budget(0.0, (8, 4))
        (92, 1, 0)
    """
    if rank_fraction <= 0:
        return 0
    return max(1, keep_count(rank_fraction, min(shape)))


def _memory(case: MemoryCase) -> Footprint:
    """CART's memory: mean, total, a centred task and its SVD, in float64 (dense).

    Dense: the mean, total, centred task and its rank-k product, and the centred task's SVD;
    LoRA: the factors' QR and the T cores' batched SVD.
    """
    if case.lowrank:
        return Footprint(case.factors(4, F64))
    if not case.matrix:
        return Footprint(case.copies(2))
    return Footprint(case.copies(8) + case.square(min(case.dims), 2) + case.svd(F64))


@register_method(
    "cart",
    params={
        "scaling": Param(
            2.0,
            "lambda (the reference's prior): multiplies the low-rank deviations",
            factor_range(),
        ),
        "rank_fraction": Param(
            0.12,
            "kept rank of each centred task vector, as a fraction of min(m, n)",
            in_range(0, 1, lo_open=False),
        ),
    },
    accepts=("dense", "lowrank"),
    lowrank_output=True,
    paper="https://arxiv.org/abs/2412.12153",
    memory=_memory,
)
def cart(deltas: Sequence[Delta], *, scaling: float = 2.0, rank_fraction: float = 0.12) -> Merged:
    """CART: the mean plus scaling times the rank-k parts of each task's deviation from it.

    Args:
        deltas: One delta per task for this parameter (all ``LowRank`` stay factored).
        scaling: lambda, multiplies the sum of the truncated centred task vectors.
        rank_fraction: Kept rank per task as a fraction of ``min(m, n)``, in [0, 1].

    Returns:
        The merged delta in the first input's dtype (``LowRank`` of rank at most
        ``sum_t r_t`` for ``LowRank`` inputs) and ``{"kept_ranks": [k_1, ..., k_T]}`` for
        matrices.

    Example:
        >>> x = Dense(torch.diag(torch.tensor([4.0, 1.0])))
        >>> cart([x, Dense(torch.zeros(2, 2))], rank_fraction=0.5).stats
        {'kept_ranks': [1, 1]}
    """
    if len(deltas[0].shape) != 2:
        return _average(deltas)
    if all(isinstance(d, LowRank) for d in deltas):
        return _cart_lowrank(deltas, scaling, rank_fraction)  # type: ignore[arg-type]
    return _cart_dense(deltas, scaling, rank_fraction)


def _cart_lowrank(deltas: Sequence[LowRank], scaling: float, rank_fraction: float) -> Merged:
    """Factor-space CART in the bases of the stacked factors; the result has rank <= R.

    With B = [s_1 B_1 .. s_T B_T] = Q_B R_B and A^T = [A_1; ..; A_T]^T = Q_A R_A, every
    weighted sum sum_j c_j s_j B_j A_j is Q_B (R_B diag(c) R_A^T) Q_A^T: D_bar, each centred
    delta and their truncations live in the same p x q core space, so the bases are factored
    once, the T centred cores get one batched SVD, and the merge is Q_B M Q_A^T.
    """
    n_tasks, first = len(deltas), deltas[0]
    m, n = first.shape
    budget = rank_budget(rank_fraction, (m, n))
    live = [t for t, d in enumerate(deltas) if d.rank > 0]
    if not live:
        zero_b = torch.zeros(m, 0, dtype=first.dtype, device=first.device)
        a = torch.zeros(0, n, dtype=first.dtype, device=first.device)
        return Merged(LowRank(zero_b, a, 1.0), {"kept_ranks": [0] * n_tasks})
    b = torch.cat([deltas[t].b.to(torch.float64) * float(deltas[t].scale) for t in live], dim=1)
    a = torch.cat([deltas[t].a.to(torch.float64) for t in live], dim=0)  # (R, n)
    q_b, r_b = (x[0] for x in orthonormal_factor(b[None]))  # (m, p), (p, R)
    q_a, r_a = (x[0] for x in orthonormal_factor(a.T[None]))  # (n, q), (q, R)
    owner = torch.cat([torch.full((deltas[t].rank,), t) for t in live]).to(b.device)  # (R,)
    tasks = torch.arange(n_tasks, device=b.device)
    weights = (owner[None, :] == tasks[:, None]).to(b) - 1.0 / n_tasks  # (T, R): e_t - 1/T
    core = r_b @ r_a.T / n_tasks  # D_bar's core (p, q)
    kept = [0] * n_tasks
    if budget:
        u, s, vh = torch.linalg.svd((r_b * weights[:, None, :]) @ r_a.T, full_matrices=False)
        rtol = numerical_rtol((m, n), _data_dtype(first))
        support = (s > rtol * s[:, :1]).sum(dim=1)  # (T,) numerical ranks (0 for a zero core)
        for t in range(n_tasks):
            k = kept[t] = min(budget, int(support[t]))
            core = core + scaling * (u[t, :, :k] * s[t, :k]) @ vh[t, :k]
    merged = LowRank((q_b @ core).to(first.dtype), q_a.T.to(first.dtype), 1.0)
    return Merged(merged, {"kept_ranks": kept})


def _cart_dense(deltas: Sequence[Delta], scaling: float, rank_fraction: float) -> Merged:
    """Dense CART: one float64 thin SVD per centred task matrix."""
    first = deltas[0]
    budget = rank_budget(rank_fraction, first.shape)  # type: ignore[arg-type]
    mean = torch.zeros(first.shape, dtype=torch.float64, device=first.device)  # (m, n)
    for d in deltas:  # one float64 copy at a time, not T
        mean += d.to_dense(torch.float64)
    mean /= len(deltas)
    total = torch.zeros_like(mean)
    kept = []
    for d in deltas:
        k = 0
        if budget:
            svd = dense_svd(d.to_dense(torch.float64) - mean, _data_dtype(first))
            k = min(budget, svd.rank)
            total += (svd.u[:, :k] * svd.s[:k]) @ svd.vh[:k]
        kept.append(k)
    merged = mean + scaling * total
    return Merged(Dense(merged.to(first.dtype)), {"kept_ranks": kept})


def _data_dtype(delta: Delta) -> torch.dtype:
    """The precision the data carries (sets the SVD noise cut-off): float64 kept, else float32."""
    return torch.float64 if delta.dtype == torch.float64 else torch.float32


def _average(deltas: Sequence[Delta]) -> Merged:
    """Non-matrix parameters: the plain mean over tasks (D_bar)."""
    total: Tensor = torch.zeros_like(deltas[0].to_dense(torch.float32))
    for d in deltas:
        total += d.to_dense(torch.float32)
    return Merged(Dense((total / len(deltas)).to(deltas[0].dtype)))
