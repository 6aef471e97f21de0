"""Linear merge: the weighted average of the task deltas (mergekit's ``linear``).

Paper: "Model soups: averaging weights of multiple fine-tuned models improves accuracy without
increasing inference time" (Wortsman et al., ICML 2022), https://arxiv.org/abs/2203.05482.
Reference code: mergekit ``merge_methods/linear.py``.

Update rule: merged = sum_t w_t tau_t / sum_t w_t      (``normalize``, the default)
             merged = sum_t w_t tau_t                  (``normalize: false``)

Symbols <-> arguments: w_t = ``weights`` (models[].weight; None: all 1.0, the uniform soup).

Deviations from mergekit: mergekit averages full weights W_t = base + tau_t, and ``linear``
needs no base there. With ``normalize`` (or weights summing to 1) that is base + the merge here,
exactly; with ``normalize: false`` and sum_t w_t != 1, mergekit's result also scales the base,
sum_t w_t W_t = (sum_t w_t) base + sum_t w_t tau_t, while starmerge keeps one base: base +
sum_t w_t tau_t (task arithmetic). A base model listed among mergekit's ``models`` is a task whose
delta is zero (it still counts in sum_t w_t). Weights summing to 0 with ``normalize`` are refused
(mergekit divides by 0). mergekit requires every ``weight``; here it defaults to 1.0. Low-rank
inputs stay factored (the weighted sum of rank-r deltas is exact, rank sum_t r_t).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from starmerge.errors import ConfigError
from starmerge.methods.base import MAX_FACTOR, Merged, Param, register_method
from starmerge.methods.footprint import summed
from starmerge.methods.generalized_ta import number_list, per_model
from starmerge.tensors.delta import Delta, Dense, LowRank
from starmerge.tensors.factors import concat_lowrank

_ZERO_SUM = 1e-8  # |sum of weights| below this cannot be divided by


def linear_coefficients(
    weights: Sequence[float] | None, n_tasks: int, normalize: bool
) -> list[float]:
    """Per-task coefficients: w_t / sum_j w_j (``normalize``) or w_t.

    Raises:
        ConfigError: ``weights`` does not have one entry per task, or sums to 0 with
            ``normalize``.

    Example:
        >>> linear_coefficients([1.0, 3.0], 2, normalize=True)
        [0.25, 0.75]
    """
    ws = per_model("linear", {"weights": weights}, "weight", n_tasks)
    if not normalize:
        return ws
    total = sum(ws)
    if abs(total) < _ZERO_SUM:
        raise ConfigError(
            [
                f"linear: the weights sum to {total:g}, so normalize cannot divide by their sum; "
                "change models[].weight or set normalize: false"
            ]
        )
    return [w / total for w in ws]


@register_method(
    "linear",
    params={
        "weights": Param(
            None,
            "per-model weights w_t (default: models[].weight, else 1.0)",
            number_list(-MAX_FACTOR, MAX_FACTOR),
        ),
        "normalize": Param(True, "divide by the sum of the weights (a weighted average)"),
    },
    accepts=("dense", "lowrank"),
    lowrank_output=True,
    paper="https://arxiv.org/abs/2203.05482",
    base_counts_as_model=True,
    memory=summed,
)
def linear(
    deltas: Sequence[Delta], *, weights: Sequence[float] | None = None, normalize: bool = True
) -> Merged:
    """Weighted average of the task deltas (mergekit linear): sum_t w_t tau_t / sum_t w_t.

    Args:
        deltas: One delta per task for this parameter, all ``Dense`` or all ``LowRank``.
        weights: One weight per task, or None for all 1.0.
        normalize: Divide by the sum of the weights.

    Returns:
        The merge, factored when the inputs are ``LowRank``, in the first input's dtype.

    Raises:
        ConfigError: ``weights`` has the wrong length, or sums to 0 with ``normalize``.

    Example:
        >>> linear([Dense(torch.ones(2)), Dense(torch.zeros(2))], weights=[3.0, 1.0]).delta.tensor
        tensor([0.7500, 0.7500])
    """
    coefs = linear_coefficients(weights, len(deltas), normalize)
    if all(isinstance(d, LowRank) for d in deltas):
        return Merged(concat_lowrank(deltas, coefs))  # type: ignore[arg-type]
    total = torch.zeros(deltas[0].shape, dtype=torch.float32, device=deltas[0].device)
    for d, c in zip(deltas, coefs, strict=True):
        total += d.to_dense(torch.float32) * c
    return Merged(Dense(total.to(deltas[0].dtype)))
