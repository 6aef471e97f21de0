"""Model Stock: move from the base towards the models' average by an angle-derived ratio.

Paper: "Model Stock: All we need is just a few fine-tuned models" (Jang, Yun, Han; ECCV 2024),
https://arxiv.org/abs/2403.19522, as mergekit 0.1.5 implements it
(``merge_methods/model_stock.py``, https://github.com/arcee-ai/mergekit).

Update rule, per tensor (or per row with ``filter_wise``), for T >= 2 task vectors tau_t:
    cos    = mean over pairs i < j of <tau_i, tau_j> / max(|tau_i| |tau_j|, 1e-6)  (in [-1, 1])
    ratio  = T cos / (1 + (T - 1) cos)          (0 where |1 + (T - 1) cos| < 1e-6)
    merged = ratio * average_t(x_t) + (1 - ratio) * base;  result = ratio * (1/T) sum_t tau_t
so the base is not needed: the result is the task vectors' mean scaled by the ratio.

Symbols <-> arguments: ratio = the paper's t (``t = k cos / (1 + (k - 1) cos)``, k = T);
``filter_wise`` as in mergekit (one ratio per row of a matrix, i.e. per vector along the last
axis; a 1-D tensor is one row). Roles: mergekit's ``base_model`` is our ``base_model``, its
other models (at least two) our ``models``.

Deviations from mergekit:
- written in task deltas (mergekit subtracts the base from each model, then adds it back), so
  no base tensor is read and adapter merges need no base model;
- LoRA inputs stay factored: inner products come from the factors and the result is the mean
  of the adapters scaled per tensor (or per row: B's rows scaled), exactly low rank;
- inner products are float32 dot products, the ratio maths in float64 (mergekit: in the inputs'
  dtype); the result is returned in the first delta's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from starmerge.methods.base import Merged, Param, register_method
from starmerge.methods.footprint import Footprint, MemoryCase
from starmerge.methods.spherical import combine, gram, require_models
from starmerge.tensors.delta import Delta


def stock_ratio(grams: Tensor) -> Tensor:
    """Model Stock's ratio per vector from the ``(n_vec, T, T)`` Gram matrices (float64).

    Example:
        >>> stock_ratio(torch.tensor([[[1.0, 0.5], [0.5, 1.0]]], dtype=torch.float64))
        tensor([0.6667], dtype=torch.float64)
    """
    n_tasks = grams.shape[-1]
    norms = grams.diagonal(dim1=1, dim2=2).clamp(min=0).sqrt()  # (n_vec, T)
    pairs = [(i, j) for i in range(n_tasks) for j in range(i + 1, n_tasks)]
    cos = torch.stack(
        [
            (grams[:, i, j] / (norms[:, i] * norms[:, j]).clamp(min=1e-6)).clamp(-1, 1)
            for i, j in pairs
        ]
    ).mean(dim=0)
    denominator = 1 + (n_tasks - 1) * cos
    singular = denominator.abs() < 1e-6  # no finite estimate: keep the base
    safe = torch.where(singular, 1.0, denominator)
    return torch.where(singular, 0.0, n_tasks * cos / safe)


def _memory(case: MemoryCase) -> Footprint:
    """Dense: the scaled mean and one temporary; LoRA: the factors joined and their Grams."""
    return Footprint(case.factors(1.5) if case.lowrank else case.copies(2))


@register_method(
    "model_stock",
    params={"filter_wise": Param(False, "one ratio per row (vector along the last axis)")},
    accepts=("dense", "lowrank"),
    lowrank_output=True,
    paper="https://arxiv.org/abs/2403.19522",
    n_models=(2, None),
    memory=_memory,
)
def model_stock(deltas: Sequence[Delta], *, filter_wise: bool = False) -> Merged:
    """Model Stock: the task vectors' mean scaled by the angle-derived ratio.

    Args:
        deltas: One delta per task (at least two), all ``Dense`` or all ``LowRank``.
        filter_wise: One ratio per row instead of per tensor.

    Returns:
        The merged delta (``LowRank`` for low-rank inputs) in the first delta's dtype, and
        ``{"ratio": r}`` (the mean ratio over rows with ``filter_wise``).

    Raises:
        ConfigError: Fewer than two models.

    Example:
        >>> x, y = Dense(torch.tensor([2.0, 0.0])), Dense(torch.tensor([0.0, 2.0]))
        >>> model_stock([x, y]).delta.tensor
        tensor([0., 0.])
    """
    require_models("model_stock", len(deltas), (2, None), "it needs the angle between models")
    mode = "rows" if filter_wise else "flat"
    ratio = stock_ratio(gram(deltas, mode))  # (n_vec,)
    coefs = (ratio / len(deltas)).expand(len(deltas), -1)
    return Merged(combine(deltas, coefs, mode), {"ratio": float(ratio.mean())})
