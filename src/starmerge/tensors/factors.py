"""Linear algebra on low-rank factors (no densifying)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from starmerge.errors import InputError
from starmerge.tensors.delta import Delta, Dense, LowRank
from starmerge.tensors.threads import one_thread


def concat_lowrank(deltas: Sequence[LowRank], weights: Sequence[float]) -> LowRank:
    """Exactly ``sum_t weights[t] * deltas[t]`` as one ``LowRank`` of rank ``sum_t r_t``.

    Each task's scale and weight are folded into its ``b`` block, so the result has scale 1.
    Computed in float32 (float64 kept) and returned in the first delta's dtype.

    Example:
        >>> x = LowRank(torch.ones(3, 1), torch.ones(1, 2), 2.0)
        >>> concat_lowrank([x, x], [0.5, 0.5]).to_dense()[0, 0].item()
        2.0
    """
    out_dtype = deltas[0].dtype
    compute = torch.float64 if out_dtype == torch.float64 else torch.float32
    pairs = zip(deltas, weights, strict=True)
    bs = [d.b.to(compute) * (d.scale * w) for d, w in pairs]  # (out, r_t)
    as_ = [d.a.to(compute) for d in deltas]  # (r_t, in)
    return LowRank(torch.cat(bs, dim=1).to(out_dtype), torch.cat(as_, dim=0).to(out_dtype), 1.0)


def sq_frobenius(delta: Delta) -> float:
    """``||delta||_F^2`` in float64; for ``LowRank`` from the factors, without densifying.

    ``||s B A||_F^2 = s^2 * sum((B^T B) * (A A^T))``: two ``(r, r)`` Grams, O((m + n) r^2).

    Example:
        >>> sq_frobenius(LowRank(torch.ones(3, 1), torch.ones(1, 2), 2.0))
        24.0
    """
    if isinstance(delta, Dense):
        x = delta.tensor.to(torch.float64)
        return float((x * x).sum())
    if delta.rank == 0:
        return 0.0
    with one_thread():  # tall-skinny float64 GEMMs: 2 threads are ~25x slower on a busy machine
        b, a = delta.b.to(torch.float64), delta.a.to(torch.float64)
        gram_b = b.T @ b  # (r, r)
        gram_a = a @ a.T  # (r, r)
        return float(delta.scale) ** 2 * float((gram_b * gram_a).sum())


def truncated_svd(x: torch.Tensor, rank: int) -> tuple[LowRank, float]:
    """The best rank-``rank`` approximation of matrix ``x`` ``(m, n)``, and the energy it keeps.

    Energy: the kept fraction of ``sum(s^2)`` (1.0 for a zero matrix). Computed in float32.
    The kept rows of ``V^T`` are copied, so the full SVD's buffers are freed on return.

    Example:
        >>> low, energy = truncated_svd(torch.diag(torch.tensor([3.0, 1.0])), 1)
        >>> low.rank, round(energy, 2)
        (1, 0.9)
    """
    u, s, vh = torch.linalg.svd(x.to(torch.float32), full_matrices=False)
    k = min(rank, s.numel())
    total = float((s**2).sum())
    energy = float((s[:k] ** 2).sum()) / total if total > 0 else 1.0
    return LowRank(u[:, :k] * s[:k], vh[:k].clone(), 1.0), energy  # (m, k), (k, n)


def as_lowrank(key: str, delta: Delta, rank: int | None) -> tuple[LowRank, float | None]:
    """A merged delta as ``LowRank`` for adapter output, and the SVD energy kept (or None).

    A dense matrix is truncated by SVD to ``rank`` (:func:`truncated_svd`).

    Raises:
        InputError: ``key`` is not a matrix, or is dense and no ``rank`` is given.
    """
    if isinstance(delta, LowRank):
        return delta, None
    if delta.tensor.ndim != 2:
        raise InputError(
            f"{key} is not a matrix, so it cannot go into an adapter; use output.format: model"
        )
    if rank is None:
        raise InputError(f"the merge of {key} is dense; set output.rank for adapter output")
    return truncated_svd(delta.tensor, rank)
