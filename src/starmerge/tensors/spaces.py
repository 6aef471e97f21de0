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

import torch
from torch import Tensor

from starmerge.tensors.delta import Delta, LowRank
from starmerge.tensors.spectral import numerical_rtol, orthonormal_factor

SPACES: tuple[str, ...] = ("full", "core", "knots")  # "full": the deltas as they are
_F64 = torch.float64


@dataclass(frozen=True)
class Projection:
    """One parameter's task deltas as coordinates in a shared basis: ``D_t = L C_t R``.

    Args:
        space: ``core`` or ``knots``.
        shape: The parameter's shape ``(m, n)``.
        left: ``(m, p)`` float64: ``U_B`` (core) or ``U S`` (knots).
        right: ``(q, n)`` float64 ``V_A^T`` (core), or None (knots: the identity, q = n).
        coords: Per task its ``(p, q)`` coordinates ``C_t`` (zeros for a task without the
            module), float32 (float64 when an input is float64).
    """

    space: str
    shape: tuple[int, int]
    left: Tensor
    right: Tensor | None
    coords: tuple[Tensor, ...]

    @property
    def core_shape(self) -> tuple[int, int]:
        """The coordinates' shape ``(p, q)``: core ``(p, q)``, knots ``(rho, n)``."""
        return (
            int(self.left.shape[1]),
            self.shape[1] if self.right is None else self.right.shape[0],
        )

    @property
    def empty(self) -> bool:
        """True when every task's delta is (numerically) zero: no coordinate at all."""
        p, q = self.core_shape
        return p * q == 0

    def lift(self, merged: Delta) -> LowRank:
        """``L merged R`` as ``LowRank`` of the parameter's shape, in ``merged``'s dtype (exact).

        Example:
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
    return Projection(space, shape, left, right, tuple(c.to(data) for c in coords))


def _part(delta: LowRank | None) -> tuple[Tensor, Tensor] | None:
    """``(s B, A)`` in float64, or None for a missing or rank-0 delta."""
    if delta is None or delta.rank == 0:
        return None
    return delta.b.to(_F64) * float(delta.scale), delta.a.to(_F64)


def left_singular(x: Tensor, rtol: float) -> Tensor:
    """The left singular vectors of ``x`` ``(k, R)`` at its numerical rank, ``(k, rank)``.

    ``x = Q F`` (Gram route or QR, :func:`~starmerge.tensors.spectral.orthonormal_factor`), then
    the SVD of the small ``F = W diag(s) Z^T``: ``U = Q W``. O(k R^2), never an SVD of the tall
    matrix itself.

    Example:
        >>> left_singular(torch.eye(3, dtype=torch.float64)[:, :2] * 2, 1e-12).shape
        torch.Size([3, 2])
    """
    if x.shape[1] == 0:
        return x.new_zeros(x.shape[0], 0)
    q, f = orthonormal_factor(x[None])  # (1, k, c), (1, c, R)
    w, s, _ = torch.linalg.svd(f[0], full_matrices=False)
    return q[0] @ w[:, : _rank(s, rtol)]


def _rank(s: Tensor, rtol: float) -> int:
    """How many singular values (descending) lie above ``rtol * s_max`` (0 for a zero matrix)."""
    if s.numel() == 0 or float(s[0]) <= 0:
        return 0
    return int((s > rtol * s[0]).sum())


def _core(
    parts: list[tuple[Tensor, Tensor] | None], shape: tuple[int, int], rtol: float, device
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Core Space: ``U_B`` ``(m, p)``, ``V_A^T`` ``(q, n)`` and every task's ``(p, q)`` core."""
    m, n = shape
    given = [p for p in parts if p is not None]
    if given:
        b = torch.cat([sb for sb, _ in given], dim=1)  # (m, R)
        a = torch.cat([a for _, a in given], dim=0)  # (R, n)
    else:
        b = torch.zeros(m, 0, dtype=_F64, device=device)
        a = torch.zeros(0, n, dtype=_F64, device=device)
    u_b = left_singular(b, rtol)  # (m, p)
    v_a = left_singular(a.T, rtol)  # (n, q): A^T's left = A's right singular vectors
    # M_t = (U_B^T s_t B_t) (A_t V_A) from the factors themselves (not from the SVDs' small
    # factors), so that a zero B_t gives an exactly zero core, as it gives a zero delta.
    b_coef, a_coef = u_b.T @ b, a @ v_a  # (p, R), (R, q)
    cores, col = [], 0
    for part in parts:
        r_t = 0 if part is None else part[1].shape[0]
        cores.append(b_coef[:, col : col + r_t] @ a_coef[col : col + r_t])  # (p, q)
        col += r_t
    return u_b, v_a.T, cores


def _knots(
    parts: list[tuple[Tensor, Tensor] | None], shape: tuple[int, int], rtol: float, device
) -> tuple[Tensor, None, list[Tensor]]:
    """KnOTS: ``U S`` ``(m, rho)`` and every task's ``V_t^T`` ``(rho, n)``, from the factors."""
    m, n = shape
    given = [p for p in parts if p is not None]
    if not given:
        empty = torch.zeros(m, 0, dtype=_F64, device=device)
        return empty, None, [torch.zeros(0, n, dtype=_F64, device=device) for _ in parts]
    b = torch.cat([sb for sb, _ in given], dim=1)  # (m, R)
    q_b, r_b = orthonormal_factor(b[None])
    q_b, r_b = q_b[0], r_b[0]  # (m, c), (c, R)
    blocks, col = [], 0
    for sb, a in given:
        r_a = orthonormal_factor(a.T[None])[1][0]  # A_t^T = Q_t R_t, R_t (k_t, r_t)
        blocks.append(r_b[:, col : col + sb.shape[1]] @ r_a.T)  # (c, k_t)
        col += sb.shape[1]
    u_c, s, _ = torch.linalg.svd(torch.cat(blocks, dim=1), full_matrices=False)
    rho = _rank(s, rtol)
    u = q_b @ u_c[:, :rho]  # (m, rho)
    # V_t^T = S^-1 U^T D_t = S^-1 (U^T s_t B_t) A_t from the factors: a zero B_t gives exact 0.
    ub = (u.T @ b) / s[:rho, None]  # (rho, R)
    coords, col = [], 0
    for part in parts:
        if part is None:
            coords.append(torch.zeros(rho, n, dtype=_F64, device=device))
            continue
        r_t = part[1].shape[0]
        coords.append(ub[:, col : col + r_t] @ part[1])  # V_t^T, (rho, n)
        col += r_t
    left = u * s[:rho]  # U S, (m, rho)
    return left, None, coords
