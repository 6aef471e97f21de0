"""Linear algebra on low-rank factors (no densifying)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from starmerge.tensors.delta import LowRank


def concat_lowrank(deltas: Sequence[LowRank], weights: Sequence[float]) -> LowRank:
    """Exactly ``sum_t weights[t] * deltas[t]`` as one ``LowRank`` of rank ``sum_t r_t``.

    Each task's scale and weight are folded into its ``b`` block, so the result has scale 1.
    Computed in float32 (float64 kept) and returned in the first delta's dtype.

    Example:
        >>> x = LowRank(torch.ones(3, 1), torch.ones(1, 2), 2.0)
        >>> concat_lowrank([x, x], [0.5, 0.5]).to_dense()[0, 0].item()
        2.0
    """
    out_dtype = deltas[0].dtype
    compute = torch.float64 if out_dtype == torch.float64 else torch.float32
    bs = [d.b.to(compute) * (d.scale * w) for d, w in zip(deltas, weights)]  # (out, r_t)
    as_ = [d.a.to(compute) for d in deltas]  # (r_t, in)
    return LowRank(torch.cat(bs, dim=1).to(out_dtype), torch.cat(as_, dim=0).to(out_dtype), 1.0)
