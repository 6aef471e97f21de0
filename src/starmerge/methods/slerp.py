"""SLERP and NuSLERP: spherical linear interpolation of two weights or two task vectors.

Reference: "Slerp" (Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985),
https://en.wikipedia.org/wiki/Slerp, as mergekit 0.1.5 implements it (``merge_methods/slerp.py``,
``merge_methods/nuslerp.py``; https://github.com/arcee-ai/mergekit); NuSLERP is documented at
https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md.

slerp, on the weights (the whole flattened tensor is one vector):
    v0, v1  = the two endpoints' weights; cos = <v0, v1> / (|v0| |v1|)  (a norm <= 1e-8 counts 1)
    |cos| > 0.9995:  merged = (1 - t) v0 + t v1                            (mergekit's lerp)
    otherwise:       merged = (sin((1 - t) theta) v0 + sin(t theta) v1) / sin(theta), theta = acos
    result  = merged - base
nuslerp, on the two task vectors (mergekit's rule when a base_model is given):
    t = w_2 / (w_1 + w_2) (0.5 when |w_1 + w_2| < 1e-6); per vector (flattened, rows or columns)
    cos = <tau_1, tau_2> / (max(|tau_1|, 1e-7) max(|tau_2|, 1e-7));
    1 - cos^2 <= 1e-16:  (1 - t) tau_1 + t tau_2, else the sine formula above on tau_1, tau_2.

Symbols <-> arguments and roles: mergekit's slerp takes its ``base_model`` (t = 0) and one other
model (t = 1). Here ``base_model`` is the common base of the task deltas, so with one model the
endpoints are v0 = base and v1 = base + tau_1 (mergekit's config with our base_model as its
base_model), and with two models v0 = base + tau_1 (t = 0) and v1 = base + tau_2 (t = 1), i.e.
mergekit's config whose base_model is our models[0]. Other counts are refused. ``t`` = t.
nuslerp: ``weights`` = the per-model ``weight`` (filled from ``models[].weight``; unset: equal),
``nuslerp_flatten``, ``nuslerp_row_wise`` as in mergekit (its code interpolates the vectors
along dim 0 when row-wise, i.e. the columns of an ``(out, in)`` weight, and the rows otherwise).

Deviations from mergekit:
- the endpoints' norms and inner products come from one Gram matrix (float32 dot products,
  scalar trigonometry in float64) and the result is formed once in delta form, ``(c0 + c1 - 1)
  base + c0 tau_1 + c1 tau_2``; on the linear branches the base term is exactly 0, so equal
  inputs give exactly a zero delta (mergekit's float32 ``lerp`` rounds there);
- nuslerp never reads the base (its rule only uses task vectors), so it works on adapters without
  a base model, and on LoRA inputs it stays exactly low rank: the coefficients come from the
  factors and fold into them (rows scale B, columns scale A); mergekit's base-less form, which
  interpolates raw weights, is not offered (a starmerge merge always has task deltas);
- slerp's ``t`` has a default (0.5; mergekit requires it) and must lie in [0, 1];
- inputs are computed in float32 whatever their dtype (mergekit computes nuslerp in the inputs'
  dtype), the result is returned in the task deltas' dtype.

Multi-SLERP lives in :mod:`starmerge.methods.multislerp`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from starmerge.methods.base import Merged, Param, in_range, register_method
from starmerge.methods.footprint import Footprint, MemoryCase
from starmerge.methods.params import check_weights, task_weights
from starmerge.methods.spherical import (
    combine,
    dense_gram,
    gram,
    require_models,
    weighted_dense,
)
from starmerge.tensors.delta import Delta

DOT_THRESHOLD = (
    0.9995  # mergekit slerp: above it (in |cos|) the endpoints are interpolated linearly
)
NORM_EPS = 1e-8  # mergekit slerp: norms at or below count as 1
NUSLERP_NORM_EPS = 1e-7  # mergekit nuslerp's _normalize clamp
NUSLERP_EPS = 1e-8  # mergekit nuslerp: colinear when 1 - cos^2 <= eps^2


def slerp_coefficients(t: float, gram2: Tensor) -> tuple[float, float, bool]:
    """The slerp coefficients (mergekit's rule) of v0 and v1 from their ``(2, 2)`` Gram matrix.

    Returns:
        ``(c0, c1, linear)``: merged = c0 v0 + c1 v1; ``linear`` on the lerp branch.

    Example:
        >>> slerp_coefficients(0.5, torch.eye(2, dtype=torch.float64))[0]
        0.7071067811865475
    """
    norms = [math.sqrt(max(float(gram2[i, i]), 0.0)) for i in range(2)]
    norms = [n if n > NORM_EPS else 1.0 for n in norms]
    dot = min(max(float(gram2[0, 1]) / (norms[0] * norms[1]), -1.0), 1.0)
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t, True
    theta = math.acos(dot)
    sin_theta = math.sin(theta)  # >= sin(acos(0.9995)) = 0.0316 here
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta, False


@register_method(
    "slerp",
    params={
        "t": Param(
            0.5,
            "interpolation factor: 0 = the base (one model) or models[0], 1 = the last model",
            in_range(0, 1, lo_open=False),
        ),
    },
    accepts=("dense",),
    needs_base=True,
    paper="https://en.wikipedia.org/wiki/Slerp",
    n_models=(1, 2),
    # memory: the interpolated tensor and one temporary
    memory=lambda case: Footprint(case.copies(2)),
)
def slerp(deltas: Sequence[Delta], *, t: float = 0.5, base: Tensor) -> Merged:
    """SLERP of two weights, as mergekit's slerp: base to model, or model 1 to model 2.

    Args:
        deltas: One dense delta (endpoints base and base + tau_1) or two (base + tau_1 and
            base + tau_2).
        t: Interpolation factor in [0, 1].
        base: The base model's tensor of this parameter.

    Returns:
        The interpolated weights minus the base, in the deltas' dtype, and ``{"lerp": bool}``
        (True where mergekit's near-parallel linear branch was taken).

    Raises:
        ConfigError: Not one or two models.

    Example:
        >>> base = torch.tensor([1.0, 0.0])
        >>> slerp([Dense(torch.tensor([-1.0, 1.0]))], t=0.5, base=base).delta.tensor
        tensor([-0.2929,  0.7071])
    """
    require_models("slerp", len(deltas), (1, 2), "it interpolates between two endpoints")
    first = deltas[0]
    compute = torch.float64 if first.dtype == torch.float64 else torch.float32
    b = base.to(device=first.device, dtype=compute)
    g = dense_gram([b, *(d.to_dense(compute) for d in deltas)])  # over (base, tau_1[, tau_2])
    ends = torch.zeros(2, g.shape[0], dtype=torch.float64)  # endpoints in that basis
    ends[:, 0] = 1.0
    ends[0, 1] = 1.0 if len(deltas) == 2 else 0.0  # v0 = base (+ tau_1 with two models)
    ends[1, -1] = 1.0  # v1 = base + the last task's tau
    c0, c1, linear = slerp_coefficients(t, ends @ g @ ends.T)
    coefs = torch.tensor([c0, c1] if len(deltas) == 2 else [c1], dtype=torch.float64)
    base_coef = 0.0 if linear else c0 + c1 - 1.0
    return Merged(weighted_dense(b, base_coef, deltas, coefs), {"lerp": linear})


def nuslerp_coefficients(t: float, grams: Tensor) -> Tensor:
    """The nuslerp coefficients (mergekit's rule) of tau_1, tau_2 per vector, ``(2, n_vec)``.

    Args:
        t: Interpolation factor (0 gives tau_1).
        grams: ``(n_vec, 2, 2)`` Gram matrices of the two vectors.

    Example:
        >>> nuslerp_coefficients(0.5, torch.eye(2, dtype=torch.float64)[None])[:, 0]
        tensor([0.7071, 0.7071], dtype=torch.float64)
    """
    norms = grams.diagonal(dim1=1, dim2=2).clamp(min=0).sqrt().clamp(min=NUSLERP_NORM_EPS)
    cos = (grams[:, 0, 1] / (norms[:, 0] * norms[:, 1])).clamp(-1, 1)
    colinear = (1 - cos.square()) <= NUSLERP_EPS**2
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    sin_theta = torch.where(colinear, 1.0, torch.sin(theta))  # > 1e-8 off the colinear branch
    c0 = torch.where(colinear, 1.0 - t, torch.sin((1.0 - t) * theta) / sin_theta)
    c1 = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)
    return torch.stack([c0, c1])


def _nuslerp_memory(case: MemoryCase) -> Footprint:
    """Dense: the interpolation and one temporary; LoRA: the two factor pairs, scaled."""
    return Footprint(case.factors(1.5) if case.lowrank else case.copies(2))


@register_method(
    "nuslerp",
    params={
        "weights": Param(
            None, "per-model weights w_1, w_2: t = w_2 / (w_1 + w_2) (unset: equal)", check_weights
        ),
        "nuslerp_row_wise": Param(
            False, "with nuslerp_flatten false: interpolate vectors along dim 0 (columns)"
        ),
        "nuslerp_flatten": Param(True, "interpolate each tensor as one flat vector"),
    },
    accepts=("dense", "lowrank"),
    lowrank_output=True,
    paper="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
    n_models=(2, 2),
    memory=_nuslerp_memory,
)
def nuslerp(
    deltas: Sequence[Delta],
    *,
    weights: Sequence[float] | None = None,
    nuslerp_row_wise: bool = False,
    nuslerp_flatten: bool = True,
) -> Merged:
    """NuSLERP of two task vectors, as mergekit's nuslerp with a base model.

    Args:
        deltas: The two task deltas, both ``Dense`` or both ``LowRank``.
        weights: ``[w_1, w_2]``, or None for equal weights (t = 0.5).
        nuslerp_row_wise: Without flattening, interpolate the vectors along dim 0.
        nuslerp_flatten: Interpolate the whole tensor as one vector (mergekit's default).

    Returns:
        The interpolated delta (``LowRank`` for low-rank inputs) in the first delta's dtype.

    Raises:
        ConfigError: Not exactly two models, or ``weights`` not one per model.

    Example:
        >>> x, y = Dense(torch.tensor([1.0, 0.0])), Dense(torch.tensor([0.0, 1.0]))
        >>> nuslerp([x, y]).delta.tensor
        tensor([0.7071, 0.7071])
    """
    require_models("nuslerp", len(deltas), (2, 2), "it interpolates between two task vectors")
    w1, w2 = task_weights(weights, 2, "nuslerp")
    t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
    mode = "flat" if nuslerp_flatten else ("cols" if nuslerp_row_wise else "rows")
    coefs = nuslerp_coefficients(t, gram(deltas, mode))
    return Merged(combine(deltas, coefs, mode))
