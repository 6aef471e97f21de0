"""Merge spaces: one LoRA parameter's task deltas as small coordinates in a shared basis.

For one ``(m, n)`` parameter with low-rank task deltas ``D_t = s_t B_t A_t`` (t = 1..T; a task
that lacks the module is a zero delta; ranks may differ, rank 0 allowed; ``s_t`` the LoRA or
rsLoRA scale), with ``R = sum_t r_t``:

- ``core`` (Core Space: Panariello et al., "Accurate and Efficient Low-Rank Model Merging in
  Core Space", NeurIPS 2025, https://arxiv.org/abs/2509.17786): ``U_B`` = left singular vectors
  of ``[s_1 B_1 .. s_T B_T]`` (m x R), ``V_A`` = right singular vectors of ``[A_1; ..; A_T]``
  (R x n), each at its numerical rank (p, q <= R). Task t's core is
  ``M_t = U_B^T D_t V_A = (U_B^T s_t B_t) (A_t V_A)`` (p x q); a merged core ``M`` lifts to
  ``U_B M V_A^T``.
- ``knots`` (KnOTS: Stoica et al., "Model merging with SVD to tie the Knots", ICLR 2025,
  https://arxiv.org/abs/2410.19735): the thin SVD ``[D_1 .. D_T] = U S [V_1^T .. V_T^T]`` at its
  numerical rank rho; task t's coordinates are ``V_t^T`` (rho x n); merged coordinates ``X``
  lift to ``U S X``. Computed from the factors, never forming the m x Tn matrix: with
  ``[s_1 B_1 .. s_T B_T] = Q_B R_B`` and ``A_t^T = Q_t R_t``,
  ``[D_1 .. D_T] = Q_B [R_B^(1) R_1^T .. R_B^(T) R_T^T] diag(Q_1^T .. Q_T^T)``, so the SVD of
  that small core gives U and S, and ``V_t^T = S^-1 (U^T s_t B_t) A_t``.

Both are exact: ``U_B U_B^T`` fixes every ``s_t B_t`` and ``V_A V_A^T`` every ``A_t``, so the lift
of ``M_t`` is ``D_t``; and the lift is linear, so a weighted sum of coordinates lifts to the same
weighted sum of deltas. Singular values at or below ``numerical_rtol(shape) * s_max`` (rounding
noise of the data's precision) are dropped, so no arbitrary null-space direction enters a
basis. Cost: O((m + n) R^2) for either space (the coordinates of ``knots`` are rho x n per task).

Deviations from the reference code (``apanariello4/core-space-merging`` ``task_merger.py``,
``MatrixPerLayerMerger``; ``gstoica27/KnOTS`` ``task_merger.py``): both bases are cut at the
numerical rank (Core Space keeps all T r directions; KnOTS the singular values above an absolute
1e-5); the LoRA scale s_t is folded into B_t (the references stack the stored factors, without
the scale); KnOTS is computed from the factors, not by an SVD of the m x Tn matrix. The KnOTS
coordinates are ``V_t^T``, as in the KnOTS paper and the Core Space code; KnOTS's own code
merges ``S V_t^T`` and lifts with ``U`` (the same for linear methods, not for TIES-like ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from starmerge.tensors.delta import Delta, LowRank
from starmerge.tensors.spectral import numerical_rtol

SPACES: tuple[str, ...] = ("full", "core", "knots")  # "full": the deltas as they are
_F64 = torch.float64
# The Gram route only when x^T x has all eigenvalues within this factor of the largest (cond(x)
# <= 1e3): U's orthonormality error is then about eps64 * cond^2 = 2e-10 (as orthonormal_factor).
_GRAM_MIN_EIG_RATIO = 1e-6


@dataclass(frozen=True)
class Projection:
    """One parameter's task deltas as coordinates in a shared basis: ``D_t = L C_t R``.

    Args:
        space: ``core`` or ``knots``.
        shape: The parameter's shape ``(m, n)``.
        coords: Per task its ``(p, q)`` coordinates ``C_t`` (zeros for a task without the
            module), float32 (float64 when an input is float64).
        left_factors: ``(base, small)`` with ``L = base @ small`` ``(m, p)``, float64:
            ``U_B`` (core) or ``U S`` (knots). The tall product is formed only when ``left``
            is read (the lift), not in the fit passes, which need only the coordinates.
        right_factors: ``(base, small)`` with ``R = (base @ small)^T`` ``(q, n)``, float64
            ``V_A^T`` (core), or None (knots: the identity, q = n).
    """

    space: str
    shape: tuple[int, int]
    coords: tuple[Tensor, ...]
    left_factors: tuple[Tensor, Tensor]
    right_factors: tuple[Tensor, Tensor] | None

    @cached_property
    def left(self) -> Tensor:
        """``(m, p)`` float64: ``U_B`` (core) or ``U S`` (knots), formed on first use."""
        base, small = self.left_factors
        return base @ small

    @cached_property
    def right(self) -> Tensor | None:
        """``(q, n)`` float64 ``V_A^T`` (core), formed on first use; None (knots)."""
        if self.right_factors is None:
            return None
        base, small = self.right_factors
        return (base @ small).T

    @property
    def core_shape(self) -> tuple[int, int]:
        """The coordinates' shape ``(p, q)``: core ``(p, q)``, knots ``(rho, n)``."""
        right = self.right_factors
        return int(self.left_factors[1].shape[1]), self.shape[1] if right is None else right[
            1
        ].shape[1]

    @property
    def empty(self) -> bool:
        """True when every task's delta is (numerically) zero: no coordinate at all."""
        p, q = self.core_shape
        return p * q == 0

    def lift(self, merged: Delta) -> LowRank:
        """``L merged R`` as ``LowRank`` of the parameter's shape, in ``merged``'s dtype (exact).

        Example:
            >>> from starmerge.tensors.delta import Dense
            >>> proj = project([LowRank(torch.ones(3, 1), torch.ones(1, 2), 2.0)], "core")
            >>> proj.lift(Dense(proj.coords[0])).to_dense()
            tensor([[2., 2.],
                    [2., 2.],
                    [2., 2.]])
        """
        if tuple(merged.shape) != self.core_shape:
            raise ValueError(f"lift needs a {self.core_shape} delta, got {tuple(merged.shape)}")
        out = merged.dtype
        if isinstance(merged, LowRank):
            b = self.left @ (merged.b.to(_F64) * float(merged.scale))
            a = merged.a.to(_F64) if self.right is None else merged.a.to(_F64) @ self.right
        elif self.right is None or merged.shape[0] <= merged.shape[1]:
            x = merged.tensor.to(_F64)  # (p, q); U_B (M V_A^T): rank p
            b, a = self.left, x if self.right is None else x @ self.right
        else:
            b, a = self.left @ merged.tensor.to(_F64), self.right  # (U_B M) V_A^T: rank q
        return LowRank(b.to(out), a.to(out), 1.0)


def project(deltas: Sequence[LowRank | None], space: str) -> Projection:
    """The coordinates of one parameter's low-rank task deltas in merge space ``space``.

    Args:
        deltas: One ``LowRank`` per task (None: the task lacks the module, a zero delta); at
            least one is not None; all of one shape.
        space: ``core`` or ``knots``.

    Returns:
        The basis and every task's coordinates.

    Raises:
        ValueError: An unknown space, or no delta given.
        TypeError: A delta that is not ``LowRank``.

    Example:
        >>> x = LowRank(torch.randn(8, 2), torch.randn(2, 6), 0.5)
        >>> project([x, None], "core").core_shape
        (2, 2)
    """
    if space not in ("core", "knots"):
        raise ValueError(f"space must be core or knots, got {space!r}")
    present = [d for d in deltas if d is not None]
    if not present:
        raise ValueError("project needs at least one delta")
    for d in present:
        if not isinstance(d, LowRank):
            raise TypeError(f"merge spaces need LowRank deltas, got {type(d).__name__}")
    shape = (int(present[0].shape[0]), int(present[0].shape[1]))
    data = _F64 if any(d.dtype == _F64 for d in present) else torch.float32
    rtol = numerical_rtol(shape, data)
    parts = [_part(d) for d in deltas]  # (s_t B_t, A_t) in float64, None for a zero delta
    if space == "core":
        left, right, coords = _core(parts, shape, rtol, present[0].device)
    else:
        left, right, coords = _knots(parts, shape, rtol, present[0].device)
    return Projection(space, shape, tuple(c.to(data) for c in coords), left, right)


def _part(delta: LowRank | None) -> tuple[Tensor, Tensor] | None:
    """``(s B, A)`` in float64, or None for a missing or rank-0 delta."""
    if delta is None or delta.rank == 0:
        return None
    return delta.b.to(_F64) * float(delta.scale), delta.a.to(_F64)


def left_singular(x: Tensor, rtol: float) -> Tensor:
    """The left singular vectors of ``x`` ``(k, R)`` at its numerical rank, ``(k, rank)``.

    Example:
        >>> left_singular(torch.eye(3, dtype=torch.float64)[:, :2] * 2, 1e-12).shape
        torch.Size([3, 2])
    """
    base, to_u, _ = singular_basis(x, rtol)
    return base @ to_u


def singular_basis(x: Tensor, rtol: float) -> tuple[Tensor, Tensor, Tensor]:
    """``x`` ``(k, R)`` float64 as ``U C``: U its left singular vectors at the numerical rank.

    Returns ``(base, to_u, coef)`` with ``U = base @ to_u`` ``(k, rank)`` left unformed (one
    tall product, paid only by a lift) and ``coef = U^T x`` ``(rank, R)``. A well-conditioned x
    (all eigenvalues of ``x^T x = W L W^T`` within a factor 1e6, the usual stacked LoRA factor)
    takes the Gram route: ``U = x W L^-1/2`` and ``coef = L^1/2 W^T`` (already an SVD, so no
    SVD at all; Q orthonormal to about eps64 * cond^2, as in
    :func:`~starmerge.tensors.spectral.orthonormal_factor`). Otherwise Householder QR
    ``x = Q F`` (exact for every input), the SVD of the small ``F = W diag(s) Z^T``, ``U = Q W``
    and ``coef = W^T F``, so a zero column of x (a zero ``B_t``) gives an exactly zero column.
    Cost O(k R^2) for ``x^T x`` (or the QR); never an SVD of the tall matrix.
    """
    k, r = x.shape
    if r == 0:
        return x.new_zeros(k, 0), x.new_zeros(0, 0), x.new_zeros(0, 0)
    eig, w = torch.linalg.eigh(x.T @ x)  # ascending
    top = float(eig[-1])
    if top > 0 and float(eig[0]) > top * _GRAM_MIN_EIG_RATIO:
        s, w = eig.flip(0).sqrt(), w.flip(1)  # descending singular values of x
        keep = _rank(s, rtol)
        return x, w[:, :keep] / s[:keep], s[:keep, None] * w[:, :keep].T
    q, f = torch.linalg.qr(x)  # (k, c), (c, R)
    w, s, _ = torch.linalg.svd(f, full_matrices=False)
    w = w[:, : _rank(s, rtol)]
    return q, w, w.T @ f


def _rank(s: Tensor, rtol: float) -> int:
    """How many singular values (descending) lie above ``rtol * s_max`` (0 for a zero matrix)."""
    if s.numel() == 0 or float(s[0]) <= 0:
        return 0
    return int((s > rtol * s[0]).sum())


def _core(
    parts: list[tuple[Tensor, Tensor] | None], shape: tuple[int, int], rtol: float, device
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], list[Tensor]]:
    """Core Space: ``U_B`` ``(m, p)`` and ``V_A`` ``(n, q)`` (unformed), every ``(p, q)`` core."""
    m, n = shape
    given = [p for p in parts if p is not None]
    if given:
        b = torch.cat([sb for sb, _ in given], dim=1)  # (m, R)
        a = torch.cat([a for _, a in given], dim=0)  # (R, n)
    else:
        b = torch.zeros(m, 0, dtype=_F64, device=device)
        a = torch.zeros(0, n, dtype=_F64, device=device)
    b_base, to_u, b_coef = singular_basis(b, rtol)  # U_B = b_base @ to_u (m, p); U_B^T B
    a_base, to_v, a_coef = singular_basis(a.T, rtol)  # V_A (n, q): A's right singular vectors
    # M_t = (U_B^T s_t B_t) (A_t V_A): columns of the coefficients, exactly 0 for a zero B_t
    # (as its delta is); the tall U_B and V_A are formed only if the merge is lifted.
    cores, col = [], 0
    for part in parts:
        r_t = 0 if part is None else part[1].shape[0]
        cores.append(b_coef[:, col : col + r_t] @ a_coef[:, col : col + r_t].T)  # (p, q)
        col += r_t
    return (b_base, to_u), (a_base, to_v), cores


def _knots(
    parts: list[tuple[Tensor, Tensor] | None], shape: tuple[int, int], rtol: float, device
) -> tuple[tuple[Tensor, Tensor], None, list[Tensor]]:
    """KnOTS: ``U S`` ``(m, rho)`` (unformed) and every task's ``V_t^T`` ``(rho, n)``."""
    m, n = shape
    given = [p for p in parts if p is not None]
    if not given:
        empty = (torch.zeros(m, 0, dtype=_F64, device=device), torch.zeros(0, 0, dtype=_F64))
        return empty, None, [torch.zeros(0, n, dtype=_F64, device=device) for _ in parts]
    b = torch.cat([sb for sb, _ in given], dim=1)  # (m, R)
    b_base, to_q, r_b = singular_basis(b, 0.0)  # B = Q_B R_B, Q_B = b_base @ to_q (unformed)
    blocks, col = [], 0
    for sb, a in given:
        r_a = singular_basis(a.T, 0.0)[2]  # A_t^T = Q_t R_t, R_t (k_t, r_t); Q_t never formed
        blocks.append(r_b[:, col : col + sb.shape[1]] @ r_a.T)  # (c, k_t)
        col += sb.shape[1]
    u_c, s, _ = torch.linalg.svd(torch.cat(blocks, dim=1), full_matrices=False)
    rho = _rank(s, rtol)
    # V_t^T = S^-1 U^T D_t = S^-1 (U^T s_t B_t) A_t with U = Q_B u_c: U^T s_t B_t is a block of
    # u_c^T R_B, exactly 0 for a zero B_t.
    ub = (u_c[:, :rho].T @ r_b) / s[:rho, None]  # (rho, R)
    coords, col = [], 0
    for part in parts:
        if part is None:
            coords.append(torch.zeros(rho, n, dtype=_F64, device=device))
            continue
        r_t = part[1].shape[0]
        coords.append(ub[:, col : col + r_t] @ part[1])  # V_t^T, (rho, n)
        col += r_t
    return (b_base, to_q @ (u_c[:, :rho] * s[:rho])), None, coords  # U S = Q_B u_c S
