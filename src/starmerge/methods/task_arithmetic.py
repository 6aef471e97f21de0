"""Task Arithmetic: a scaled (weighted) sum of task vectors.

Paper: "Editing Models with Task Arithmetic" (Ilharco, Ribeiro, Wortsman, Gururangan, Schmidt,
Hajishirzi, Farhadi; ICLR 2023), https://arxiv.org/abs/2212.04089.

Update rule: merged = scaling * sum_t w_t * tau_t.

Symbols <-> arguments: scaling = lambda (the paper's single scaling coefficient);
weights = w_t, one per model in task order (filled by the pipeline from ``models[].weight``;
None means every w_t = 1, the paper's rule).

Deviations from the reference code (IBM/STAR ``merger/simple_avg.py weighted_merge``, which
computes sum_t alpha_t * tau_t; alpha_t = scaling * w_t here): none in the result. Low-rank
inputs stay factored: the sum of T rank-r deltas is the concatenation of the factors (rank
sum_t r_t), exact, with no dense T-way sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real
from typing import Any

import torch

from starmerge.errors import ConfigError
from starmerge.methods.base import MAX_FACTOR, Merged, Param, factor_range, register_method
from starmerge.methods.contract import Separable
from starmerge.tensors.delta import Delta, Dense, LowRank
from starmerge.tensors.factors import concat_lowrank


def _check_weights(value: Any) -> str | None:
    """A ``Param.check``: None or a list of numbers in ``[-MAX_FACTOR, MAX_FACTOR]``."""
    if value is None:
        return None
    ok = isinstance(value, (list, tuple)) and all(
        isinstance(w, Real) and not isinstance(w, bool) for w in value
    )
    if not ok:
        return "must be a list of numbers, one per model (or unset)"
    big = next((i for i, w in enumerate(value) if abs(w) > MAX_FACTOR), None)
    if big is not None:
        return f"must hold numbers in [-{MAX_FACTOR:g}, {MAX_FACTOR:g}] (entry {big} is not)"
    return None


def task_weights(weights: Sequence[float] | None, n_tasks: int, method: str) -> list[float]:
    """Per-task weights: ``weights`` checked against ``n_tasks``, or all 1.0 when None.

    Raises:
        ConfigError: ``weights`` does not have one entry per task.
    """
    if weights is None:
        return [1.0] * n_tasks
    if len(weights) != n_tasks:
        raise ConfigError(
            [
                f"{method}: weights has {len(weights)} entries but there are {n_tasks} models; "
                "give one weight per model (models[].weight) or leave weights unset"
            ]
        )
    return [float(w) for w in weights]


def scale_task(
    delta: Delta, *, scaling: float = 1.0, weight: float = 1.0
) -> tuple[Delta, dict[str, Any]]:
    """The per-task step: scaling * w_t * tau_t (the merge is the sum of these).

    Example:
        >>> scale_task(Dense(torch.ones(2)), scaling=0.5, weight=3.0)[0].tensor
        tensor([1.5000, 1.5000])
    """
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
            None, "per-model weights w_t (default: models[].weight, else 1.0)", check=_check_weights
        ),
    },
    accepts=("dense", "lowrank"),
    lowrank_output=True,
    paper="https://arxiv.org/abs/2212.04089",
    separable=Separable(scale_task, "sum", per_task={"weights": "weight"}),
)
def task_arithmetic(
    deltas: Sequence[Delta],
    *,
    scaling: float = 1.0,
    weights: Sequence[float] | None = None,
) -> Merged:
    """Scaled weighted sum of the task deltas: scaling * sum_t w_t tau_t.

    Args:
        deltas: One delta per task for this parameter, all ``Dense`` or all ``LowRank``.
        scaling: The global coefficient lambda.
        weights: One weight per task, or None for all 1.0.

    Returns:
        The sum, factored when the inputs are ``LowRank``, in the first input's dtype.

    Raises:
        ConfigError: ``weights`` does not have one entry per task.

    Example:
        >>> task_arithmetic([Dense(torch.ones(2)), Dense(torch.ones(2))], scaling=0.5).delta.tensor
        tensor([1., 1.])
    """
    coefs = [scaling * w for w in task_weights(weights, len(deltas), "task_arithmetic")]
    if all(isinstance(d, LowRank) for d in deltas):
        return Merged(concat_lowrank(deltas, coefs))  # type: ignore[arg-type]
    total = torch.zeros(deltas[0].shape, dtype=torch.float32, device=deltas[0].device)
    for d, c in zip(deltas, coefs, strict=True):
        total += d.to_dense(torch.float32) * c
    return Merged(Dense(total.to(deltas[0].dtype)))
