"""Task Arithmetic: a scaled (weighted) sum of task vectors.

Paper: "Editing Models with Task Arithmetic" (Ilharco, Ribeiro, Wortsman, Gururangan, Schmidt,
Hajishirzi, Farhadi; ICLR 2023), https://arxiv.org/abs/2212.04089.

Update rule: merged = scaling * sum_t w_t * tau_t            (``normalize: false``, the default)
             merged = scaling * sum_t w_t * tau_t / sum_t w_t  (``normalize: true``, mergekit's
             option; a sum of weights below 1e-8 in magnitude divides by 1, as mergekit)

Symbols <-> arguments: scaling = lambda (the paper's single scaling coefficient);
weights = w_t, one per model in task order (filled by the pipeline from ``models[].weight``;
None means every w_t = 1, the paper's rule); normalize = mergekit's ``normalize``.

mergekit's ``task_arithmetic`` (``GeneralizedTaskArithmeticMerge`` without sparsification or
consensus) is this rule with its ``lambda`` = scaling, ``weight`` = w_t and ``normalize`` (default
false there too); it ignores its ``density`` and ``rescale`` (no sparsification), and so may a
translated config. mergekit requires every ``weight``; here it defaults to 1.0.

Deviations from the reference code (IBM/STAR ``merger/simple_avg.py weighted_merge``, which
computes sum_t alpha_t * tau_t; alpha_t = scaling * w_t here): none in the result. Low-rank
inputs stay factored: the sum of T rank-r deltas is the concatenation of the factors (rank
sum_t r_t), exact, with no dense T-way sum.

Separable as the sum of ``scale_task`` only with ``normalize: false``: the per-task transform does
not see the other tasks' weights, so it refuses ``normalize: true`` (merge with the kernel).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from starmerge.errors import ConfigError
from starmerge.methods.base import Merged, Param, factor_range, register_method
from starmerge.methods.contract import Separable
from starmerge.methods.footprint import summed
from starmerge.methods.params import check_weights, task_weights
from starmerge.tensors.delta import Delta, Dense, LowRank
from starmerge.tensors.factors import concat_lowrank

_ZERO_SUM = 1e-8  # mergekit: a summed weight below this is replaced by 1


def normalized_coefficients(
    weights: Sequence[float] | None, n_tasks: int, scaling: float, normalize: bool
) -> list[float]:
    """Per-task coefficients scaling * w_t, divided by sum_t w_t when ``normalize``.

    A sum of weights below 1e-8 in magnitude is replaced by 1 (mergekit's guard).

    Example:
        >>> normalized_coefficients([1.0, 3.0], 2, 2.0, normalize=True)
        [0.5, 1.5]
    """
    ws = task_weights(weights, n_tasks, "task_arithmetic")
    divisor = sum(ws) if normalize else 1.0
    if abs(divisor) < _ZERO_SUM:
        divisor = 1.0
    return [scaling * w / divisor for w in ws]


def scale_task(
    delta: Delta, *, scaling: float = 1.0, weight: float = 1.0, normalize: bool = False
) -> tuple[Delta, dict[str, Any]]:
    """The per-task step: scaling * w_t * tau_t (the merge is the sum of these).

    Raises:
        ConfigError: ``normalize`` is true (the sum of all weights is not known per task).

    Example:
        >>> scale_task(Dense(torch.ones(2)), scaling=0.5, weight=3.0)[0].tensor
        tensor([1.5000, 1.5000])
    """
    if normalize:
        raise ConfigError(
            [
                "task_arithmetic: normalize: true is not a sum of per-task parts (each part "
                "would need every model's weight); merge with the kernel (merge_deltas) instead"
            ]
        )
    coef = scaling * float(weight)
    if isinstance(delta, LowRank):  # exact and factored: the coefficient joins the scale
        return LowRank(delta.b, delta.a, delta.scale * coef), {}
    return Dense(delta.to_dense(torch.float32) * coef), {}


@register_method(
    "task_arithmetic",
    params={
        "scaling": Param(
            1.0, "lambda: multiplies the (weighted) sum of task vectors", factor_range()
        ),
        "weights": Param(
            None, "per-model weights w_t (default: models[].weight, else 1.0)", check=check_weights
        ),
        "normalize": Param(False, "divide by the sum of the weights (mergekit's normalize)"),
    },
    accepts=("dense", "lowrank"),
    lowrank_output=True,
    paper="https://arxiv.org/abs/2212.04089",
    separable=Separable(scale_task, "sum", per_task={"weights": "weight"}),
    memory=summed,
)
def task_arithmetic(
    deltas: Sequence[Delta],
    *,
    scaling: float = 1.0,
    weights: Sequence[float] | None = None,
    normalize: bool = False,
) -> Merged:
    """Scaled weighted sum of the task deltas: scaling * sum_t w_t tau_t.

    Args:
        deltas: One delta per task for this parameter, all ``Dense`` or all ``LowRank``.
        scaling: The global coefficient lambda.
        weights: One weight per task, or None for all 1.0.
        normalize: Divide by sum_t w_t (mergekit's ``normalize``).

    Returns:
        The sum, factored when the inputs are ``LowRank``, in the first input's dtype.

    Raises:
        ConfigError: ``weights`` does not have one entry per task.

    Example:
        >>> task_arithmetic([Dense(torch.ones(2)), Dense(torch.ones(2))], scaling=0.5).delta.tensor
        tensor([1., 1.])
    """
    coefs = normalized_coefficients(weights, len(deltas), scaling, normalize)
    if all(isinstance(d, LowRank) for d in deltas):
        return Merged(concat_lowrank(deltas, coefs))  # type: ignore[arg-type]
    total = torch.zeros(deltas[0].shape, dtype=torch.float32, device=deltas[0].device)
    for d, c in zip(deltas, coefs, strict=True):
        total += d.to_dense(torch.float32) * c
    return Merged(Dense(total.to(deltas[0].dtype)))
