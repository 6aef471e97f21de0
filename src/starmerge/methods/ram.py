"""RAM: Reinforced Agent Merging (overlap-averaged task vectors).

Paper: "Reinforced Agent Merging" (mergekit's reference), https://arxiv.org/abs/2601.13572, as
mergekit 0.1.5 implements it (``merge_methods/ram.py`` ``ram_merge``,
https://github.com/arcee-ai/mergekit).

Update rule, elementwise, for the task vectors tau_t:
    k_t    = [|tau_t| > epsilon]                    (the task changed this entry)
    c      = sum_t k_t                              (how many tasks changed it)
    merged = sum_t k_t tau_t / max(c, 1)
so an entry only one task changed keeps that change whole (not divided by T, as an average
would), and entries several tasks changed are averaged over those tasks only.

Symbols <-> arguments: ``epsilon`` as in mergekit. Roles: mergekit's ``base_model`` is our
``base_model``, its other models our ``models`` (one or more).

Deviations from mergekit:
- written in task deltas (mergekit subtracts the base from each model), so no base tensor is
  read; mergekit's differences round tau in the weights' dtype before the threshold;
- computed in float32 (mergekit: the inputs' dtype); the result in the first delta's dtype.
mergekit's ``ramplus_tl`` variant is not provided.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from starmerge.methods.base import MAX_FACTOR, Merged, Param, in_range, register_method
from starmerge.methods.footprint import Footprint
from starmerge.tensors.delta import Delta, Dense


@register_method(
    "ram",
    params={
        "epsilon": Param(
            1e-5,
            "|entry| above which a task counts as changing it",
            in_range(0, MAX_FACTOR, lo_open=False),
        ),
    },
    accepts=("dense",),
    paper="https://arxiv.org/abs/2601.13572",
    # memory: the int64 counts (2 copies), divisor, total, a task's |tau| mask and share
    memory=lambda case: Footprint(case.copies(6.25)),
)
def ram(deltas: Sequence[Delta], *, epsilon: float = 1e-5) -> Merged:
    """RAM: each entry's changes averaged over the tasks that changed it.

    Args:
        deltas: One dense delta per task.
        epsilon: Threshold on ``|entry|``, >= 0.

    Returns:
        The merged delta in the first delta's dtype, and ``{"unique": n1, "overlap": n2}``: the
        entries changed by exactly one task and by several.

    Example:
        >>> x, y = Dense(torch.tensor([2.0, 0.0, 1.0])), Dense(torch.tensor([4.0, 3.0, 0.0]))
        >>> ram([x, y]).delta.tensor
        tensor([3., 3., 1.])
    """
    first = deltas[0]
    compute = torch.float64 if first.dtype == torch.float64 else torch.float32
    counts = torch.zeros(first.shape, dtype=torch.int64, device=first.device)
    for d in deltas:
        counts += d.to_dense(compute).abs() > epsilon
    divisor = counts.clamp(min=1).to(compute)
    total = torch.zeros(first.shape, dtype=compute, device=first.device)
    for d in deltas:  # per task, as mergekit: tau_t * k_t / max(c, 1), then summed
        tau = d.to_dense(compute)
        total += tau * (tau.abs() > epsilon) / divisor
    stats = {"unique": int((counts == 1).sum()), "overlap": int((counts > 1).sum())}
    return Merged(Dense(total.to(first.dtype)), stats)
