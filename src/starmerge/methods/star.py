"""STAR: Spectral Truncation and Rescale.

Paper: "STAR: Spectral Truncation and Rescale for Model Merging" (Lee, Ko, Pedapati, Chung, Yeh,
Chen; NAACL 2025), https://arxiv.org/abs/2502.10339.

Update rule, per 2-D matrix and task t, with singular values s_1 >= s_2 >= ... of tau_t:
    k_t     = the fewest leading components with cumsum(s)_k >= eta / 100 * sum(s)
    s~_i    = s_i * sum(s) / sum(s[:k_t])                 for i <= k_t (nuclear norm kept)
    tau^_t  = U[:, :k_t] diag(s~) V[:, :k_t]^T
    merged  = (1 / T) * sum_t tau^_t
Parameters that are not 2-D matrices (biases, norms of full fine-tunes) are averaged.

Symbols <-> arguments: eta = eta (the percentage of the nuclear norm kept, in (0, 100]).

Low-rank inputs (LoRA, delta = scale * B A) are handled exactly in factor space: thin QR of B and
A^T, SVD of the small core scale * R_B R_A^T (float64), truncation and rescale there, and the result
stays factored; the average over tasks is the concatenation of the factors (rank sum_t k_t), so
the merge of adapters is itself an adapter. QR/SVD are batched over tasks of equal rank. Dense
matrices get a batched thin SVD (float32; float64 for small matrices or float64 inputs).

Deviations from the reference code (IBM/STAR ``merger/STAR.py star()`` + ``weighted_merge``):
- singular values at or below max(m, n) * eps * s_max (eps of float32, of float64 for float64
  deltas) are treated as 0: the seed code's dense float32 SVD has a noise tail of order
  1e-7 * s_1 that enters sum(s) and the cumulative sums (a relative effect of about 1e-6 on
  small matrices); the factor path has no such tail at all;
- k is clamped to that numerical rank, so eta = 100 returns the delta itself (the seed code's
  ``known_rank`` path crashes on about a quarter of such calls; its dense path keeps noise);
- a zero matrix (e.g. LoRA B still at its zero initialisation) stays zero (k = 0); the seed code
  returns NaN for the whole matrix;
- fp16/bf16 inputs are upcast for the linear algebra (the seed code raises), the result is cast
  back to the input dtype;
- no randomized ``svd_lowrank`` (the seed code's ``known_rank`` path is unseeded, not
  reproducible, and uses one global rank): results are exact and deterministic;
- the matrices of all tasks go through one batched QR/SVD, on the inputs' device.

Separable: the merge is the mean over tasks of :func:`star_transform` (truncate and rescale one
task's matrix, kept as rank-k factors), so sweeps cache it per task and eta.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from starmerge.methods.base import Merged, Param, in_range, register_method
from starmerge.methods.contract import Separable
from starmerge.methods.footprint import F32, F64, Footprint, MemoryCase
from starmerge.tensors.delta import Delta, Dense, LowRank
from starmerge.tensors.spectral import (
    factor_sides,
    numerical_rtol,
    star_dense,
    star_factored,
    star_maps,
)
from starmerge.tensors.threads import split_over_cores

_SMALL = 1 << 16  # matrices with at most this many entries use a float64 SVD


def _dense_compute(delta: Delta) -> torch.dtype:
    """The SVD's dtype: float64 for small matrices and float64 inputs, else float32."""
    small = delta.numel() <= _SMALL or delta.dtype == torch.float64
    return torch.float64 if small else torch.float32


def star_transform(delta: Delta, *, eta: float = 40.0) -> tuple[Delta, dict[str, Any]]:
    """STAR's per-task step: truncate and rescale one task's matrix, kept as rank-k factors.

    The STAR merge is the mean over tasks of this (a non-matrix delta is kept as it is, so
    its mean is STAR's average).

    Args:
        delta: One task's delta for one parameter.
        eta: Percentage of the nuclear norm kept, in (0, 100].

    Returns:
        ``LowRank`` factors (float32, float64 kept) of the truncated and rescaled matrix, and
        ``{"kept_ranks": k}``; a non-matrix delta unchanged and ``{}``.

    Example:
        >>> star_transform(Dense(torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0]))), eta=50.0)[1]
        {'kept_ranks': 2}
    """
    if isinstance(delta, LowRank) and delta.rank == 0:
        return delta, {"kept_ranks": 0}
    if isinstance(delta, LowRank):
        scale = torch.tensor([float(delta.scale)], dtype=torch.float64)
        b_hat, a_hat, k = star_factored(delta.b[None], delta.a[None], scale, eta)
    elif len(delta.shape) == 2:
        x = delta.to_dense(_dense_compute(delta))[None]  # (1, m, n)
        b_hat, a_hat, k = star_dense(x, eta, delta.dtype)
    else:
        return delta, {}
    kept = int(k[0])
    dtype = torch.float64 if delta.dtype == torch.float64 else torch.float32
    factors = LowRank(b_hat[0, :, :kept].to(dtype), a_hat[0, :kept].to(dtype), 1.0)
    return factors, {"kept_ranks": kept}


def _memory(case: MemoryCase) -> Footprint:
    """Dense: the (T, m, n) stack, its batched float32 SVD and the average; LoRA: the factors."""
    if case.lowrank:
        return Footprint(case.factors(1, F64))
    if not case.matrix:
        return Footprint(case.copies(2))
    return Footprint(case.copies(case.n_tasks + 1) + case.svd(F32, batch=case.n_tasks))


@register_method(
    "star",
    params={"eta": Param(40.0, "eta: % of each matrix's nuclear norm kept", in_range(0, 100))},
    accepts=("dense", "lowrank"),
    lowrank_output=True,
    paper="https://arxiv.org/abs/2502.10339",
    separable=Separable(star_transform, "mean"),
    memory=_memory,
)
def star(deltas: Sequence[Delta], *, eta: float = 40.0) -> Merged:
    """STAR: truncate each task's spectrum to eta % of its nuclear norm, rescale, average.

    Args:
        deltas: One delta per task for this parameter, all ``Dense`` or all ``LowRank``.
        eta: Percentage of the nuclear norm kept per matrix and task, in (0, 100].

    Returns:
        The merged delta (``LowRank`` of rank sum_t k_t for ``LowRank`` inputs) in the first
        input's dtype, and ``{"kept_ranks": [k_1, ..., k_T]}`` for matrices.

    Example:
        >>> x = Dense(torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0])))
        >>> star([x], eta=50.0).stats
        {'kept_ranks': [2]}
    """
    if all(isinstance(d, LowRank) for d in deltas):
        return _star_lowrank(deltas, eta)  # type: ignore[arg-type]
    if len(deltas[0].shape) != 2:
        return _average(deltas)
    return _star_dense(deltas, eta)


def _star_lowrank(deltas: Sequence[LowRank], eta: float) -> Merged:
    """Factor-space STAR, batched over tasks of equal rank; the average is a concatenation.

    Each factor's Gram is accumulated in float64 from the factor itself by cache-sized blocks
    (:func:`~starmerge.tensors.spectral.factor_sides`); float64 stacks of the group are formed
    only when some factor is ill conditioned (Householder QR). The maps of :func:`star_maps`
    (the mean's 1/T folded in) are applied to each task's own factors for its kept columns
    only, straight into the merged factors: ``A`` row blocks, and ``B`` as ``B^T`` row blocks
    (``left^T b^T``: MKL's fast layout for a tall factor times a few columns, about 5x
    ``b @ left`` here).
    """
    n_tasks, first = len(deltas), deltas[0]
    (m, n), device = first.shape, first.b.device
    apply = torch.float64 if first.dtype == torch.float64 else torch.float32
    rtol = numerical_rtol((m, n), first.dtype)
    kept: list[int] = [0] * n_tasks
    maps: list[tuple[torch.Tensor, bool, torch.Tensor, bool] | None] = [None] * n_tasks
    for rank in sorted({d.rank for d in deltas if d.rank > 0}):
        tasks = [t for t, d in enumerate(deltas) if d.rank == rank]
        group = [deltas[t] for t in tasks]
        side_b, side_a = factor_sides([d.b for d in group], [d.a.mT for d in group])
        scales = torch.tensor([float(d.scale) / n_tasks for d in group], dtype=torch.float64)
        left, left_small, right, right_small, k = star_maps(side_b, side_a, scales, eta, rtol)
        for i, t in enumerate(tasks):
            kept[t] = c = int(k[i])
            maps[t] = (left[i, :, :c].mT, left_small, right[i, :c], right_small)
    b_t = torch.empty(sum(kept), m, dtype=apply, device=device)  # B^T of the merge
    a_cat = torch.empty(sum(kept), n, dtype=apply, device=device)
    starts = [sum(kept[:t]) for t in range(n_tasks)]

    def fill(tasks: Sequence[int]) -> None:
        for t in tasks:
            found = maps[t]
            if found is None or kept[t] == 0:
                continue
            left_t, left_small, right, right_small = found
            rows = slice(starts[t], starts[t] + kept[t])
            if left_small:
                torch.mm(left_t.to(apply), deltas[t].b.to(apply).mT, out=b_t[rows])
            else:
                b_t[rows] = left_t
            if right_small:
                torch.mm(right.to(apply), deltas[t].a.to(apply), out=a_cat[rows])
            else:
                a_cat[rows] = right

    split_over_cores(fill, n_tasks, sum(d.b.numel() + d.a.numel() for d in deltas))
    merged = LowRank(b_t.mT.to(first.dtype), a_cat.to(first.dtype), 1.0)
    return Merged(merged, {"kept_ranks": kept})


def _star_dense(deltas: Sequence[Delta], eta: float) -> Merged:
    """Dense STAR: one batched thin SVD over the tasks, then a single GEMM for the average."""
    first = deltas[0]
    x = torch.stack([d.to_dense(_dense_compute(first)) for d in deltas])  # (T, m, n)
    b_hat, a_hat, k = star_dense(x, eta, first.dtype)
    kept = [int(v) for v in k]
    b_cat = torch.cat([b_hat[t, :, :kt] for t, kt in enumerate(kept)], dim=1)  # (m, sum k)
    a_cat = torch.cat([a_hat[t, :kt] for t, kt in enumerate(kept)], dim=0)  # (sum k, n)
    merged = (b_cat @ a_cat) / len(deltas)
    return Merged(Dense(merged.to(first.dtype)), {"kept_ranks": kept})


def _average(deltas: Sequence[Delta]) -> Merged:
    """Non-matrix parameters: the plain mean over tasks."""
    total = torch.zeros_like(deltas[0].to_dense(torch.float32))
    for d in deltas:
        total += d.to_dense(torch.float32)
    return Merged(Dense((total / len(deltas)).to(deltas[0].dtype)))
