"""Conjugate gradient on a symmetric positive semi-definite operator, in torch.

Used by MaTS (:mod:`starmerge.methods.mats`) per parameter block, on the deltas' device. The
operator is any callable ``x -> A x`` on tensors of the block's shape (a diagonal, a Gram matrix on
one side, a sum of Kronecker products); inner products are over all entries.

Stopping: after ``iterations`` steps, or once ``||b - A x||_F <= tolerance * ||b||_F`` (a relative
tolerance on the *delta-space* right-hand side, so it does not depend on the size of the
pretrained weights), or once the residual reaches rounding level (16 machine epsilons of ``b``'s
dtype times ``||b||``: ``tolerance = 0`` runs until then), or when a search direction has no
curvature (``p^T A p <= 0``). Iterating past rounding level would only add noise, including in
the null space.

CG never changes the component of ``x0`` in the null space of ``A`` when ``b`` is in its range:
every residual and search direction lies in the range of ``A``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

_ROUNDING = 16  # the residual floor, in units of the dtype's machine epsilon


@dataclass(frozen=True)
class CGResult:
    """The solution, the number of iterations run and the final relative residual."""

    x: Tensor
    iterations: int
    residual: float


def conjugate_gradient(
    apply: Callable[[Tensor], Tensor],
    b: Tensor,
    x0: Tensor,
    *,
    iterations: int,
    tolerance: float,
) -> CGResult:
    """Solve ``A x = b`` for a symmetric PSD operator ``A`` by conjugate gradient from ``x0``.

    Args:
        apply: ``x -> A x`` (same shape in and out).
        b: The right-hand side.
        x0: The initial guess (not modified).
        iterations: The maximum number of CG steps.
        tolerance: Stop once ``||r|| <= tolerance * ||b||`` (Frobenius norms); 0: only at
            rounding level.

    Returns:
        The iterate, the steps taken and ``||b - A x|| / ||b||`` (0 when ``b`` is 0).

    Example:
        >>> a = torch.diag(torch.tensor([2.0, 4.0]))
        >>> conjugate_gradient(lambda v: a @ v, torch.tensor([2.0, 4.0]), torch.zeros(2),
        ...                    iterations=10, tolerance=0).x
        tensor([1., 1.])
    """
    x = x0.clone()
    r = b - apply(x)
    p = r.clone()
    rs = torch.sum(r * r)
    b_norm = float(torch.linalg.vector_norm(b))
    # never iterate below rounding level: past it, directions pick up null-space noise
    stop = max(tolerance, _ROUNDING * torch.finfo(b.dtype).eps) * b_norm
    steps = 0
    while steps < iterations and float(rs.sqrt()) > stop:
        ap = apply(p)
        curvature = torch.sum(p * ap)
        if float(curvature) <= 0.0:
            break
        alpha = rs / curvature
        x.add_(alpha * p)
        r.sub_(alpha * ap)
        rs_new = torch.sum(r * r)
        p = r + (rs_new / rs) * p
        rs = rs_new
        steps += 1
    residual = float(torch.linalg.vector_norm(b - apply(x)))
    return CGResult(x, steps, residual / b_norm if b_norm > 0 else 0.0)
