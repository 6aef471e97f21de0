"""Thin SVDs at the numerical rank, of a dense matrix or of a sum of low-rank factors.

The spectral merge methods (TSV-M, Iso-C, Iso-CTS, CART) and the merge spaces need singular
triplets of task deltas and of their sums. For ``LowRank`` inputs these come from the factors
exactly: with ``B = [w_1 s_1 B_1 .. w_T s_T B_T]`` (m x R) and ``A = [A_1; ..; A_T]`` (R x n),
``sum_t w_t s_t B_t A_t = B A = Q_B (R_B R_A^T) Q_A^T``, so the SVD of the R x R core gives the
thin SVD at O((m + n) R^2) cost, never forming the m x n matrix.

Only the *numerical support* is returned: singular values at or below
``numerical_rtol(shape, dtype) * s_max`` are dropped (and a zero matrix has rank 0), so no
singular vector of a zero singular value (an arbitrary completion) ever enters a merge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from starmerge.tensors.delta import Delta, Dense, LowRank
from starmerge.tensors.spectral import numerical_rtol, orthonormal_factor


@dataclass(frozen=True)
class ThinSVD:
    """``u @ diag(s) @ vh`` at the numerical rank ``rho`` (float64).

    Args:
        u: ``(m, rho)`` orthonormal columns.
        s: ``(rho,)`` singular values, descending, all above the noise cut-off.
        vh: ``(rho, n)`` orthonormal rows.
    """

    u: Tensor
    s: Tensor
    vh: Tensor

    @property
    def rank(self) -> int:
        """The numerical rank rho."""
        return int(self.s.numel())

    def matrix(self) -> Tensor:
        """The dense ``(m, n)`` matrix (float64); for tests and small matrices."""
        return (self.u * self.s) @ self.vh


def _support(u: Tensor, s: Tensor, vh: Tensor, rtol: float) -> ThinSVD:
    """Drop the singular values at or below ``rtol * s_max`` (all of them for a zero matrix)."""
    if s.numel() == 0:
        return ThinSVD(u, s, vh)
    keep = int((s > rtol * s[0]).sum()) if float(s[0]) > 0 else 0
    return ThinSVD(u[:, :keep], s[:keep], vh[:keep])


def dense_svd(x: Tensor, data_dtype: torch.dtype | None = None) -> ThinSVD:
    """Thin SVD of a dense matrix at its numerical rank, computed in float64.

    Args:
        x: ``(m, n)`` matrix.
        data_dtype: The dtype the data came in (sets the noise cut-off); default ``x``'s.

    Example:
        >>> dense_svd(torch.diag(torch.tensor([3.0, 0.0, 1.0]))).s.tolist()
        [3.0, 1.0]
    """
    x64 = x.to(torch.float64)
    u, s, vh = torch.linalg.svd(x64, full_matrices=False)
    return _support(u, s, vh, numerical_rtol(tuple(x.shape), data_dtype or x.dtype))


def lowrank_sum_svd(deltas: Sequence[LowRank], weights: Sequence[float] | None = None) -> ThinSVD:
    """Thin SVD of ``sum_t weights[t] * deltas[t]`` from the factors, at the numerical rank.

    Args:
        deltas: Low-rank deltas of one ``(m, n)`` parameter (ranks may differ, 0 allowed).
        weights: One coefficient per delta; default all 1.

    Example:
        >>> x = LowRank(torch.ones(3, 1), torch.ones(1, 2), 2.0)
        >>> round(float(lowrank_sum_svd([x, x]).s[0]) ** 2, 6)  # ||4 * ones(3, 2)||^2
        96.0
    """
    weights = [1.0] * len(deltas) if weights is None else list(weights)
    m, n = deltas[0].shape
    data = torch.float64 if any(d.dtype == torch.float64 for d in deltas) else torch.float32
    rtol = numerical_rtol((m, n), data)
    pairs = [(d, w) for d, w in zip(deltas, weights, strict=True) if d.rank > 0 and w != 0]
    device = deltas[0].device
    if not pairs:
        return ThinSVD(
            torch.zeros(m, 0, dtype=torch.float64, device=device),
            torch.zeros(0, dtype=torch.float64, device=device),
            torch.zeros(0, n, dtype=torch.float64, device=device),
        )
    b = torch.cat([d.b.to(torch.float64) * (float(d.scale) * w) for d, w in pairs], dim=1)
    a = torch.cat([d.a.to(torch.float64) for d, _ in pairs], dim=0)  # (R, n)
    q_b, r_b = orthonormal_factor(b[None])  # (1, m, p), (1, p, R)
    q_a, r_a = orthonormal_factor(a.T[None])  # (1, n, q), (1, q, R)
    u_c, s, vh_c = torch.linalg.svd((r_b @ r_a.mT)[0], full_matrices=False)
    return _support(q_b[0] @ u_c, s, vh_c @ q_a[0].T, rtol)


def delta_svd(delta: Delta) -> ThinSVD:
    """Thin SVD of one 2-D delta (dense or factored) at its numerical rank.

    Example:
        >>> delta_svd(Dense(torch.eye(2))).rank
        2
    """
    if isinstance(delta, Dense):
        return dense_svd(delta.tensor)
    return lowrank_sum_svd([delta])
