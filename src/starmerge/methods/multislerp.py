"""Multi-SLERP: barycentric interpolation of several task vectors on a hypersphere.

Reference: "Multi-SLERP" (Goddard), https://goddard.blog/posts/multislerp-wow-what-a-cool-idea,
as mergekit 0.1.5 implements it (``merge_methods/multislerp.py``,
https://github.com/arcee-ai/mergekit), with a base model (mergekit's task-vector form).

Update rule, for the task vectors tau_t (each whole tensor flattened), weights w_t
(divided by their sum when ``normalize_weights``):
    u_t     = tau_t / (|tau_t| + eps)                                   (onto the unit sphere)
    m       = sum_t w_t u_t;  if |m| < eps: merged = sum_t w_t tau_t    (mergekit: 2 models only)
    m       = m / |m|                                          (the weighted Euclidean mean)
    v       = sum_t w_t (u_t - <u_t, m> m)                     (the tangent-space interpolation)
    merged  = (m cos(|v|+eps) + v sin(|v|+eps) / (|v|+eps)) * sum_t w_t |tau_t|   (exponential map)
One model: its task vector, unchanged.

Symbols <-> arguments: ``weights`` = mergekit's per-model ``weight`` (filled from
``models[].weight``; unset: all 1), ``normalize_weights``, ``eps`` as in mergekit. Roles:
mergekit's ``base_model`` is our ``base_model``; its models are our ``models``.

Deviations from mergekit:
- every quantity is a linear combination of the task vectors with coefficients from their Gram
  matrix, so the Gram matrix is computed once (float32 dot products, the scalar maths in
  float64) and the result formed once; LoRA inputs stay exactly low rank (inner products from
  the factors, coefficients folded into them) and the base is never read;
- when the weighted mean of the unit vectors vanishes (|m| < eps: all task vectors zero, or
  antipodal ones with balancing weights) mergekit falls back to the weighted sum for two models
  but raises for three or more; here every count gets the weighted sum (zero for zero task
  vectors, e.g. the many tensors a LoRA fine-tune leaves unchanged);
- weights that sum to 0 are refused when resolving the parameters (mergekit divides by the sum);
- mergekit's base-less form (interpolating raw weights) is not offered: a starmerge merge
  always has task deltas;
- computed in float32 (float64 for the scalar maths), whatever the inputs' dtype; the result is
  returned in the first delta's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from starmerge.methods.base import Merged, Param, in_range, register_method
from starmerge.methods.footprint import Footprint, MemoryCase
from starmerge.methods.params import check_weights, task_weights
from starmerge.methods.spherical import combine, gram
from starmerge.tensors.delta import Delta


def _check_weights(value: Any) -> str | None:
    """``check_weights``, and a sum away from 0 (the weights are divided by it)."""
    problem = check_weights(value)
    if problem is None and value is not None and abs(sum(value)) < 1e-12:
        return "must not sum to 0 (multislerp divides the weights by their sum)"
    return problem


def _quad(x: Tensor, g: Tensor) -> float:
    """``|sum_t x_t tau_t|`` from the Gram matrix ``g`` (clamped at 0 against rounding)."""
    return math.sqrt(max(float(x @ g @ x), 0.0))


def multislerp_coefficients(g: Tensor, weights: Tensor, eps: float) -> Tensor:
    """The coefficients ``c_t`` of ``merged = sum_t c_t tau_t``, from the Gram matrix.

    Args:
        g: ``(T, T)`` Gram matrix of the task vectors (float64).
        weights: ``(T,)`` weights, normalized already where asked (float64).
        eps: mergekit's ``eps``.

    Example:
        >>> multislerp_coefficients(torch.eye(2, dtype=torch.float64),
        ...                         torch.tensor([0.5, 0.5], dtype=torch.float64), 1e-8)
        tensor([0.7071, 0.7071], dtype=torch.float64)
    """
    norms = g.diagonal().clamp(min=0).sqrt()
    inv = 1.0 / (norms + eps)  # u_t = inv_t * tau_t
    mean = weights * inv
    mean_norm = _quad(mean, g)
    if mean_norm < eps:  # no direction to interpolate around: the weighted sum
        return weights.clone()
    mean = mean / mean_norm
    dots = (g @ mean) * inv  # <u_t, m>
    tangent = weights * inv - (weights * dots).sum() * mean
    tangent_norm = _quad(tangent, g) + eps
    point = mean * math.cos(tangent_norm) + tangent * (math.sin(tangent_norm) / tangent_norm)
    return point * float((norms * weights).sum())


def _memory(case: MemoryCase) -> Footprint:
    """Dense: the weighted mean and its projection; LoRA: the factors joined and their Grams."""
    return Footprint(case.factors(1.5) if case.lowrank else case.copies(2))


@register_method(
    "multislerp",
    params={
        "weights": Param(None, "per-model weights w_t (unset: all 1)", _check_weights),
        "normalize_weights": Param(True, "divide the weights by their sum"),
        "eps": Param(1e-8, "numerical-stability constant", in_range(0, 1)),
    },
    accepts=("dense", "lowrank"),
    lowrank_output=True,
    paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    memory=_memory,
)
def multislerp(
    deltas: Sequence[Delta],
    *,
    weights: Sequence[float] | None = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> Merged:
    """Multi-SLERP of the task vectors, as mergekit's multislerp with a base model.

    Args:
        deltas: One delta per task, all ``Dense`` or all ``LowRank``.
        weights: One weight per model, or None for all 1.
        normalize_weights: Divide the weights by their sum.
        eps: Numerical-stability constant, in (0, 1].

    Returns:
        The merged delta (``LowRank`` for low-rank inputs) in the first delta's dtype.

    Raises:
        ConfigError: ``weights`` does not have one entry per model.

    Example:
        >>> x, y = Dense(torch.tensor([1.0, 0.0])), Dense(torch.tensor([0.0, 1.0]))
        >>> multislerp([x, y]).delta.tensor
        tensor([0.7071, 0.7071])
    """
    w = torch.tensor(task_weights(weights, len(deltas), "multislerp"), dtype=torch.float64)
    if len(deltas) == 1:
        return Merged(deltas[0])
    if normalize_weights:
        w = w / w.sum()
    coefs = multislerp_coefficients(gram(deltas, "flat")[0], w, eps)
    return Merged(combine(deltas, coefs[:, None], "flat"))
