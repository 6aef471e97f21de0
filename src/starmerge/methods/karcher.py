"""Karcher mean: the Riemannian (Frechet) mean of the models' weights on the hypersphere.

Reference: mergekit 0.1.5's ``karcher`` (``merge_methods/karcher.py``,
https://github.com/arcee-ai/mergekit; its reference https://arxiv.org/abs/2603.04972; the
Karcher mean: https://en.wikipedia.org/wiki/Karcher_mean).

Update rule, on the weights x_t = base + tau_t (each whole tensor flattened), alpha_t = 1 / T:
    n_t = |x_t|, u_t = x_t / n_t; only the points with n_t > tol take part (weights renormalized)
    m   = sum_t a_t u_t / |.|               (u of the first point when that norm is below tol)
    repeat max_iter times:
        theta_t = acos(<m, u_t>)
        v = sum over theta_t >= tol of a_t theta_t / sin(theta_t) (u_t - cos(theta_t) m)
        stop when |v| < tol;  m = cos|v| m + sin|v| v / |v|;  m = m / |m|   (when |m| > tol)
    merged = (sum_t alpha_t n_t) m;  result = merged - base
One model, or models that are all equal: that model.

Symbols <-> arguments: ``max_iter``, ``tol`` as in mergekit. Roles: mergekit averages every model
it is given (its docs: no base_model); here the models are ``models``, and ``base_model`` only
turns their task deltas back into weights. A mergekit config that also names a base_model makes
the base one more point of the mean; starmerge reads such a config with the base added to
``models`` (a zero task delta; ``base_counts_as_model``), and in a starmerge config the base is
listed under ``models`` for the same result.

Deviations from mergekit:
- each iterate is a linear combination of the points, so the iteration runs on their T x T Gram
  matrix (float32 dot products, float64 scalar maths) and the result is formed once, in delta
  form ``(sum_t c_t - 1) base + sum_t c_t tau_t``; mergekit iterates on float32 tensors;
- theta / sin(theta) is guarded: 1 where theta is below 1e-12, sin(theta) at least 1e-12;
- equal models return their delta exactly (mergekit: the same up to rounding);
- computed in float32 whatever the inputs' dtype; the result in the task deltas' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from starmerge.methods.base import Merged, Param, in_range, register_method
from starmerge.methods.footprint import Footprint
from starmerge.methods.spherical import dense_gram, weighted_dense
from starmerge.tensors.delta import Delta, Dense

_TINY = 1e-12  # guards theta / sin(theta)


def _norm(x: Tensor, g: Tensor) -> float:
    """``|sum_t x_t p_t|`` for the points' Gram matrix ``g`` (clamped at 0 against rounding)."""
    return math.sqrt(max(float(x @ g @ x), 0.0))


def _tangent(mean: Tensor, g: Tensor, units: Tensor, alphas: Tensor, tol: float) -> Tensor:
    """The log-map average sum_t a_t theta_t / sin(theta_t) (u_t - cos(theta_t) m)."""
    tangent = torch.zeros_like(mean)
    dots = (units @ g @ mean).clamp(-1.0, 1.0)  # <m, u_t>
    for t in range(units.shape[0]):
        if alphas[t] == 0:  # not a valid point
            continue
        theta = math.acos(float(dots[t]))
        if theta < tol:
            continue
        ratio = 1.0 if theta < _TINY else theta / max(math.sin(theta), _TINY)
        tangent += float(alphas[t]) * ratio * (units[t] - float(dots[t]) * mean)
    return tangent


def karcher_coefficients(g: Tensor, max_iter: int, tol: float) -> tuple[Tensor, int]:
    """The Karcher mean (mergekit's iteration) as coefficients: ``merged = sum_t c_t x_t``.

    Args:
        g: ``(T, T)`` Gram matrix of the points x_t (float64).
        max_iter: Maximum iterations.
        tol: Tolerance (norms, angles, tangent length).

    Returns:
        The coefficients ``(T,)`` and the number of iterations run.

    Example:
        >>> karcher_coefficients(torch.eye(2, dtype=torch.float64), 10, 1e-5)[0]
        tensor([0.7071, 0.7071], dtype=torch.float64)
    """
    n = g.shape[0]
    norms = g.diagonal().clamp(min=0).sqrt()
    alphas = torch.full((n,), 1.0 / n, dtype=torch.float64)
    valid = norms > tol
    if not bool(valid.any()):
        return torch.zeros(n, dtype=torch.float64), 0
    units = torch.diag(torch.where(norms > 0, 1.0 / norms.clamp(min=_TINY), 0.0))  # rows: u_t
    a = torch.where(valid, alphas, 0.0)
    a = a / a.sum()
    mean = a @ units
    mean_norm = _norm(mean, g)
    first = int(valid.nonzero()[0])
    mean = units[first].clone() if mean_norm < tol else mean / mean_norm
    steps = 0
    while steps < max_iter:
        steps += 1
        tangent = _tangent(mean, g, units, a, tol)
        tangent_norm = _norm(tangent, g)
        if tangent_norm < tol:
            break
        mean = math.cos(tangent_norm) * mean + math.sin(tangent_norm) * tangent / tangent_norm
        unit_norm = _norm(mean, g)
        if unit_norm > tol:
            mean = mean / unit_norm
    return float((alphas * norms).sum()) * mean, steps


@register_method(
    "karcher",
    params={
        "max_iter": Param(
            10, "maximum iterations of the Karcher mean", in_range(0, 10_000, lo_open=False)
        ),
        "tol": Param(1e-5, "convergence tolerance (norms, angles, step)", in_range(0, 1)),
    },
    accepts=("dense",),
    needs_base=True,
    paper="https://arxiv.org/abs/2603.04972",
    base_counts_as_model=True,
    # memory: the running mean and one tangent-space temporary
    memory=lambda case: Footprint(case.copies(2)),
)
def karcher(
    deltas: Sequence[Delta], *, max_iter: int = 10, tol: float = 1e-5, base: Tensor
) -> Merged:
    """Karcher mean of the models' weights on the hypersphere, as mergekit's karcher.

    Args:
        deltas: One dense delta per task.
        max_iter: Maximum iterations.
        tol: Convergence tolerance, in (0, 1].
        base: The base model's tensor of this parameter.

    Returns:
        The mean's weights minus the base, in the deltas' dtype, and ``{"iterations": k}``.

    Example:
        >>> base = torch.tensor([1.0, 0.0])
        >>> karcher([Dense(torch.tensor([-1.0, 1.0])), Dense(torch.tensor([0.0, 0.0]))],
        ...         base=base).delta.tensor
        tensor([-0.2929,  0.7071])
    """
    first = deltas[0].to_dense()
    if all(torch.equal(d.to_dense(), first) for d in deltas[1:]):
        return Merged(Dense(first.clone()), {"iterations": 0})
    compute = torch.float64 if first.dtype == torch.float64 else torch.float32
    b = base.to(device=first.device, dtype=compute)
    g = dense_gram([b, *(d.to_dense(compute) for d in deltas)])  # over (base, tau_1..tau_T)
    points = torch.cat([torch.ones(len(deltas), 1), torch.eye(len(deltas))], dim=1).double()
    coefs, steps = karcher_coefficients(points @ g @ points.T, max_iter, tol)
    base_coef = float(coefs.sum()) - 1.0
    return Merged(weighted_dense(b, base_coef, deltas, coefs), {"iterations": steps})
