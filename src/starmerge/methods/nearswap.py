"""NearSwap: take the model's value where it is already near the base's.

Reference: alchemonaut's NearSwap ("QuartetAnemoi-70B-t0.0001"),
https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001, as mergekit 0.1.5 implements it
(``merge_methods/nearswap.py``, https://github.com/arcee-ai/mergekit).

Update rule, elementwise, for the base a and the model b = a + tau:
    weight = clamp(t / max(|a - b|, 1e-6), 0, 1)
    merged = weight * b + (1 - weight) * a;  result = weight * tau
so entries the fine-tune moved by at most t are taken whole, larger moves are shrunk to t.

Symbols <-> arguments: ``t`` = t (a distance in weight units). Roles: mergekit's ``base_model``
is our ``base_model`` and its one other model our one entry under ``models`` (exactly one).

Deviations from mergekit:
- written in the task delta (|a - b| = |tau|), so no base tensor is read; mergekit forms
  |a - b| from the stored weights, which rounds tau in their dtype;
- ``t`` has a default (1e-4, the value of the reference model's name; mergekit requires it) and
  must lie in [0, 1000];
- computed in float32 (mergekit: the inputs' dtype); the result in the delta's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from starmerge.methods.base import MAX_FACTOR, Merged, Param, in_range, register_method
from starmerge.methods.footprint import Footprint
from starmerge.methods.spherical import require_models
from starmerge.tensors.delta import Delta, Dense

MIN_DISTANCE = 1e-6  # mergekit's clamp of |a - b|


@register_method(
    "nearswap",
    params={
        "t": Param(
            1e-4,
            "distance below which the model's value is taken whole",
            in_range(0, MAX_FACTOR, lo_open=False),
        ),
    },
    accepts=("dense",),
    paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    n_models=(1, 1),
    # memory: |tau| clamped, the weight and the result
    memory=lambda case: Footprint(case.copies(3)),
)
def nearswap(deltas: Sequence[Delta], *, t: float = 1e-4) -> Merged:
    """NearSwap of one model into the base, as mergekit's nearswap.

    Args:
        deltas: The one model's dense delta.
        t: The distance threshold, >= 0.

    Returns:
        ``clamp(t / |tau|, 0, 1) * tau`` in the delta's dtype, and ``{"swapped": n}``: the
        entries taken whole (weight 1).

    Raises:
        ConfigError: Not exactly one model.

    Example:
        >>> nearswap([Dense(torch.tensor([0.5, 4.0, -8.0]))], t=1.0).delta.tensor
        tensor([ 0.5000,  1.0000, -1.0000])
    """
    require_models("nearswap", len(deltas), (1, 1), "it swaps one model's values into the base")
    first = deltas[0]
    compute = torch.float64 if first.dtype == torch.float64 else torch.float32
    tau = first.to_dense(compute)
    weight = (t / tau.abs().clamp(min=MIN_DISTANCE)).clamp(min=0, max=1)
    swapped = int((weight == 1).sum())
    return Merged(Dense((weight * tau).to(first.dtype)), {"swapped": swapped})
