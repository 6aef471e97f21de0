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

A :class:`SpaceBasis` holds R x R float64 matrices (4 R^2 numbers for core, 2 R^2 for knots;
the tall bases are the stacked factors themselves when well conditioned): later passes reuse it,
so the coordinates cost O(T p q) (core) or O(rho R n) (knots), not O((m + n) R^2), again.

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
from starmerge.tensors.space_basis import (
    Side,
    b_times,
    core_basis,
    core_coordinates,
    knots_basis,
    knots_coordinates,
    knots_factors,
    singular_basis,
    stack_a,
    times_a,
)
from starmerge.tensors.spectral import numerical_rtol

__all__ = ["SPACES", "Projection", "SpaceBasis", "project", "singular_basis", "space_basis"]

SPACES: tuple[str, ...] = ("full", "core", "knots")  # "full": the deltas as they are
_F64 = torch.float64


@dataclass(frozen=True)
class SpaceBasis:
    """One parameter's merge-space basis; with the deltas it gives ``D_t = L C_t R``.

    Args:
        space: ``core`` or ``knots``.
        shape: The parameter's shape ``(m, n)``.
        data: The coordinates' dtype: float32 (float64 when an input is float64).
        tasks: Per task ``(rank, scale)`` of its delta, or None (lacks it): see :meth:`fits`.
        left: ``L = base @ small`` ``(m, p)`` float64: ``U_B`` (core) or ``U S`` (knots); base
            None stands for the stacked ``[s_1 B_1 .. s_T B_T]`` (tasks of rank > 0).
        coef: ``(p, R)`` float64: ``U_B^T [s_1 B_1 ..]`` (core) or ``S^-1 U^T [s_1 B_1 ..]``.
        right: ``R = (base @ small)^T`` ``(q, n)``, base None for the stacked ``[A_1; ..]^T``
            (core: ``V_A^T``); None for knots (the identity, q = n).
        a_coef: ``(q, R)`` float64 ``V_A^T [A_1; ..]^T`` (core); None for knots.
        a_output: ``[A_1; ..]`` can be a lifted delta's A factor (core, see :meth:`lift`).
    """

    space: str
    shape: tuple[int, int]
    data: torch.dtype
    tasks: tuple[tuple[int, float] | None, ...]
    left: Side
    coef: Tensor
    right: Side | None
    a_coef: Tensor | None
    a_output: bool = False

    @property
    def core_shape(self) -> tuple[int, int]:
        """The coordinates' shape ``(p, q)``: core ``(p, q)``, knots ``(rho, n)``."""
        q = self.shape[1] if self.right is None else int(self.right[1].shape[1])
        return int(self.coef.shape[0]), q

    @property
    def empty(self) -> bool:
        """True when every task's delta is (numerically) zero: no coordinate at all."""
        p, q = self.core_shape
        return p * q == 0

    @property
    def reusable(self) -> bool:
        """True when it holds only R x R matrices (tall bases come from the deltas)."""
        return all(s is None or s[0] is None or s[0].numel() == 0 for s in (self.left, self.right))

    def fits(self, deltas: Sequence[LowRank | None]) -> bool:
        """True when ``deltas`` have the shape, ranks and scales it was made of.

        A basis is reused within one run, over the same reader's deltas; this check guards
        against a mix-up of parameters, not against a reader whose values change between passes.
        """
        shapes = {tuple(d.shape) for d in deltas if d is not None}
        return shapes == {self.shape} and _fingerprint(deltas) == self.tasks

    @property
    def needs_factors(self) -> bool:
        """True when :meth:`coordinates` reads the deltas' factors (knots), not only the basis."""
        return self.a_coef is None

    def coordinates(
        self, deltas: Sequence[LowRank | None] | None = None, out: list[Tensor] | None = None
    ) -> list[Tensor]:
        """Every task's coordinates ``C_t`` in ``data`` (zeros for a task without the module).

        Core's come from the basis alone (``deltas`` unused); knots' need every ``A_t``. One
        tensor per task: below glibc's mmap threshold where a (T, p, q) block would be above.
        ``out``: one buffer per task of the coordinates' shape and dtype to fill (else new).
        """
        ranks = [0 if t is None else t[0] for t in self.tasks]
        shape, device = self.core_shape, self.coef.device
        if out is None:
            out = [torch.empty(shape, dtype=self.data, device=device) for _ in ranks]
        if self.a_coef is not None:  # core: M_t = (U_B^T s_t B_t)(A_t V_A)
            return core_coordinates(self.coef, self.a_coef, ranks, out)
        assert deltas is not None, "knots coordinates need the deltas"
        return knots_coordinates(self.coef, deltas, ranks, out)

    def factored_coordinates(self, deltas: Sequence[LowRank | None]) -> list[LowRank | None]:
        """knots: each task's coordinates as ``LowRank(S^-1 U^T s_t B_t, A_t)``, rank ``r_t``.

        The same matrices as :meth:`coordinates` (exactly, not a float32 product of them), for
        a method with a factored route: an SVD of a (rho, n) coordinate block then costs
        O(n r_t^2), not O(rho^2 n). None for a task without the module.
        """
        if self.space != "knots":
            raise ValueError(f"factored coordinates are knots' (rank r_t), not {self.space}'s")
        ranks = [0 if t is None else t[0] for t in self.tasks]
        return knots_factors(self.coef, deltas, ranks, self.data)

    def left_times(
        self, deltas: Sequence[LowRank | None], mat: Tensor | None, out: torch.dtype
    ) -> Tensor:
        """``L @ mat`` ``(m, k)`` in dtype ``out``; ``mat`` ``(p, k)`` float64, None: ``L``."""
        base, small = self.left
        return b_times(deltas, self.shape[0], base, small if mat is None else small @ mat, out)

    def times_right(
        self, deltas: Sequence[LowRank | None], mat: Tensor | None, out: torch.dtype
    ) -> Tensor:
        """``mat @ R`` ``(k, n)`` in dtype ``out``; ``mat`` ``(k, q)`` float64, None: ``R``."""
        assert self.right is not None, "knots has no right basis"
        base, small = self.right
        return times_a(deltas, self.shape[1], base, small.T if mat is None else mat @ small.T, out)

    def lift(self, merged: Delta, deltas: Sequence[LowRank | None]) -> LowRank:
        """``L merged R`` as ``LowRank`` of the parameter's shape, in ``merged``'s dtype (exact).

        Two tall products at most (``U_B`` and ``M V_A^T``, or ``U_B M`` and ``V_A^T``; knots:
        ``U S`` only), each as ``stack @ (small @ ...)`` by blocks of the stacked factors; one
        when the stacked A itself is the A factor (``a_output``, ``q <= p``).

        Example:
            >>> from starmerge.tensors.delta import Dense
            >>> x = [LowRank(torch.ones(3, 1), torch.ones(1, 2), 2.0)]
            >>> basis = space_basis(x, "core")
            >>> basis.lift(Dense(basis.coordinates(x)[0]), x).to_dense()
            tensor([[2., 2.],
                    [2., 2.],
                    [2., 2.]])
        """
        if tuple(merged.shape) != self.core_shape:
            raise ValueError(f"lift needs a {self.core_shape} delta, got {tuple(merged.shape)}")
        out = merged.dtype
        if isinstance(merged, LowRank):  # (L b s) (a R)
            b = self.left_times(deltas, merged.b.to(_F64) * float(merged.scale), out)
            if self.right is None:
                return LowRank(b, merged.a.to(out), 1.0)
            return LowRank(b, self.times_right(deltas, merged.a.to(_F64), out), 1.0)
        if self.right is None:  # knots: (U S) X
            return LowRank(self.left_times(deltas, None, out), merged.tensor, 1.0)
        x = merged.tensor.to(_F64)  # (p, q)
        if self.a_output and x.shape[1] <= x.shape[0]:  # (U_B M V_A^T) = (B K) A: rank q = R
            a = stack_a(deltas, self.shape[1], out)  # the adapters' own A: no product
            return LowRank(self.left_times(deltas, x @ self.right[1].T, out), a, 1.0)
        if x.shape[0] <= x.shape[1]:  # U_B (M V_A^T): rank p
            return LowRank(self.left_times(deltas, None, out), self.times_right(deltas, x, out))
        return LowRank(self.left_times(deltas, x, out), self.times_right(deltas, None, out))


@dataclass(frozen=True)
class Projection:
    """A :class:`SpaceBasis` bound to its deltas: coordinates, bases and the lift.

    ``deltas`` may be None for a basis whose coordinates need no factor (core): such a
    projection gives coordinates but no lift (a fit pass that reuses the basis reads nothing).

    Example:
        >>> from starmerge.tensors.delta import Dense
        >>> proj = project([LowRank(torch.ones(3, 1), torch.ones(1, 2), 2.0)], "core")
        >>> proj.lift(Dense(proj.coords[0])).to_dense()
        tensor([[2., 2.],
                [2., 2.],
                [2., 2.]])
    """

    basis: SpaceBasis
    deltas: tuple[LowRank | None, ...] | None

    @cached_property
    def coords(self) -> tuple[Tensor, ...]:
        """Per task its ``(p, q)`` coordinates (zeros for a task without the module)."""
        return tuple(self.basis.coordinates(self.deltas))

    @cached_property
    def left(self) -> Tensor:
        """``(m, p)`` float64: ``U_B`` (core) or ``U S`` (knots)."""
        return self.basis.left_times(self._factors(), None, _F64)

    @cached_property
    def right(self) -> Tensor | None:
        """``(q, n)`` float64 ``V_A^T`` (core); None (knots)."""
        if self.basis.right is None:
            return None
        return self.basis.times_right(self._factors(), None, _F64)

    def _factors(self) -> tuple[LowRank | None, ...]:
        if self.deltas is None:
            raise ValueError("this projection was made without the deltas: it cannot lift")
        return self.deltas

    @property
    def shape(self) -> tuple[int, int]:
        """The parameter's shape ``(m, n)``."""
        return self.basis.shape

    @property
    def core_shape(self) -> tuple[int, int]:
        """The coordinates' shape ``(p, q)``."""
        return self.basis.core_shape

    @property
    def empty(self) -> bool:
        """True when every task's delta is (numerically) zero."""
        return self.basis.empty

    def lift(self, merged: Delta) -> LowRank:
        """:meth:`SpaceBasis.lift` with these deltas."""
        return self.basis.lift(merged, self._factors())


def project(deltas: Sequence[LowRank | None], space: str) -> Projection:
    """The coordinates of one parameter's low-rank task deltas in merge space ``space``.

    Args:
        deltas: One ``LowRank`` per task (None: the task lacks the module, a zero delta); at
            least one is not None; all of one shape.
        space: ``core`` or ``knots``.

    Returns:
        The basis bound to the deltas.

    Raises:
        ValueError: An unknown space, or no delta given.
        TypeError: A delta that is not ``LowRank``.

    Example:
        >>> x = LowRank(torch.randn(8, 2), torch.randn(2, 6), 0.5)
        >>> project([x, None], "core").core_shape
        (2, 2)
    """
    return Projection(space_basis(deltas, space), tuple(deltas))


def space_basis(deltas: Sequence[LowRank | None], space: str) -> SpaceBasis:
    """The basis of ``space`` for one parameter's low-rank task deltas (see :func:`project`).

    Raises:
        ValueError: An unknown space, or no delta given.
        TypeError: A delta that is not ``LowRank``.
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
    found = core_basis(deltas, shape, rtol) if space == "core" else knots_basis(deltas, shape, rtol)
    return SpaceBasis(space, shape, data, _fingerprint(deltas), *found)


def _fingerprint(deltas: Sequence[LowRank | None]) -> tuple[tuple[int, float] | None, ...]:
    """Per task ``(rank, scale)``, or None."""
    return tuple(None if d is None else (d.rank, float(d.scale)) for d in deltas)
