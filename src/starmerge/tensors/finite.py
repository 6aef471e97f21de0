"""Finiteness checks, one reduction per tensor: cheap enough to run on every input and result.

No NaN or Inf may reach an output (DESIGN.md): the readers check every input tensor they read
with :func:`all_finite`, and the pipeline checks every merged delta with :func:`delta_finite`.
"""

from __future__ import annotations

import math

import torch

from starmerge.tensors.delta import Delta, Dense
from starmerge.tensors.threads import one_thread

FLOAT32_MAX = torch.finfo(torch.float32).max
_CHUNK = 1 << 22  # entries summed at once: 16 MB of float32 temporaries at most
_SLACK = 1.01  # a low-rank bound within 1 % of float32's range is checked entry by entry


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite (integer and boolean tensors always are).

    A NaN or Inf anywhere makes a sum non-finite, so a finite sum proves its entries finite; the
    elementwise check runs only where a sum overflowed. The sums run over chunks in the tensor's
    own dtype: no float64 copy of a whole embedding matrix, and several times faster than
    ``isfinite(t).all()``.

    Example:
        >>> all_finite(torch.tensor([1.0, float("nan")]))
        False
    """
    if not t.is_floating_point():
        return True
    with one_thread():  # memory-bound reductions: a second thread only waits on a busy machine
        # One chunk is the tensor itself, in any layout: reshape would copy a transposed view.
        chunks = (t,) if t.numel() <= _CHUNK else t.reshape(-1).split(_CHUNK)
        for chunk in chunks:
            if not bool(torch.isfinite(chunk.sum())) and not bool(torch.isfinite(chunk).all()):
                return False
    return True


def delta_finite(delta: Delta) -> bool:
    """Whether every entry of ``delta`` is finite in float32, without densifying a low-rank one.

    A ``LowRank`` entry is at most ``|scale| * ||b||_F * ||a||_F`` in size (Cauchy-Schwarz), so
    finite factors and a bound within float32's range prove ``scale * b @ a`` finite. One norm
    per factor, in the factor's dtype, settles both: a NaN or Inf entry makes the norm non-finite.
    Only when a norm is not finite (an Inf entry, or a square beyond the dtype's range) are the
    factors checked entry by entry and normed in float64; only when the bound is exceeded is the
    product formed and checked.

    Example:
        >>> delta_finite(LowRank(torch.ones(3, 1), torch.ones(1, 2), 1e38))
        True
    """
    if isinstance(delta, Dense):
        return all_finite(delta.tensor)
    if not math.isfinite(delta.scale):
        return False
    with one_thread():
        norm_b, norm_a = (float(torch.linalg.vector_norm(f)) for f in (delta.b, delta.a))
        if not (math.isfinite(norm_b) and math.isfinite(norm_a)):
            if not (all_finite(delta.b) and all_finite(delta.a)):
                return False
            norm_b = float(torch.linalg.vector_norm(delta.b, dtype=torch.float64))
            norm_a = float(torch.linalg.vector_norm(delta.a, dtype=torch.float64))
    # _SLACK covers the rounding of a norm summed in float32 or bfloat16.
    if abs(delta.scale) * norm_b * norm_a * _SLACK <= FLOAT32_MAX:
        return True
    return all_finite(delta.to_dense(torch.float32))
