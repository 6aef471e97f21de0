"""Shared maths of the spherical (interpolating) methods: Gram matrices and linear combinations.

mergekit's SLERP, NuSLERP, Multi-SLERP, Karcher mean and Model Stock all produce, per vector
(the whole flattened tensor, or each row, or each column), a linear combination of their inputs
whose coefficients depend only on the inputs' inner products. So each kernel here computes the
small Gram matrix of its inputs (float64, per vector), derives the coefficients with scalar
trigonometry, and forms the combination once:

- ``gram(deltas, mode)``: ``(n_vec, T, T)`` inner products; for ``LowRank`` deltas from the
  factors, never densifying (``<s B A, s' B' A'> = s s' sum((B^T B') * (A A'^T))``, rows
  ``diag(B (A A'^T) B'^T)``, columns ``diag(A^T (B^T B') A')``);
- ``combine(deltas, coefs, mode)``: ``sum_t coefs[t] * tau_t`` per vector; for ``LowRank``
  deltas the coefficients fold into the factors (rows scale ``B``, columns scale ``A``), so the
  result is exactly low rank (the factors concatenated).

Vectors (``mode``): ``flat`` = the whole tensor; ``rows`` = vectors along the last axis (rows
of an ``(out, in)`` weight); ``cols`` = vectors along the first axis (its columns). Tensors with
fewer than 2 dimensions are one vector in every mode, as in mergekit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from starmerge.errors import ConfigError
from starmerge.methods.base import count_problem
from starmerge.tensors.delta import Delta, Dense, LowRank

Mode = Literal["flat", "rows", "cols"]


def require_models(method: str, n_tasks: int, allowed: tuple[int, int | None], what: str) -> None:
    """Refuse a number of task models the method does not define.

    Args:
        method: The method's name, for the message.
        n_tasks: Number of task models T given.
        allowed: ``(lo, hi)``: the counts the method takes (``hi`` None: no upper bound).
        what: What the method does with them, for the message.

    Raises:
        ConfigError: ``n_tasks`` is not allowed.
    """
    problem = count_problem(method, n_tasks, allowed)
    if problem:
        raise ConfigError([problem.replace(", got", f" ({what}), got", 1)])


def _view(x: Tensor, mode: Mode) -> Tensor:
    """``x`` as ``(n_vec, length)``, one vector per row (a view where possible)."""
    if mode == "flat" or x.ndim < 2:
        return x.reshape(1, -1)
    if mode == "rows":
        return x.reshape(-1, x.shape[-1])
    return x.reshape(x.shape[0], -1).T


def _compute(delta: Delta) -> torch.dtype:
    return torch.float64 if delta.dtype == torch.float64 else torch.float32


def _lowrank_inner(x: LowRank, y: LowRank, mode: Mode) -> Tensor:
    """Per-vector inner products of two low-rank matrices from their factors (float64)."""
    bx, ax = x.b.to(torch.float64), x.a.to(torch.float64)  # (m, r), (r, n)
    by, ay = y.b.to(torch.float64), y.a.to(torch.float64)  # (m, q), (q, n)
    scale = float(x.scale) * float(y.scale)
    if mode == "flat":
        return (((bx.T @ by) * (ax @ ay.T)).sum() * scale).reshape(1)
    if mode == "rows":  # row i: b_x,i^T (A_x A_y^T) b_y,i
        return ((bx @ (ax @ ay.T)) * by).sum(dim=1) * scale
    return ((bx.T @ by @ ay) * ax).sum(dim=0) * scale  # column j: a_x,j^T (B_x^T B_y) a_y,j


def gram(deltas: Sequence[Delta], mode: Mode = "flat") -> Tensor:
    """The Gram matrices ``<tau_i, tau_j>`` per vector, shape ``(n_vec, T, T)``, float64, CPU.

    Dense deltas: float32 (float64 kept) products summed per vector; low-rank: from the factors.

    Example:
        >>> gram([Dense(torch.tensor([3.0, 4.0])), Dense(torch.tensor([1.0, 0.0]))])[0]
        tensor([[25.,  3.],
                [ 3.,  1.]], dtype=torch.float64)
    """
    n = len(deltas)
    lowrank = all(isinstance(d, LowRank) for d in deltas) and len(deltas[0].shape) == 2
    views = None if lowrank else [_view(d.to_dense(_compute(deltas[0])), mode) for d in deltas]
    out: Tensor | None = None
    for i in range(n):
        for j in range(i, n):
            if views is None:
                g = _lowrank_inner(deltas[i], deltas[j], mode)  # type: ignore[arg-type]
            else:
                g = (views[i] * views[j]).sum(dim=1).to(torch.float64)
            if out is None:
                out = torch.zeros(g.shape[0], n, n, dtype=torch.float64)
            out[:, i, j] = out[:, j, i] = g.cpu()
    assert out is not None
    return out


def dense_gram(vectors: Sequence[Tensor]) -> Tensor:
    """The ``(K, K)`` Gram matrix of whole tensors (float32 dot products), float64 on the CPU."""
    flat = [v.reshape(-1) for v in vectors]
    out = torch.zeros(len(flat), len(flat), dtype=torch.float64)
    for i, x in enumerate(flat):
        for j in range(i, len(flat)):
            out[i, j] = out[j, i] = float(torch.dot(x, flat[j]))
    return out


def combine(deltas: Sequence[Delta], coefs: Tensor, mode: Mode = "flat") -> Delta:
    """``sum_t coefs[t] * tau_t``, per vector; exactly low rank when every delta is.

    Args:
        deltas: The T task deltas (same shape).
        coefs: ``(T, n_vec)`` coefficients (``n_vec`` from the vectors of ``mode``).
        mode: How the tensor splits into vectors.

    Returns:
        ``LowRank`` (factors concatenated) for low-rank inputs, else ``Dense``; in the first
        delta's dtype, on its device.
    """
    first = deltas[0]
    compute = _compute(first)
    if all(isinstance(d, LowRank) for d in deltas):
        return _combine_lowrank(deltas, coefs, mode)  # type: ignore[arg-type]
    total = torch.zeros(first.shape, dtype=compute, device=first.device)
    view = _view(total, mode)  # a view: adding into it fills ``total``
    for d, c in zip(deltas, coefs, strict=True):
        c = c.to(device=first.device, dtype=compute)[:, None]  # (n_vec, 1)
        view += _view(d.to_dense(compute), mode) * c
    return Dense(total.to(first.dtype))


def _combine_lowrank(deltas: Sequence[LowRank], coefs: Tensor, mode: Mode) -> LowRank:
    """Coefficients folded into the factors (rows: ``B``; columns: ``A``), then concatenated."""
    first = deltas[0]
    compute = _compute(first)
    bs, as_ = [], []
    for d, c in zip(deltas, coefs, strict=True):
        c = c.to(device=first.device, dtype=compute)
        b, a = d.b.to(compute) * float(d.scale), d.a.to(compute)  # (m, r), (r, n)
        if mode == "flat":
            b = b * c[0]
        elif mode == "rows":
            b = b * c[:, None]
        else:
            a = a * c[None, :]
        bs.append(b)
        as_.append(a)
    b_cat, a_cat = torch.cat(bs, dim=1), torch.cat(as_, dim=0)
    return LowRank(b_cat.to(first.dtype), a_cat.to(first.dtype), 1.0)


def weighted_dense(base: Tensor, base_coef: float, deltas: Sequence[Delta], coefs: Tensor) -> Dense:
    """``base_coef * base + sum_t coefs[t] * tau_t`` as a dense tensor (scalar coefficients).

    The interpolation of weights ``sum_t c_t (base + tau_t)`` minus the base, written in deltas
    so that a zero ``base_coef`` (the linear branches) adds no rounding of the base at all.
    """
    first = deltas[0]
    compute = _compute(first)
    total = torch.zeros(first.shape, dtype=compute, device=first.device)
    if base_coef != 0.0:
        total += base.to(compute) * base_coef
    for d, c in zip(deltas, coefs.tolist(), strict=True):
        if c != 0.0:
            total += d.to_dense(compute) * c
    return Dense(total.to(first.dtype))
