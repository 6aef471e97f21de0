"""Exact k-th largest value of a tensor without a full selection over it.

``torch.kthvalue`` copies its input and runs a selection over all n entries (about 25 ns per
float32 entry on one core): for TIES' per-parameter thresholds it was the largest single cost of a
merge. :func:`kth_largest` finds the same value in a few elementwise passes:

1. take a fixed pseudo-random sample of the entries (2**16 of them, a seeded generator: the
   result never depends on the sample, only the speed does) and read off two bracketing values
   ``lo <= hi`` from the sample's order, several binomial standard deviations either side of the
   sample rank that corresponds to ``k``;
2. count the entries above ``hi`` (``above``) and gather the candidates in ``[lo, hi]``;
3. when ``above < k <= above + #candidates`` the answer is the ``(k - above)``-th largest
   candidate (a ``kthvalue`` over ~2 % of the entries); otherwise (a sample far off, which the
   margins make vanishingly rare, or a tensor too small to bother) ``kthvalue`` over everything.

The value is exactly ``kthvalue``'s, ties included: the k-th order statistic is one number,
whichever way it is found.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SAMPLE = 1 << 16  # entries sampled to bracket the k-th largest
_DIRECT = 1 << 14  # up to this many entries kthvalue over all of them is as fast
_SIGMAS = 6.0  # bracket half-width in binomial standard deviations (miss rate ~1e-9)
_SEED = 0x5EEC7  # fixed: the sample (hence the speed) is reproducible; the value never depends


def kth_largest(values: Tensor, k: int, flags: tuple[Tensor, Tensor] | None = None) -> float:
    """The ``k``-th largest entry of ``values`` (1-based; ``1 <= k <= numel``), exactly.

    Args:
        values: A flat float tensor (finite entries).
        k: Which order statistic, counted from the largest.
        flags: Optional two boolean buffers of ``values``' shape, reused as scratch.

    Returns:
        The value, equal to ``torch.kthvalue(values, numel - k + 1)``.

    Raises:
        ValueError: ``k`` is outside ``[1, numel]``.

    Example:
        >>> kth_largest(torch.tensor([3.0, 1.0, 2.0, 2.0]), 2)
        2.0
    """
    n = values.numel()
    if not 1 <= k <= n:
        raise ValueError(f"kth_largest: k must be in [1, {n}], got {k}")
    if k == n:  # the smallest (density 1 keeps everything): one reduction
        return float(values.min())
    if n > _DIRECT:
        lo, hi = _bracket(values, k)
        if flags is None:
            flags = (
                torch.empty_like(values, dtype=torch.bool),
                torch.empty_like(values, dtype=torch.bool),
            )
        found = _inside(values, k, lo, hi, flags)
        if found is not None:
            return found
    return float(torch.kthvalue(values, n - k + 1).values)


def _bracket(values: Tensor, k: int) -> tuple[float, float]:
    """Two values ``lo <= hi`` that bracket the k-th largest with overwhelming probability."""
    n = values.numel()
    m = min(SAMPLE, n // 16)
    gen = torch.Generator(device="cpu").manual_seed(_SEED)
    idx = torch.randint(0, n, (m,), generator=gen).to(values.device)
    sample = values[idx]  # (m,)
    rank = k * m / n  # expected sample rank (from the top) of the k-th largest
    margin = _SIGMAS * math.sqrt(rank * (1 - rank / m)) + 4
    top = math.floor(rank - margin)  # 1-based sample rank of hi; < 1: no upper bound
    bottom = math.ceil(rank + margin)  # of lo; > m: no lower bound
    hi = math.inf if top < 1 else float(torch.kthvalue(sample, m - top + 1).values)
    lo = -math.inf if bottom > m else float(torch.kthvalue(sample, m - bottom + 1).values)
    return lo, hi


def _inside(
    values: Tensor, k: int, lo: float, hi: float, flags: tuple[Tensor, Tensor]
) -> float | None:
    """The k-th largest if it lies in ``[lo, hi]`` (found among the entries there), else None."""
    if lo == -math.inf:
        return None  # every entry would be a candidate: no gain over kthvalue
    above, inside = flags
    torch.gt(values, hi, out=above)  # all False when hi is inf
    n_above = int(torch.count_nonzero(above))
    if n_above >= k:
        return None
    torch.ge(values, lo, out=inside)
    inside ^= above  # lo <= v <= hi (above is a subset of inside: lo <= hi)
    candidates = values[inside]
    need = k - n_above  # rank of the answer among the candidates, from the top
    if need > candidates.numel():
        return None
    return float(torch.kthvalue(candidates, candidates.numel() - need + 1).values)
