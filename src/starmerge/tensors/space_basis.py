"""The linear algebra of the merge spaces' bases (see :mod:`starmerge.tensors.spaces`).

Every function works on one parameter's stacked LoRA factors in float64: ``[s_1 B_1 .. s_T B_T]``
``(m, R)`` and ``[A_1; ..; A_T]`` ``(R, n)`` over the tasks of rank > 0, and returns the small
matrices of a basis. A tall basis ``U (k, p)`` is kept as ``base @ small``: for a well-conditioned
stack (the usual case) ``base`` is the stack itself, returned as None so that a caller can keep
only the small matrices and multiply by the stack again when it needs ``U``.

The stacks are never formed whole on that route: Gram matrices and products go through float64
blocks of at most 512 KiB, built from the float32 factors (below glibc's mmap threshold, so the
blocks reuse heap memory instead of faulting fresh pages in; and each block stays in cache).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from starmerge.tensors.delta import LowRank

_F64 = torch.float64
# The Gram route only when x^T x has all eigenvalues within this factor of the largest (cond(x)
# <= 1e3): U's orthonormality error is then about eps64 * cond^2 = 2e-10 (as orthonormal_factor).
_GRAM_MIN_EIG_RATIO = 1e-6
_BLOCK_NUMBERS = 2**16  # float64 numbers per block (512 KiB)
# A lifted delta keeps [A_1; ..] as its A factor only when cond(A) <= this: rounding the other
# factor to float32 then costs at most cond * eps32 = 2.4e-7 of the product (relative).
_OUTPUT_COND = 4.0

Side = tuple[Tensor | None, Tensor]  # (tall base, or None: the stack itself; small factor)


def singular_basis(x: Tensor, rtol: float) -> tuple[Tensor, Tensor, Tensor]:
    """``x`` ``(k, R)`` float64 as ``U C``: U its left singular vectors at the numerical rank.

    Returns ``(base, to_u, coef)`` with ``U = base @ to_u`` ``(k, rank)`` left unformed (one
    tall product, paid only by a lift) and ``coef = U^T x`` ``(rank, R)``. A well-conditioned x
    (all eigenvalues of ``x^T x = W L W^T`` within a factor 1e6, the usual stacked LoRA factor)
    takes the Gram route: ``base`` is ``x`` itself, ``U = x W L^-1/2`` and
    ``coef = L^1/2 W^T`` (already an SVD, so no SVD at all; Q orthonormal to about
    eps64 * cond^2, as in :func:`~starmerge.tensors.spectral.orthonormal_factor`). Otherwise
    Householder QR ``x = Q F`` (exact for every input), the SVD of the small
    ``F = W diag(s) Z^T``, ``U = Q W`` and ``coef = W^T F``, so a zero column of x (a zero
    ``B_t``) gives an exactly zero column. Cost O(k R^2) for ``x^T x`` (or the QR); never an SVD
    of the tall matrix.
    """
    k, r = x.shape
    if r == 0:
        return x.new_zeros(k, 0), x.new_zeros(0, 0), x.new_zeros(0, 0)
    gram = gram_route(x.T @ x, rtol)
    if gram is not None:
        return x, gram[0], gram[1]
    q, f = torch.linalg.qr(x)  # (k, c), (c, R)
    w, s, _ = torch.linalg.svd(f, full_matrices=False)
    w = w[:, : rank_of(s, rtol)]
    return q, w, w.T @ f


def gram_route(gram: Tensor, rtol: float) -> tuple[Tensor, Tensor, float] | None:
    """``(to_u, coef, cond(x))`` of :func:`singular_basis` from ``x^T x``; None: ill-conditioned."""
    eig, w = torch.linalg.eigh(gram)  # ascending
    top, low = float(eig[-1]), float(eig[0])
    if not (top > 0 and low > top * _GRAM_MIN_EIG_RATIO):
        return None
    s, w = eig.flip(0).sqrt(), w.flip(1)  # descending singular values of x
    keep = rank_of(s, rtol)
    return w[:, :keep] / s[:keep], s[:keep, None] * w[:, :keep].T, math.sqrt(top / low)


def rank_of(s: Tensor, rtol: float) -> int:
    """How many singular values (descending) lie above ``rtol * s_max`` (0 for a zero matrix)."""
    if s.numel() == 0 or float(s[0]) <= 0:
        return 0
    return int((s > rtol * s[0]).sum())


def _given(deltas: Sequence[LowRank | None]) -> list[LowRank]:
    return [d for d in deltas if d is not None and d.rank > 0]


def _b_blocks(deltas: Sequence[LowRank | None], m: int) -> Iterator[tuple[int, int, Tensor]]:
    """Row blocks ``(i, j, [s_1 B_1 .. s_T B_T][i:j])`` in float64 (``s_t B_t`` rounded once).

    One buffer serves every block: a block is valid until the next one is drawn.
    """
    given = _given(deltas)
    width = sum(d.rank for d in given)
    step = max(1, min(m, _BLOCK_NUMBERS // width))
    buf = torch.empty(step, width, dtype=_F64, device=given[0].b.device)
    for i in range(0, m, step):
        block, col = buf[: min(step, m - i)], 0
        for d in given:
            block[:, col : col + d.rank].copy_(d.b[i : i + step]).mul_(float(d.scale))
            col += d.rank
        yield i, i + block.shape[0], block


def _a_blocks(deltas: Sequence[LowRank | None], n: int) -> Iterator[tuple[int, int, Tensor]]:
    """Column blocks ``(i, j, [A_1; ..; A_T][:, i:j])`` in float64 (one buffer, as above)."""
    given = _given(deltas)
    width = sum(d.rank for d in given)
    step = max(1, min(n, _BLOCK_NUMBERS // width))
    buf = torch.empty(width, step, dtype=_F64, device=given[0].a.device)
    for i in range(0, n, step):
        block, row = buf[:, : min(step, n - i)], 0
        for d in given:
            block[row : row + d.rank].copy_(d.a[:, i : i + step])
            row += d.rank
        yield i, i + block.shape[1], block


def stack_b(deltas: Sequence[LowRank | None], m: int) -> Tensor:
    """``[s_1 B_1 .. s_T B_T]`` ``(m, R)`` float64 over the deltas of rank > 0."""
    given = _given(deltas)
    if not given:
        device = next((d.b.device for d in deltas if d is not None), None)
        return torch.zeros(m, 0, dtype=_F64, device=device)
    return torch.cat([d.b.to(_F64) * float(d.scale) for d in given], dim=1)


def stack_a(deltas: Sequence[LowRank | None], n: int, dtype: torch.dtype = _F64) -> Tensor:
    """``[A_1; ..; A_T]`` ``(R, n)`` in ``dtype`` over the deltas of rank > 0."""
    given = _given(deltas)
    if not given:
        device = next((d.a.device for d in deltas if d is not None), None)
        return torch.zeros(0, n, dtype=dtype, device=device)
    return torch.cat([d.a for d in given]).to(dtype)


def b_times(
    deltas: Sequence[LowRank | None], m: int, base: Tensor | None, mat: Tensor, dtype: torch.dtype
) -> Tensor:
    """``base @ mat`` ``(m, k)`` in ``dtype``; base None: ``[s_1 B_1 ..] @ mat`` by row blocks."""
    if base is not None or mat.shape[1] == 0 or not _given(deltas):
        full = base if base is not None else stack_b(deltas, m)
        return (full @ mat).to(dtype)
    out = torch.empty(m, mat.shape[1], dtype=dtype, device=mat.device)
    tmp: Tensor | None = None
    for i, j, block in _b_blocks(deltas, m):
        if tmp is None:  # the first block is the largest
            tmp = torch.empty(block.shape[0], mat.shape[1], dtype=_F64, device=mat.device)
        out[i:j] = torch.mm(block, mat, out=tmp[: j - i])
    return out


def times_a(
    deltas: Sequence[LowRank | None], n: int, base: Tensor | None, mat: Tensor, dtype: torch.dtype
) -> Tensor:
    """``mat @ base^T`` ``(k, n)`` in ``dtype``; base None: ``mat @ [A_1; ..]`` by column blocks."""
    if base is not None or mat.shape[0] == 0 or not _given(deltas):
        full = base.T if base is not None else stack_a(deltas, n)
        return (mat @ full).to(dtype)
    out = torch.empty(mat.shape[0], n, dtype=dtype, device=mat.device)
    tmp: Tensor | None = None
    for i, j, block in _a_blocks(deltas, n):
        if tmp is None:  # the first block is the largest
            tmp = torch.empty(mat.shape[0], block.shape[1], dtype=_F64, device=mat.device)
        out[:, i:j] = torch.mm(mat, block, out=tmp[:, : j - i])
    return out


def core_coordinates(
    coef: Tensor, a_coef: Tensor, ranks: Sequence[int], out: list[Tensor]
) -> list[Tensor]:
    """Core Space's ``M_t = coef[:, cols_t] a_coef[:, cols_t]^T`` into ``out[t]`` ``(p, q)``.

    ``cols_t``: task t's columns (``ranks[t]`` of them; 0: a zero core). Each product in float64,
    then rounded into ``out``.
    """
    tmp, col = torch.empty(coef.shape[0], a_coef.shape[0], dtype=_F64, device=coef.device), 0
    for t, r_t in enumerate(ranks):
        if r_t == 0:
            out[t].zero_()
        else:
            out[t].copy_(torch.mm(coef[:, col : col + r_t], a_coef[:, col : col + r_t].T, out=tmp))
        col += r_t
    return out


def knots_coordinates(
    coef: Tensor, deltas: Sequence[LowRank | None], ranks: Sequence[int], out: list[Tensor]
) -> list[Tensor]:
    """KnOTS's ``V_t^T = coef[:, cols_t] A_t`` into ``out[t]`` ``(rho, n)`` (0 for rank 0).

    The product of :func:`knots_factors`, one per task in the coordinates' own dtype (float32
    for float32 factors, float64 kept): each entry is a dot product of ``r_t`` terms, within a
    few float32 ulps of the float64 product rounded (2.5e-7 of the largest entry, measured at
    rho = 192, r_t = 16), and three times faster than float64 blocks rounded into ``out`` (5 ms
    instead of 16 ms for 12 tasks, n = 4096); a TIES fit pass computes these three times per
    parameter.
    """
    for t, f in enumerate(knots_factors(coef, deltas, ranks, out[0].dtype)):
        if f is None or f.rank == 0:
            out[t].zero_()
        else:
            torch.mm(f.b, f.a, out=out[t])
    return out


def knots_factors(
    coef: Tensor, deltas: Sequence[LowRank | None], ranks: Sequence[int], dtype: torch.dtype
) -> list[LowRank | None]:
    """KnOTS's ``V_t^T = coef[:, cols_t] A_t`` left as the factors ``(coef[:, cols_t], A_t)``.

    Exact and rank ``r_t`` (rank 0 for a zero ``B_t``), in ``dtype``; None for a task without
    the module. ``A_t`` is the adapter's own factor, not a copy when already in ``dtype``.
    """
    out: list[LowRank | None] = []
    col = 0
    for d, r_t in zip(deltas, ranks, strict=True):
        if d is None:
            out.append(None)
            continue
        b = coef[:, col : col + r_t].to(dtype)
        a = d.a.to(dtype) if r_t else d.a.new_zeros(0, d.a.shape[1], dtype=dtype)
        out.append(LowRank(b, a, 1.0))
        col += r_t
    return out


def _side(
    gram: Tensor | None, stack: Callable[[], Tensor], rtol: float
) -> tuple[Side, Tensor, float]:
    """``U`` of a stack ``x`` as a :data:`Side`, ``U^T x``, and ``cond(x)`` (inf: QR route).

    From ``gram = x^T x`` when x is well conditioned (base None: x itself); otherwise (or with
    no column, gram None) Householder QR of ``stack()``.
    """
    found = None if gram is None else gram_route(gram, rtol)
    if found is not None:
        return (None, found[0]), found[1], found[2]
    x = stack()
    base, small, coef = singular_basis(x, rtol)
    return (None if base is x else base, small), coef, math.inf


def _b_gram(deltas: Sequence[LowRank | None], m: int) -> Tensor | None:
    """``B^T B`` of ``B = [s_1 B_1 ..]`` by row blocks (None: no column)."""
    gram = None
    for _, _, block in _b_blocks(deltas, m) if _given(deltas) else ():
        gram = block.T @ block if gram is None else gram.addmm_(block.T, block)
    return gram


def _a_gram(deltas: Sequence[LowRank | None], n: int) -> Tensor | None:
    """``A A^T`` of ``A = [A_1; ..]`` by column blocks (None: no row)."""
    gram = None
    for _, _, block in _a_blocks(deltas, n) if _given(deltas) else ():
        gram = block @ block.T if gram is None else gram.addmm_(block, block.T)
    return gram


def core_basis(
    deltas: Sequence[LowRank | None], shape: tuple[int, int], rtol: float
) -> tuple[Side, Tensor, Side, Tensor, bool]:
    """Core Space: ``U_B`` ``(m, p)``, ``U_B^T B`` ``(p, R)``, ``V_A`` ``(n, q)``, ``V_A^T A^T``.

    Task t's core is ``(U_B^T s_t B_t)(A_t V_A)``: columns of the two coefficient matrices,
    exactly 0 for a zero ``B_t`` (as its delta is). Last: whether ``A = [A_1; ..]`` itself can
    be a lifted delta's A factor (well conditioned, nothing cut: see ``SpaceBasis.lift``).
    """
    m, n = shape
    left, b_coef, _ = _side(_b_gram(deltas, m), lambda: stack_b(deltas, m), rtol)
    right, a_coef, cond = _side(_a_gram(deltas, n), lambda: stack_a(deltas, n).T, rtol)
    a_output = right[0] is None and cond <= _OUTPUT_COND and a_coef.shape[0] == a_coef.shape[1]
    return left, b_coef, right, a_coef, a_output


def knots_basis(
    deltas: Sequence[LowRank | None], shape: tuple[int, int], rtol: float
) -> tuple[Side, Tensor, None, None, bool]:
    """KnOTS: ``U S`` ``(m, rho)`` and ``S^-1 U^T [s_1 B_1 ..]`` ``(rho, R)`` (no right side).

    Task t's coordinates are ``V_t^T = (S^-1 U^T s_t B_t) A_t``: its columns of the second
    times ``A_t``, exactly 0 for a zero ``B_t``.
    """
    m = shape[0]
    (b_base, to_q), r_b, _ = _side(_b_gram(deltas, m), lambda: stack_b(deltas, m), 0.0)
    blocks, col = [], 0
    for d in _given(deltas):
        r_a = singular_basis(d.a.to(_F64).T, 0.0)[2]  # A_t^T = Q_t R_t; Q_t never formed
        blocks.append(r_b[:, col : col + d.rank] @ r_a.T)  # (c, k_t)
        col += d.rank
    if not blocks:
        return (b_base, to_q), r_b.new_zeros(0, 0), None, None, False
    u_c, s, _ = torch.linalg.svd(torch.cat(blocks, dim=1), full_matrices=False)
    rho = rank_of(s, rtol)
    # V_t^T = S^-1 U^T D_t = S^-1 (U^T s_t B_t) A_t with U = Q_B u_c
    coef = (u_c[:, :rho].T @ r_b) / s[:rho, None]  # (rho, R)
    return (b_base, to_q @ (u_c[:, :rho] * s[:rho])), coef, None, None, False  # U S = Q_B u_c S
