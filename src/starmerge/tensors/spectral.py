"""Spectral truncation and rescale (STAR's per-matrix step), dense or in factor space.

All functions are batched over a leading task axis: ``torch.linalg.qr``/``svd`` run once per
group of same-shape inputs, which is what makes the GPU (and the CPU's LAPACK) fast here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from starmerge.tensors.threads import split_over_cores


def numerical_rtol(shape: tuple[int, ...], dtype: torch.dtype) -> float:
    """Relative cut-off below which singular values are noise: ``max(m, n) * eps``.

    ``eps`` is float32's, or float64's for float64 data: the noise floor is set by the precision
    the delta was stored or formed in (a float32 ``B @ A`` is full rank at 1e-7), not by the
    precision of the SVD. Half-precision data uses float32's eps (its own would cut everything).
    """
    data = torch.float64 if dtype == torch.float64 else torch.float32
    return max(shape[-2:]) * torch.finfo(data).eps


def eta_ranks(s: Tensor, eta: float, rtol: float) -> Tensor:
    """Fewest leading components carrying ``eta`` % of the nuclear norm, per batch row.

    Singular values at or below ``rtol * s_max`` count as 0 (they are rounding noise), so ``k``
    never exceeds the numerical rank, ``eta = 100`` keeps exactly the numerical rank, and a zero
    matrix gets ``k = 0``.

    Args:
        s: ``(batch, p)`` singular values, descending.
        eta: Percentage of the nuclear norm to keep, in (0, 100].
        rtol: Relative noise cut-off (see :func:`numerical_rtol`).

    Returns:
        ``(batch,)`` int64 kept ranks.

    Example:
        >>> eta_ranks(torch.tensor([[4.0, 3.0, 2.0, 1.0]]), 50.0, 1e-6)
        tensor([2])
    """
    signal = s > rtol * s[..., :1]  # (batch, p); all False for a zero matrix
    s = torch.where(signal, s, torch.zeros_like(s))
    target = s.sum(dim=-1, keepdim=True) * eta / 100  # same order of operations as the seed code
    k = (s.cumsum(dim=-1) < target).sum(dim=-1) + 1  # searchsorted(left) + 1
    return torch.minimum(k, signal.sum(dim=-1))


def rescaled(s: Tensor, k: Tensor, rtol: float) -> Tensor:
    """Keep the first ``k`` values of each row, scaled so the row keeps its nuclear norm.

    Args:
        s: ``(batch, p)`` singular values, descending.
        k: ``(batch,)`` kept ranks from :func:`eta_ranks`.
        rtol: The cut-off used for ``k`` (noise values do not count in the norm).

    Returns:
        ``(batch, p)``: ``s_i * sum(s) / sum(s[:k])`` for ``i < k``, else 0 (all 0 when k = 0).
    """
    s = torch.where(s > rtol * s[..., :1], s, torch.zeros_like(s))
    kept = torch.arange(s.shape[-1], device=s.device) < k[:, None]  # (batch, p)
    s_kept = torch.where(kept, s, torch.zeros_like(s))
    norm_kept = s_kept.sum(dim=-1, keepdim=True)
    factor = s.sum(dim=-1, keepdim=True) / torch.where(norm_kept > 0, norm_kept, 1.0)
    return s_kept * factor


def star_factored(
    b: Tensor, a: Tensor, scales: Tensor, eta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """STAR on ``scale_t * b_t @ a_t`` exactly, without forming the matrices.

    With ``b = Q_B R_B`` and ``a^T = Q_A R_A``, ``delta = Q_B (scale R_B R_A^T) Q_A^T``; the SVD
    of the small core ``C = U_c diag(s) V_c^T`` is then the exact thin SVD of delta (the other
    singular values are exactly 0). The Grams, eigendecompositions and the core's SVD run in
    float64 (O((m + n) r^2) work on the factors, :func:`star_maps`); ``Q`` is never formed: for
    the usual well-conditioned factor ``Q_B = b F`` with a small ``F``
    (:func:`factor_transform`), so ``b_hat = b (F U_c s~)`` and ``a_hat = (V_c^T G^T) a`` are
    one GEMM each, in the factors' own precision (float32; float64 kept), with the r x r
    products folded first.

    Args:
        b: ``(T, m, r)`` left factors.
        a: ``(T, r, n)`` right factors.
        scales: ``(T,)`` LoRA scales.
        eta: Percentage of the nuclear norm to keep.

    Returns:
        ``(b_hat (T, m, c), a_hat (T, c, n), k (T,))`` with ``b_hat_t[:, :k_t] @ a_hat_t[:k_t]``
        the truncated, rescaled delta (columns beyond ``k_t`` are zero in ``b_hat``).
    """
    apply = torch.float64 if b.dtype == torch.float64 else torch.float32
    rtol = numerical_rtol((b.shape[1], a.shape[2]), b.dtype)
    sides = factor_sides(list(b), list(a.mT))
    left, left_small, right, right_small, k = star_maps(*sides, scales, eta, rtol)
    b_hat = b.to(apply) @ left.to(apply) if left_small else left
    a_hat = right.to(apply) @ a.to(apply) if right_small else right
    return b_hat, a_hat, k


StarMaps = tuple[Tensor, bool, Tensor, bool, Tensor]
Side = tuple[Tensor | tuple[Tensor], Tensor]  # factor_transform's (F or (Q,), R)


def star_maps(side_b: Side, side_a: Side, scales: Tensor, eta: float, rtol: float) -> StarMaps:
    """STAR's truncated, rescaled factors of ``scale_t * b_t @ a_t`` as maps of the factors.

    Returns ``(left, left_small, right, right_small, k)``: when ``left_small``, ``left`` is a
    ``(T, r, c)`` float64 matrix and ``b_hat_t = b_t @ left_t`` (the Gram route); otherwise
    ``left`` is ``b_hat`` ``(T, m, c)`` itself (the QR route). Likewise ``a_hat_t =
    right_t @ a_t`` ``(T, c, r)`` when ``right_small``, else ``right`` is ``a_hat``. A caller
    applies them to the factors in their own precision, to the kept columns only if it likes.

    Args:
        side_b: :func:`factor_transform` of the ``(T, m, r)`` left factors (float64).
        side_a: :func:`factor_transform` of the transposed right factors ``(T, n, r)``.
        scales: ``(T,)`` LoRA scales.
        eta: Percentage of the nuclear norm to keep.
        rtol: The noise cut-off (:func:`numerical_rtol` of the data's dtype).
    """
    (fb, r_b), (fa, r_a) = side_b, side_a  # Q_B = b64 @ fb (a tuple: Householder Q), (T, p, r)
    core = scales.to(r_b)[:, None, None] * (r_b @ r_a.mT)  # (T, p, q)
    u_c, s, vh_c = torch.linalg.svd(core, full_matrices=False)  # (T, p, c), (T, c), (T, c, q)
    k = eta_ranks(s, eta, rtol)
    left = u_c * rescaled(s, k, rtol)[:, None, :]  # (T, p, c)
    b_small, a_small = isinstance(fb, Tensor), isinstance(fa, Tensor)
    left = fb @ left if b_small else fb[0] @ left  # (T, r, c) or b_hat (T, m, c)
    right = vh_c @ (fa if a_small else fa[0]).mT  # (T, c, r) or a_hat (T, c, n) = (Q_A V_c)^T
    return left, b_small, right, a_small, k


def factor_transform(x: Tensor) -> Side:
    """``x = Q R`` with orthonormal ``Q``, given as ``Q = x @ F`` when ``x`` is well conditioned.

    Returns ``(F, R)`` on the Gram route (see :func:`orthonormal_factor`), else ``((Q,), R)``
    from Householder QR (a 1-tuple, so callers tell the two apart).
    """
    found = gram_factor(x.mT @ x)  # (T, r, r)
    return found if found is not None else householder(x)


def factor_sides(bs: Sequence[Tensor], a_ts: Sequence[Tensor]) -> tuple[Side, Side]:
    """:func:`factor_transform` of the stacked tall factors ``b_t`` and ``a_t^T``, ``(m, r)`` each.

    Every Gram comes from :func:`gram_into` (no float64 copy of a factor), the groups' Grams
    split over two cores (:func:`~starmerge.tensors.threads.split_over_cores`), and both sides
    share one batched ``eigh``; a side with an ill-conditioned member is redone by Householder
    QR of its float64 stack. All factors share one rank r.
    """
    factors, n_b = [*bs, *a_ts], len(bs)
    rank, device = factors[0].shape[1], factors[0].device
    grams = torch.empty(len(factors), rank, rank, dtype=torch.float64, device=device)
    step = max(1, min(max(x.shape[0] for x in factors), _GRAM_BLOCK // max(rank, 1)))

    def fill(members: Sequence[int]) -> None:
        buf = torch.empty(rank, step, dtype=torch.float64, device=device)
        for i in members:
            gram_into(factors[i], grams[i], buf)

    split_over_cores(fill, len(factors), sum(x.numel() for x in factors))
    both = gram_factor(grams)
    if both is not None:
        f, r = both
        return (f[:n_b], r[:n_b]), (f[n_b:], r[n_b:])
    sides = []
    for half in (slice(0, n_b), slice(n_b, len(factors))):
        found = gram_factor(grams[half])
        if found is None:
            found = householder(torch.stack([x.to(torch.float64) for x in factors[half]]))
        sides.append(found)
    return sides[0], sides[1]


_GRAM_BLOCK = 1 << 16  # float64 entries per Gram block: 512 KiB, within a core's 1 MiB L2 cache


def householder(x: Tensor) -> Side:
    """:func:`factor_transform`'s QR route: ``((Q,), R)`` by Householder QR, exact for any ``x``."""
    q, r = torch.linalg.qr(x)
    return (q,), r


def gram_factor(gram: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(F, R)`` with ``x = (x F) R``, ``x F`` orthonormal, from ``gram = x^T x`` ``(T, r, r)``.

    None when some member is not well conditioned (then only Householder QR of ``x`` is exact).
    """
    eig, w = torch.linalg.eigh(gram)  # ascending
    top = eig[..., -1]
    if bool(((top > 0) & (eig[..., 0] > top * _GRAM_MIN_EIG_RATIO)).all()):
        root = eig.sqrt()  # (T, r)
        return w / root[..., None, :], root[..., :, None] * w.mT
    return None


def gram_into(x: Tensor, out: Tensor, buf: Tensor) -> Tensor:
    """``out = x^T x`` in float64 for a tall ``x`` ``(m, r)`` of any float dtype and layout.

    ``x`` is taken ``buf.shape[1]`` rows at a time: each block is rounded into ``buf`` ``(r,
    step)`` float64, transposed, so that the product is ``buf @ buf^T``, the layout MKL's small
    GEMMs run fastest in (about 15 % over ``block^T @ block`` here), and the block stays in
    cache: no float64 copy of ``x`` is ever written to memory (the same Gram as
    ``x64^T x64``).
    """
    out.zero_()
    step = buf.shape[1]
    for i in range(0, x.shape[0], step):
        block = buf[:, : min(step, x.shape[0] - i)]
        block.copy_(x[i : i + step].mT)
        out.addmm_(block, block.mT)
    return out


# Gram route only when every factor's singular values lie within a factor 1e3 of each other:
# Q's orthonormality error is then about eps64 * cond^2 = 2e-10, far below float32 data noise.
_GRAM_MIN_EIG_RATIO = 1e-6


def orthonormal_factor(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x = q @ s`` with ``q`` orthonormal columns, for tall ``x`` ``(T, m, r)`` in float64.

    Well-conditioned batches (the usual LoRA factor) take the Gram route: ``x^T x = W L W^T``,
    ``s = sqrt(L) W^T``, ``q = x W / sqrt(L)``, a few r x r operations and one GEMM, about four
    times faster than Householder QR here. Any ill-conditioned or rank-deficient member sends the
    batch to ``torch.linalg.qr``, which is exact for every input.

    Example:
        >>> x = torch.randn(2, 50, 4, dtype=torch.float64)
        >>> q, s = orthonormal_factor(x)
        >>> torch.allclose(q @ s, x)
        True
    """
    transform, r = factor_transform(x)
    return (x @ transform if isinstance(transform, Tensor) else transform[0]), r


def star_dense(
    x: Tensor, eta: float, data_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """STAR on dense matrices ``x`` ``(T, m, n)`` by a batched thin SVD in ``x``'s dtype.

    Args:
        x: ``(T, m, n)`` task matrices, already in the compute dtype.
        eta: Percentage of the nuclear norm to keep.
        data_dtype: The dtype the deltas came in (sets the noise cut-off); default ``x``'s.

    Returns:
        ``(b_hat (T, m, c), a_hat (T, c, n), k (T,))`` as :func:`star_factored`.
    """
    u, s, vh = torch.linalg.svd(x, full_matrices=False)  # (T, m, c), (T, c), (T, c, n)
    rtol = numerical_rtol(tuple(x.shape), data_dtype or x.dtype)
    k = eta_ranks(s, eta, rtol)
    return u * rescaled(s, k, rtol)[:, None, :], vh, k
