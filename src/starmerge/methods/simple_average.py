"""Simple averaging of task vectors.

Paper: "Model soups: averaging weights of multiple fine-tuned models improves accuracy without
increasing inference time" (Wortsman et al., ICML 2022), https://arxiv.org/abs/2203.05482.

Update rule: merged = S / T with S = sum_t tau_t and T the number of tasks.

Deviations from the reference code (IBM/STAR ``merger/simple_avg.py``): none in the result;
low-rank inputs stay factored (the average of T rank-r deltas is the concatenation of the
factors, rank sum_t r_t), so no dense T-way sum is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from starmerge.methods.base import Merged, register_method
from starmerge.methods.contract import Separable
from starmerge.methods.footprint import summed
from starmerge.tensors.delta import Delta, Dense, LowRank
from starmerge.tensors.factors import concat_lowrank


def keep_task(delta: Delta) -> tuple[Delta, dict[str, Any]]:
    """The per-task step: tau_t itself (the merge is the mean of these)."""
    return delta, {}


@register_method(
    "simple_average",
    accepts=("dense", "lowrank"),
    lowrank_output=True,
    paper="https://arxiv.org/abs/2203.05482",
    separable=Separable(keep_task, "mean"),
    memory=summed,
)
def simple_average(deltas: Sequence[Delta]) -> Merged:
    """Mean of the task deltas: S / T.

    Args:
        deltas: One delta per task for this parameter, all ``Dense`` or all ``LowRank``.

    Returns:
        The mean, factored when the inputs are ``LowRank``, in the first input's dtype.

    Example:
        >>> simple_average([Dense(torch.ones(2)), Dense(torch.zeros(2))]).delta.tensor
        tensor([0.5000, 0.5000])
    """
    n_tasks = len(deltas)
    if all(isinstance(d, LowRank) for d in deltas):
        return Merged(concat_lowrank(deltas, [1.0 / n_tasks] * n_tasks))  # type: ignore[arg-type]
    out_dtype = deltas[0].dtype
    total = torch.zeros(deltas[0].shape, dtype=torch.float32, device=deltas[0].device)
    for d in deltas:
        total += d.to_dense(torch.float32)
    return Merged(Dense((total / n_tasks).to(out_dtype)))
