"""Iso-C and Iso-CTS: isotropic merging in the common (and task-specific) subspaces.

Paper: "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces"
(Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer; ICML 2025),
https://arxiv.org/abs/2502.04959.

Update rules, per 2-D parameter with task deltas tau_t, T tasks, S = sum_t tau_t and its thin
SVD at the numerical support S = U diag(s_1..s_rho) V^T (rho = the numerical rank of S):
- ``iso_c``:   merged = scaling * mean(s_1..s_rho) * U V^T
- ``iso_cts``: sizes  c = floor(common_fraction * rho); d = round((rho - c) / T) (the
               reference's rounding), lowered by one if T * d > rho; c = rho - T * d;
               common: U_c, s_c, V_c = the leading c triplets of S;
               task t: the leading k_t = min(d, numerical rank) triplets U_t, s_t, V_t of
                       tau_t - U_c U_c^T tau_t (tau_t with the common space projected out);
               U = [U_1 .. U_T, U_c], V likewise, sigma = the K kept values (K = c + sum k_t);
               merged = scaling * mean(sigma) * polar(U) polar(V)^T, polar(X) = P Q^T for
               X = P Sigma Q^T (see :func:`starmerge.methods.tsv_m.polar`).
Parameters that are not 2-D matrices are averaged over the tasks.

Symbols <-> arguments: scaling = alpha (the paper's and FusionBench's ``scaling_factor``);
common_fraction = FusionBench's ``common_space_fraction`` (default 0.8, the reference's).

LoRA inputs (tau_t = s_t B_t A_t) never form an m x n matrix: the SVD of S comes from the
concatenated factors (:func:`~starmerge.tensors.lowrank_svd.lowrank_sum_svd`, cost
O((m + n) R^2) with R = sum_t r_t), the projected task deltas stay factored
((B_t - U_c U_c^T B_t) A_t), and the result is ``LowRank`` of rank rho (Iso-C) or K (Iso-CTS):
an exact adapter. Dense inputs give a dense result.

Deviations from the reference code (FusionBench ``iso_c`` / ``iso_cts`` in
``fusion_bench/method/isotropic_merging/iso_utils.py``, identical to the authors' iso-merging
``src/utils/iso.py``):
- every size is a fraction of rho, not of min(m, n), and only singular values above the
  numerical cut-off (``max(m, n) * eps * s_max``, eps of float32, of float64 for float64 data)
  enter: the reference's Iso-C averages all min(m, n) singular values, which for a low-rank S
  (LoRA) averages in zeros and multiplies arbitrary null-space directions; for full-rank S both
  agree;
- singular values of S count only above ``max(m, n) * eps * max_t ||tau_t||_F`` too, and a
  task's residual directions only above ``max(m, n) * eps * ||tau_t||_F`` (the reference takes
  d directions even of a zero residual), so k_t may be below d and tasks that cancel give 0;
- the reference's sizes can go negative (c < 0 when T * d > min(m, n)); ours lower d instead;
- c counts ``common_fraction`` on its decimal value; SVDs in float64 (the reference: float32);
- polar factors on their numerical support (as in :mod:`starmerge.methods.tsv_m`).

Properties: one task in, ``iso_c`` gives the task's flat spectrum and ``iso_cts`` equals
``iso_c`` (the common and residual parts span the task's support); ``common_fraction = 1``
gives ``iso_c``; all-zero or cancelling tasks give a zero (rank-0) result.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from starmerge.methods.base import Merged, Param, factor_range, in_range, register_method
from starmerge.methods.footprint import F32, F64, Footprint, MemoryCase
from starmerge.methods.tsv_m import average, data_dtype, matrix_form, polar, spectral_result
from starmerge.tensors.delta import Delta, LowRank
from starmerge.tensors.factors import sq_frobenius
from starmerge.tensors.lowrank_svd import ThinSVD, dense_svd, lowrank_sum_svd
from starmerge.tensors.spaces import singular_basis
from starmerge.tensors.sparsify import keep_count
from starmerge.tensors.spectral import numerical_rtol


def above(svd: ThinSVD, cut: float) -> ThinSVD:
    """The triplets of ``svd`` whose singular value exceeds ``cut``."""
    keep = int((svd.s > cut).sum())
    return ThinSVD(svd.u[:, :keep], svd.s[:keep], svd.vh[:keep])


def input_cut(deltas: Sequence[Delta], data: torch.dtype) -> float:
    """Noise level of the inputs: ``max(m, n) * eps * max_t ||tau_t||_F``.

    A sum or a residual whose singular values are all below it is rounding noise (tasks that
    cancel, a task inside the common space), however large its values are relative to its own.
    """
    norm = max(sq_frobenius(d) for d in deltas) ** 0.5
    return numerical_rtol(deltas[0].shape, data) * norm


def sum_svd(
    deltas: Sequence[Delta], lowrank: bool, data: torch.dtype, vectors: torch.dtype = torch.float64
) -> ThinSVD:
    """Thin SVD of the sum of the task deltas at its numerical rank (float64).

    ``vectors``: the dtype of U and V^T from LoRA factors (see :func:`factored_sum_svd`).
    """
    if lowrank:
        svd = factored_sum_svd(deltas, vectors)  # type: ignore[arg-type]
    else:
        total = torch.zeros(deltas[0].shape, dtype=torch.float64, device=deltas[0].device)
        for d in deltas:
            total += d.to_dense(torch.float64)
        svd = dense_svd(total, data_dtype=data)
    return above(svd, input_cut(deltas, data))


def factored_sum_svd(deltas: Sequence[LowRank], vectors: torch.dtype = torch.float64) -> ThinSVD:
    """Thin SVD of ``sum_t s_t B_t A_t`` at its numerical rank, from the stacked factors (float64).

    :func:`~starmerge.tensors.lowrank_svd.lowrank_sum_svd` (same cut-off, same result to float64
    rounding) without forming the orthonormal bases of the stacked factors: with
    ``B = U_B C_B`` and ``A^T = U_A C_A`` (:func:`~starmerge.tensors.spaces.singular_basis`,
    ``U_B = B M_B`` left unformed) and the SVD ``C_B C_A^T = W diag(s) Z^T`` of the R x R core,
    ``U = B (M_B W)`` and ``V = A^T (M_A Z)``: one tall product per side instead of three.
    ``vectors=float32`` forms those two products from the float32 factors (float32 GEMMs, half
    the cost; U and V then orthonormal to float32 rounding), for a caller that only outputs
    them; the bases, the core and the singular values stay float64.
    """
    m, n = deltas[0].shape
    live = [d for d in deltas if d.rank > 0]
    if not live:
        return lowrank_sum_svd(deltas)  # the rank-0 SVD
    data = torch.float64 if any(d.dtype == torch.float64 for d in deltas) else torch.float32
    b = torch.cat([d.b.to(torch.float64) * float(d.scale) for d in live], dim=1)  # (m, R)
    a = torch.cat([d.a.to(torch.float64) for d in live], dim=0)  # (R, n)
    b_base, to_b, c_b = singular_basis(b, 0.0)  # U_B = b_base @ to_b, C_B = U_B^T B
    a_t = a.T  # (n, R)
    a_base, to_a, c_a = singular_basis(a_t, 0.0)
    w, s, zh = torch.linalg.svd(c_b @ c_a.T, full_matrices=False)
    top = float(s[0]) if s.numel() else 0.0
    keep = int((s > numerical_rtol((m, n), data) * top).sum()) if top > 0 else 0
    to_u, to_v = to_b @ w[:, :keep], to_a @ zh[:keep].T  # (R, rho): U = b_base @ to_u
    if vectors == torch.float32 and b_base is b and a_base is a_t:  # the Gram route, both sides
        b32 = torch.cat([d.b.to(torch.float32) * float(d.scale) for d in live], dim=1)
        a32 = torch.cat([d.a.to(torch.float32) for d in live], dim=0)
        return ThinSVD(b32 @ to_u.to(torch.float32), s[:keep], to_v.T.to(torch.float32) @ a32)
    return ThinSVD(b_base @ to_u, s[:keep], (a_base @ to_v).T)  # (m, rho), (rho,), (rho, n)


def iso_sizes(rho: int, n_tasks: int, common_fraction: float) -> tuple[int, int]:
    """Common-space size c and per-task size d, with c + T * d = rho where possible.

    Example:
        >>> iso_sizes(10, 3, 0.8)  # c = 8, round(2 / 3) = 1 per task, so c = 7
        (7, 1)
    """
    common = keep_count(common_fraction, rho)
    per_task = round((rho - common) / n_tasks)  # the reference's (banker's) rounding
    if per_task * n_tasks > rho:
        per_task -= 1
    return rho - per_task * n_tasks, per_task


def residual_svd(delta: Delta, u_c: torch.Tensor, data: torch.dtype) -> ThinSVD:
    """Thin SVD of ``(I - U_c U_c^T) delta``, at the cut-off relative to ``||delta||_F``."""
    if isinstance(delta, LowRank):
        b = delta.b.to(torch.float64) * float(delta.scale)  # (m, r)
        b = b - u_c @ (u_c.T @ b)  # the projection stays on the left factor
        svd = lowrank_sum_svd([LowRank(b, delta.a.to(torch.float64), 1.0)])
    else:
        x = delta.to_dense(torch.float64)
        svd = dense_svd(x - u_c @ (u_c.T @ x), data_dtype=data)
    return above(svd, input_cut([delta], data))


def _iso_c_memory(case: MemoryCase) -> Footprint:
    """Dense: S in float64 and its float64 SVD; LoRA: the factors' QR and the core's SVD."""
    if case.lowrank:
        return Footprint(case.factors(3.5, F64))
    if not case.matrix:
        return Footprint(case.copies(2))
    return Footprint(case.copies(2) + case.svd(F64))


@register_method(
    "iso_c",
    params={"scaling": Param(1.0, "alpha: multiplies the merged delta", factor_range())},
    accepts=("dense", "lowrank"),
    lowrank_output=True,
    paper="https://arxiv.org/abs/2502.04959",
    memory=_iso_c_memory,
)
def iso_c(deltas: Sequence[Delta], *, scaling: float = 1.0) -> Merged:
    """Iso-C: the sum of the task deltas with its spectrum flattened to the mean.

    Args:
        deltas: One delta per task for this parameter (all ``LowRank`` stay factored).
        scaling: Multiplies the merged delta (alpha).

    Returns:
        The merged delta (``LowRank`` of rank rho for ``LowRank`` inputs) in the first input's
        dtype, and ``{"rank": rho}`` for matrices.

    Example:
        >>> from starmerge.tensors.delta import Dense
        >>> iso_c([Dense(torch.diag(torch.tensor([3.0, 1.0])))]).delta.tensor
        tensor([[2., 0.],
                [0., 2.]])
    """
    first = deltas[0]
    if len(first.shape) != 2:
        return average(deltas)
    deltas, lowrank = matrix_form(deltas)
    data = data_dtype(deltas)
    svd = sum_svd(deltas, lowrank, data, vectors=data)  # U, V^T are only output
    level = svd.s.mean() * scaling if svd.rank else 0.0
    merged = spectral_result(svd.u * level, svd.vh, lowrank=lowrank, dtype=first.dtype)
    return Merged(merged, {"rank": svd.rank})


def _iso_cts_memory(case: MemoryCase) -> Footprint:
    """Iso-CTS's memory: S's SVD, each residual's SVD and the polar factors (float64).

    Dense: per task the residual's U and V^T stay (sliced views), with one SVD's workspace and
    the polar factors' (fitted: 20 k^2 + 6 m n floats). LoRA, in float64 copies of the stacked
    factors: the sum's U and V^T (1), every task's residual U and V^T (1 together), their
    concatenation (1), the two polar factors with their SVDs (3) and the scaled B (0.5).
    """
    if case.lowrank:
        return Footprint(case.factors(6.5, F64))
    if not case.matrix:
        return Footprint(case.copies(2))
    m, n = case.dims
    k = min(m, n)
    return Footprint(case.n_tasks * F64 * (m * k + k * n) + F32 * (20 * k * k + 6 * m * n))


@register_method(
    "iso_cts",
    params={
        "scaling": Param(1.0, "alpha: multiplies the merged delta", factor_range()),
        "common_fraction": Param(
            0.8,
            "share of the sum's rank given to the common subspace",
            in_range(0, 1, lo_open=False),
        ),
    },
    accepts=("dense", "lowrank"),
    lowrank_output=True,
    paper="https://arxiv.org/abs/2502.04959",
    memory=_iso_cts_memory,
)
def iso_cts(
    deltas: Sequence[Delta], *, scaling: float = 1.0, common_fraction: float = 0.8
) -> Merged:
    """Iso-CTS: common and task-specific subspaces, decorrelated, with a flat spectrum.

    Args:
        deltas: One delta per task for this parameter (all ``LowRank`` stay factored).
        scaling: Multiplies the merged delta (alpha).
        common_fraction: Share of the sum's numerical rank rho for the common subspace.

    Returns:
        The merged delta (``LowRank`` of rank K = c + sum_t k_t for ``LowRank`` inputs) in the
        first input's dtype, and ``{"common_rank": c, "task_ranks": [k_1, ..., k_T]}``.

    Example:
        >>> from starmerge.tensors.delta import Dense
        >>> iso_cts([Dense(torch.diag(torch.tensor([3.0, 1.0])))]).delta.tensor
        tensor([[2., 0.],
                [0., 2.]])
    """
    first = deltas[0]
    if len(first.shape) != 2:
        return average(deltas)
    deltas, lowrank = matrix_form(deltas)
    data = data_dtype(deltas)
    total = sum_svd(deltas, lowrank, data)
    common, per_task = iso_sizes(total.rank, len(deltas), common_fraction)
    u_c = total.u[:, :common]  # (m, c)
    parts = [ThinSVD(u_c, total.s[:common], total.vh[:common])]
    if per_task > 0:
        for d in deltas:
            res = residual_svd(d, u_c, data)
            parts.append(ThinSVD(res.u[:, :per_task], res.s[:per_task], res.vh[:per_task]))
    u = torch.cat([p.u for p in parts], dim=1)  # (m, K)
    s = torch.cat([p.s for p in parts])  # (K,)
    vh = torch.cat([p.vh for p in parts], dim=0)  # (K, n)
    b = u
    if s.numel():
        u, vh = polar(u, data), polar(vh.T, data).T
        b = u * (s.mean() * scaling)  # flat spectrum
    merged = spectral_result(b, vh, lowrank=lowrank, dtype=first.dtype)
    task_ranks = [p.rank for p in parts[1:]] or [0] * len(deltas)
    return Merged(merged, {"common_rank": common, "task_ranks": task_ranks})
