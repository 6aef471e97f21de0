"""TSV-M: Task Singular Vectors merging (low-rank per task, decorrelated by polar factors).

Paper: "Task Singular Vectors: Reducing Task Interference in Model Merging" (Gargiulo,
Crisostomi, Bucarelli, Scardapane, Silvestri, Rodola; CVPR 2025),
https://arxiv.org/abs/2412.00081.

Update rule, per 2-D parameter (m x n, p = min(m, n)) with task deltas tau_t, T tasks:
    k_t         = min(floor(fraction * p), numerical rank of tau_t)
    tau_t      ~= U_t S_t V_t^T                       (leading k_t singular triplets)
    U, S, V     = [U_1 .. U_T], diag(S_1 .. S_T), [V_1 .. V_T]   (m x K, K x K, n x K)
    polar(X)    = P Q^T  for the thin SVD X = P Sigma Q^T         (the orthogonal polar factor)
    merged      = scaling * polar(U) S polar(V)^T
Parameters that are not 2-D matrices (biases, norms) are averaged over the tasks.

Symbols <-> arguments: scaling = alpha (FusionBench's single ``alpha``, applied after the
merge); fraction = FusionBench's ``sv_reduction`` (null: 1/T, the reference's fixed choice).

LoRA inputs (``LowRank``, tau_t = s_t B_t A_t) never form an m x n matrix: each task's thin SVD
comes from its factors (:func:`~starmerge.tensors.lowrank_svd.delta_svd`: QR of B_t and A_t^T,
SVD of the r x r core), U and V are m x K and n x K with K = sum_t k_t <= sum_t r_t, and the
result is returned factored, ``LowRank(polar(U) S scaling, polar(V)^T)`` of rank K: the merge
of adapters is an exact adapter. Dense inputs give a dense result.

Deviations from the reference code (FusionBench ``compute_and_sum_svd_mem_reduction`` in
``fusion_bench/method/task_singular_vector/utils/TSVM_utils.py``, the paper authors' code):
- k_t is capped by the task's numerical rank (singular values above ``max(m, n) * eps *
  s_max``, eps of float32, of float64 for float64 data): the reference also takes singular
  vectors of zero singular values, arbitrary completions of a low-rank delta (a LoRA), which
  then enter the polar factors; for full-rank deltas the two agree;
- the polar factor is taken on the numerical support of U (and V): where the concatenated
  singular vectors are linearly dependent (two tasks sharing a direction, within data noise)
  the reference's full thin SVD picks arbitrary vectors for the zero singular values; for
  linearly independent columns (the generic full-rank case) both are the same P Q^T;
- the reference pads U to p columns with zeros; ours has exactly K columns (same product);
- floor(p / T) exactly for ``fraction = null`` (the reference's ``int(p * (1 / T))`` can round
  down by one, e.g. p = T = 49 gives 0); a given ``fraction`` counts on its decimal value;
- ``fraction * T > 1`` is allowed (U is then wide and polar(U) a partial isometry); the
  reference fails on a shape mismatch;
- SVDs in float64 (the reference: float32), result cast back to the input dtype; per-task
  ``alpha`` lists are not offered (use the task deltas' own weights upstream).

One task in, ``fraction = 1`` (the default for T = 1): that task's delta back (times scaling).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from starmerge.methods.base import Merged, Param, factor_range, in_range, optional, register_method
from starmerge.methods.footprint import F32, F64, Footprint, MemoryCase
from starmerge.tensors.delta import Delta, Dense, LowRank
from starmerge.tensors.lowrank_svd import delta_svd
from starmerge.tensors.sparsify import keep_count
from starmerge.tensors.spectral import numerical_rtol, orthonormal_factor


def data_dtype(deltas: Sequence[Delta]) -> torch.dtype:
    """The precision the data came in (sets noise cut-offs): float64 if all are, else float32."""
    return torch.float64 if all(d.dtype == torch.float64 for d in deltas) else torch.float32


def matrix_form(deltas: Sequence[Delta]) -> tuple[list[Delta], bool]:
    """All ``LowRank`` stay factored; otherwise every delta as ``Dense`` (float32/float64).

    Returns:
        The deltas and whether they are all ``LowRank``.
    """
    if all(isinstance(d, LowRank) for d in deltas):
        return list(deltas), True
    dtype = data_dtype(deltas)
    return [d if isinstance(d, Dense) else Dense(d.to_dense(dtype)) for d in deltas], False


def polar(x: Tensor, data: torch.dtype) -> Tensor:
    """The orthogonal polar factor ``P Q^T`` of ``x`` ``(m, K)`` on its numerical support.

    From ``X = Q R`` (thin, :func:`~starmerge.tensors.spectral.orthonormal_factor`) and the
    SVD of the small ``R``: O(m K^2) like a thin SVD of X, but faster. Singular values at or
    below ``max(m, K) * eps(data) * sigma_max`` are dropped, so directions that are linearly
    dependent within the data's noise are merged, not blown up.

    Example:
        >>> polar(torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=torch.float64), torch.float32)
        tensor([[1., 0.],
                [0., 1.]], dtype=torch.float64)
    """
    m, k = x.shape
    if m < k:  # wide: polar(X) = polar(X^T)^T
        return polar(x.T, data).T
    q, r = orthonormal_factor(x.to(torch.float64)[None])  # (1, m, p), (1, p, K): X = Q R
    p_r, sigma, qh = torch.linalg.svd(r[0], full_matrices=False)  # R = P_r Sigma Q^T
    keep = int((sigma > numerical_rtol((m, k), data) * sigma[0]).sum()) if sigma.numel() else 0
    return q[0] @ (p_r[:, :keep] @ qh[:keep])  # (m, K) = (Q P_r) Q^T on the support


def spectral_result(b: Tensor, a: Tensor, *, lowrank: bool, dtype: torch.dtype) -> Delta:
    """The merged matrix ``b @ a`` (``(m, K)``, ``(K, n)``): factored when ``lowrank``.

    ``K = 0`` (every task zero) gives a zero result: rank-0 ``LowRank`` or dense zeros.
    """
    if lowrank:
        return LowRank(b.to(dtype), a.to(dtype), 1.0)
    return Dense((b @ a).to(dtype))  # (m, 0) @ (0, n) is the zero matrix


def average(deltas: Sequence[Delta]) -> Merged:
    """Non-matrix parameters: the plain mean over tasks (float32, float64 kept), input dtype."""
    compute = data_dtype(deltas)
    total = torch.zeros_like(deltas[0].to_dense(compute))
    for d in deltas:
        total += d.to_dense(compute)
    return Merged(Dense((total / len(deltas)).to(deltas[0].dtype)))


def tsv_rank_cap(fraction: float | None, p: int, n_tasks: int) -> int:
    """Per-task rank cap: floor(fraction * p) on fraction's decimal value, or p // T for None.

    Example:
        >>> tsv_rank_cap(None, 10, 3), tsv_rank_cap(0.5, 10, 3)
        (3, 5)
    """
    return p // n_tasks if fraction is None else keep_count(fraction, p)


def _memory(case: MemoryCase) -> Footprint:
    """TSV-M's memory: every task's float64 U and V^T, one SVD's workspace, the polar factors.

    Dense: one task's SVD (its copy, workspace) and the polar factors' QR and SVD (fitted:
    18 k^2 + 4 m n floats) besides the kept triplets; LoRA: the factors' QR and cores.
    """
    if case.lowrank:
        return Footprint(case.factors(4, F64))
    if not case.matrix:
        return Footprint(case.copies(2))
    m, n = case.dims
    k = min(m, n)
    return Footprint(case.n_tasks * F64 * (m * k + k * n) + F32 * (18 * k * k + 4 * m * n))


@register_method(
    "tsv_m",
    params={
        "scaling": Param(1.0, "alpha: multiplies the merged delta", factor_range()),
        "fraction": Param(
            None,
            "share of min(m, n) kept per task (null: 1/T)",
            optional(in_range(0, 1)),
        ),
    },
    accepts=("dense", "lowrank"),
    lowrank_output=True,
    paper="https://arxiv.org/abs/2412.00081",
    memory=_memory,
)
def tsv_m(
    deltas: Sequence[Delta], *, scaling: float = 1.0, fraction: float | None = None
) -> Merged:
    """TSV-M: each task's leading singular triplets, decorrelated by polar factors, summed.

    Args:
        deltas: One delta per task for this parameter (all ``LowRank`` stay factored).
        scaling: Multiplies the merged delta (alpha).
        fraction: Per-task share of min(m, n) kept, in (0, 1]; None: 1/T.

    Returns:
        The merged delta (``LowRank`` of rank sum_t k_t for ``LowRank`` inputs) in the first
        input's dtype, and ``{"kept_ranks": [k_1, ..., k_T]}`` for matrices.

    Example:
        >>> x = Dense(torch.diag(torch.tensor([3.0, 2.0, 1.0])))
        >>> tsv_m([x], fraction=1.0).delta.tensor.diagonal()
        tensor([3., 2., 1.])
    """
    first = deltas[0]
    if len(first.shape) != 2:
        return average(deltas)
    deltas, lowrank = matrix_form(deltas)
    data = data_dtype(deltas)
    cap = tsv_rank_cap(fraction, min(first.shape), len(deltas))
    svds = [delta_svd(d) for d in deltas]  # each at its numerical rank (float64)
    kept = [min(cap, svd.rank) for svd in svds]
    u = torch.cat([svd.u[:, :k] for svd, k in zip(svds, kept, strict=True)], dim=1)  # (m, K)
    s = torch.cat([svd.s[:k] for svd, k in zip(svds, kept, strict=True)])  # (K,)
    vh = torch.cat([svd.vh[:k] for svd, k in zip(svds, kept, strict=True)], dim=0)  # (K, n)
    if sum(kept) > 0:
        u, vh = polar(u, data), polar(vh.T, data).T
    b = u * (s * scaling)  # (m, K): polar(U) S alpha
    merged = spectral_result(b, vh, lowrank=lowrank, dtype=first.dtype)
    return Merged(merged, {"kept_ranks": kept})
