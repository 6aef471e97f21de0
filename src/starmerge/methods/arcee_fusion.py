"""Arcee Fusion: keep only the model's most important changes (an outlier threshold on importance).

Reference: "MergeKit v0.1: Arcee Fusion" (Arcee AI blog),
https://www.arcee.ai/blog/meet-mergekit-v0-1-arcee-fusion-expanded-model-support-multi-gpu-acceleration,
as mergekit 0.1.5 implements it (``merge_methods/arcee_fusion.py``,
https://github.com/arcee-ai/mergekit).

Update rule, for the base a and the model b = a + tau (softmax and sums along the last axis):
    p = softmax(b) + 1e-8,  q = softmax(a) + 1e-8,  kl = sum p log(p / q)   (one per row)
    importance = |tau| * kl
    threshold  = median + 1.5 (Q3 - Q1) of the importance entries, Q_k = sorted[floor(k/4 (N - 1))]
    merged     = a + tau * [importance >= threshold];  result = tau * [importance >= threshold]

Symbols <-> arguments: none (mergekit has no parameters). Roles: mergekit's ``base_model`` is our
``base_model`` and its one other model our one entry under ``models`` (exactly one).

Deviations from mergekit:
- the quartiles are the exact order statistics of all N importance entries (``kthvalue``);
  mergekit sorts a random sample of 1,000,000 entries (drawn with replacement, unseeded) when
  N is larger, so its threshold, and result, vary from run to run on such tensors; at or below
  1,000,000 entries both pick the same entries;
- b is formed as base + tau in float32 (mergekit reads the stored model weights);
- computed in float32 (mergekit: the inputs' dtype); the result in the delta's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from starmerge.methods.base import Merged, register_method
from starmerge.methods.footprint import Footprint
from starmerge.methods.spherical import require_models
from starmerge.tensors.delta import Delta, Dense

_EPS = 1e-8  # mergekit's smoothing of both distributions


def importance(tau: Tensor, base: Tensor) -> Tensor:
    """``|tau| * KL(softmax(base + tau) || softmax(base))`` per row (last axis), float tensors.

    Example:
        >>> importance(torch.zeros(2, 3), torch.randn(2, 3)).abs().sum().item()
        0.0
    """
    p = torch.softmax(base + tau, dim=-1) + _EPS
    q = torch.softmax(base, dim=-1) + _EPS
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return tau.abs() * kl


def outlier_threshold(scores: Tensor) -> Tensor:
    """``median + 1.5 * (Q3 - Q1)`` with mergekit's quantile indices ``floor(q (N - 1))``.

    Computed in the scores' dtype, as mergekit does (a 0-d tensor).

    Example:
        >>> outlier_threshold(torch.arange(9.0))
        tensor(10.)
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    q1, median, q3 = (torch.kthvalue(flat, int(q * (n - 1)) + 1).values for q in (0.25, 0.5, 0.75))
    return median + 1.5 * (q3 - q1)


@register_method(
    "arcee_fusion",
    accepts=("dense",),
    needs_base=True,
    paper="https://www.arcee.ai/blog/meet-mergekit-v0-1-arcee-fusion-expanded-model-support-multi-gpu-acceleration",
    n_models=(1, 1),
    # memory: the two softmaxes, their ratio's log and the scores (the mask: 1/4 copy)
    memory=lambda case: Footprint(case.copies(4.25)),
)
def arcee_fusion(deltas: Sequence[Delta], *, base: Tensor) -> Merged:
    """Arcee Fusion of one model into the base, as mergekit's arcee_fusion.

    Args:
        deltas: The one model's dense delta.
        base: The base model's tensor of this parameter.

    Returns:
        The model's delta where its importance reaches the threshold (0 elsewhere), in the
        delta's dtype, and ``{"kept": n, "total": N}``.

    Raises:
        ConfigError: Not exactly one model.

    Example:
        >>> out = arcee_fusion([Dense(torch.zeros(2, 3))], base=torch.randn(2, 3))
        >>> out.stats
        {'kept': 6, 'total': 6}
    """
    require_models("arcee_fusion", len(deltas), (1, 1), "it fuses one model into the base")
    first = deltas[0]
    compute = torch.float64 if first.dtype == torch.float64 else torch.float32
    tau = first.to_dense(compute)
    shape = tau.shape
    tau = tau.reshape(1) if tau.ndim == 0 else tau
    scores = importance(tau, base.to(device=tau.device, dtype=compute).reshape(tau.shape))
    mask = scores >= outlier_threshold(scores)
    merged = (tau * mask).reshape(shape).to(first.dtype)
    return Merged(Dense(merged), {"kept": int(mask.sum()), "total": mask.numel()})
