"""Exact top-k magnitude thresholds by streaming radix select, and magnitude trimming.

TIES keeps, per task, the ``keep`` largest ``|x|`` over *all* of that task's parameters. Holding
a task's whole vector (billions of entries for an LLM) to call ``torch.topk`` is what the seed
code does; here the exact threshold comes from two streaming passes over the bit patterns of
``|x|`` in float32, whose integer order equals their float order for non-negative values:

1. histogram of the high 16 bits (32,768 buckets: the sign bit is 0) -> the bucket holding the
   ``keep``-th largest value and how many of its entries are still needed;
2. histogram of the low 16 bits of the entries inside that bucket -> the exact bit pattern.

Memory is O(65,536) counters per task whatever the model size; each pass reads every tensor once.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from fractions import Fraction

import torch
from torch import Tensor

from starmerge.tensors.select import kth_largest

_HIGH = 1 << 15  # high-16-bit buckets of a non-negative float32 (sign bit 0)
_LOW = 1 << 16
_SPREAD = (1 << 14) - 1  # the low bits that spread the entries outside a bucket (low_index)
LOW_INDEX_SIZE = _LOW + _SPREAD + 1


def keep_count(density: float, n: int) -> int:
    """``floor(density * n)`` computed on the decimal value of ``density`` (0.57 * 100 = 57).

    Example:
        >>> keep_count(0.57, 100)
        57
    """
    return int(Fraction(str(density)) * n)


def bits_to_float(bits: int) -> float:
    """The float32 value with bit pattern ``bits`` as a Python float (exact)."""
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def _walk_down(counts: Tensor, need: int) -> tuple[int, int]:
    """Find the bucket holding the ``need``-th largest entry (1-based) from bucket counts.

    Returns:
        ``(bucket, need_inside)``: the bucket index and how many of its entries, counted from
        its top, are needed to reach ``need``.
    """
    below_or_in = torch.cumsum(counts, 0)  # entries in buckets <= i
    total = int(below_or_in[-1])
    # the bucket b with (entries above b) < need <= (entries in b or above)
    bucket = int(torch.searchsorted(below_or_in, total - need, right=True))
    return bucket, need - (total - int(below_or_in[bucket]))


class BitScratch:
    """Flat buffers that :class:`RadixSelect` passes reuse from tensor to tensor.

    Each pass over a tensor needs ``|x|`` and its shifted bits (the second pass also their
    spread index: :meth:`low_index`), as large as the tensor; fresh
    tensors of 1 MiB or more are fresh mappings under ``memory.bounded_allocator``, which the
    kernel zeroes page by page (a pass over 12 KnOTS coordinate blocks of 192 x 4096 took 31 ms
    with fresh buffers, 6 ms with these). One scratch serves several selects that run one at a
    time (a fitter's, one per task); it holds three buffers of the largest tensor seen (the
    ``|x|``, its bits and their index of a fit step's footprint).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A flat ``(numel,)`` view of buffer ``name`` (grown, never shrunk)."""
        key = (name, dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            self._buffers.pop(key, None)  # the old one goes before the larger one exists
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]

    def abs_bits(self, x: Tensor) -> Tensor:
        """``|x|`` flattened, as int32 bits, in the ``abs`` buffer."""
        flat = x.detach().reshape(-1)
        if flat.dtype != torch.float32:
            flat = flat.to(torch.float32)
        out = self.get("abs", flat.numel(), torch.float32, flat.device)
        return torch.abs(flat, out=out).view(torch.int32)

    def high_bits(self, x: Tensor) -> Tensor:
        """The high 16 bits of ``|x|`` (``bits >> 16``: the bucket), flattened, in a buffer."""
        bits = self.abs_bits(x)
        high = self.get("high", bits.numel(), torch.int32, bits.device)
        return torch.bitwise_right_shift(bits, 16, out=high)

    def low_index(self, x: Tensor, bucket: int) -> Tensor:
        """Per entry: its low 16 bits inside high bucket ``bucket``, else 65,536 + its low 14.

        ``y = bits ^ (bucket << 16)`` is below 65,536 exactly inside the bucket, and
        ``min(y, 65,536 | (y & 0x3FFF))`` keeps it there while sending every other entry to
        65,536 + its low 14 bits: one ``bincount`` of the result (:data:`LOW_INDEX_SIZE`
        counters) has the bucket's exact low histogram in its first 65,536 counts. The others are
        spread over 16,384 counters, not piled onto one (a clamp to one "outside" counter makes
        ``bincount`` 3x slower: every increment waits for the previous one), and few enough that
        the counts stay below glibc's mmap threshold (65,536 more counters, 1 MiB in all, cost
        0.4 ms of page faults per call). No mask, no index: 0.45 ms per (192, 4096) block
        instead of 0.83 ms.
        """
        bits = self.abs_bits(x)
        n, device = bits.numel(), bits.device
        y = torch.bitwise_xor(bits, bucket << 16, out=self.get("high", n, torch.int32, device))
        spread = torch.bitwise_and(y, _SPREAD, out=self.get("spread", n, torch.int32, device))
        return torch.minimum(y, spread.bitwise_or_(_LOW), out=y)


class RadixSelect:
    """Streaming exact selection of the ``keep``-th largest ``|x|`` over many tensors.

    Feed every tensor with :meth:`add_high`, call :meth:`finish_high`, feed them all again with
    :meth:`add_low` (only when :attr:`needs_low_pass`), then read :attr:`threshold`.

    Args:
        scratch: Buffers to reuse (shared by selects that run one at a time); None: its own.

    Example:
        >>> sel = RadixSelect()
        >>> x = torch.tensor([3.0, -1.0, 2.0])
        >>> sel.add_high(x); sel.finish_high(keep=2)
        >>> sel.add_low(x); sel.finish_low(); sel.threshold
        2.0
    """

    def __init__(self, scratch: BitScratch | None = None) -> None:
        self._scratch = scratch if scratch is not None else BitScratch()
        self.n = 0
        self._high: Tensor | None = None
        self._low: Tensor | None = None
        self._bucket = -1
        self._need = 0
        self.threshold: float | None = None

    def add_high(self, x: Tensor) -> None:
        """Pass 1: count ``x``'s entries per high-16-bit bucket."""
        counts = torch.bincount(self._scratch.high_bits(x), minlength=_HIGH)
        self._high = counts if self._high is None else self._high + counts.to(self._high.device)
        self.n += x.numel()

    def finish_high(self, keep: int) -> None:
        """End pass 1 for ``keep`` entries; ``keep <= 0`` keeps nothing (threshold None)."""
        keep = min(keep, self.n)
        if keep <= 0 or self._high is None:
            self.threshold = None
            return
        self._bucket, self._need = _walk_down(self._high.cpu(), keep)
        self._high = None

    @property
    def needs_low_pass(self) -> bool:
        """True when :meth:`add_low` must see every tensor again."""
        return self._bucket >= 0 and self.threshold is None

    def add_low(self, x: Tensor) -> None:
        """Pass 2: count the low 16 bits of ``x``'s entries inside the selected bucket."""
        if not self.needs_low_pass:
            return
        index = self._scratch.low_index(x, self._bucket)  # 0 .. 65,535: inside the bucket
        counts = torch.bincount(index, minlength=LOW_INDEX_SIZE)[:_LOW]
        self._low = counts if self._low is None else self._low + counts.to(self._low.device)

    def finish_low(self) -> None:
        """End pass 2: fix the exact threshold."""
        if not self.needs_low_pass or self._low is None:
            return
        low, _ = _walk_down(self._low.cpu(), self._need)
        self.threshold = bits_to_float((self._bucket << 16) | low)
        self._low = None


def kth_largest_abs(tensors: Iterable[Tensor], keep: int) -> float | None:
    """The ``keep``-th largest ``|x|`` over ``tensors`` (None when ``keep <= 0``), exactly.

    Args:
        tensors: The tensors (re-iterable: it is read twice).
        keep: How many entries to keep.

    Example:
        >>> kth_largest_abs([torch.tensor([1.0, -4.0]), torch.tensor([2.0])], 2)
        2.0
    """
    tensors = list(tensors)
    sel = RadixSelect()
    for x in tensors:
        sel.add_high(x)
    sel.finish_high(keep)
    for x in tensors:
        sel.add_low(x)
    sel.finish_low()
    return sel.threshold


def kth_largest_abs_local(x: Tensor, keep: int) -> float | None:
    """The ``keep``-th largest ``|x|`` of one tensor held in memory (None when ``keep <= 0``).

    Same value as :func:`kth_largest_abs` on ``[x]``, found by
    :func:`starmerge.tensors.select.kth_largest` (a sampled bracket, then a selection among
    the few entries inside it).

    Example:
        >>> kth_largest_abs_local(torch.tensor([1.0, -4.0, 2.0]), 2)
        2.0
    """
    keep = min(keep, x.numel())
    if keep <= 0:
        return None
    return kth_largest(x.detach().to(torch.float32).abs().reshape(-1), keep)


# mergekit's sparsifiers (``mergekit/sparsify.py``), one task tensor at a time, in float32.
# The random ones take the uniform draws ``u`` (same shape as ``x``, in [0, 1)) as an argument:
# an entry is kept where ``u < p``, which is ``torch.bernoulli(p)`` with the draws made explicit,
# so the caller decides where the randomness comes from (seeded, reproducible).
_RESCALE_EPS = 1e-7  # mergekit's rescaled_masked_tensor: no rescale below this L1 norm


def l1_rescale_(x: Tensor, masked: Tensor, tmp: Tensor) -> Tensor:
    """``masked *= ||x||_1 / ||masked||_1`` in place, mergekit's ``rescale`` (``RescaleNorm.l1``).

    ``masked`` is a tensor the caller owns, ``tmp`` a buffer of its shape for the absolute
    values. ``masked`` is left as it is when either L1 norm is below 1e-7 (mergekit's guard), so
    a zero or all-dropped tensor never divides by zero.

    Example:
        >>> l1_rescale_(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 3.0]), torch.empty(2))
        tensor([0., 4.])
    """
    before = torch.abs(x, out=tmp).sum()
    after = torch.abs(masked, out=tmp).sum()
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return masked
    return masked.mul_(before / after)


def random_keep(
    x: Tensor,
    keep_prob: float | Tensor,
    u: Tensor,
    flag: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Keep each entry with probability ``keep_prob`` (where ``u < keep_prob``), else 0.

    DARE uses one ``keep_prob`` (its density), DELLA one per entry (its rank's probability).
    ``flag`` (bool) and ``out`` (``x``'s dtype) are optional buffers of ``x``'s shape for the
    comparison and the result; the entries are ``x * [u < keep_prob]`` either way (multiplied
    by a float 0/1 mask: torch's fast path, which a boolean mask is not).

    Example:
        >>> random_keep(torch.tensor([1.0, 2.0]), 0.5, torch.tensor([0.2, 0.7]))
        tensor([1., 0.])
    """
    keep = torch.lt(u.to(x.device), keep_prob, out=flag)
    mask = keep.to(x.dtype) if out is None else out.copy_(keep)
    return torch.mul(x, mask, out=mask)


def outlier_trim(x: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs' mask (mergekit's ``magnitude_outliers``): drop the largest and smallest.

    With n entries ordered by ``|x|`` ascending, keeps positions ``[n_bot, n_bot + target)``,
    ``target = int(density * n)``, ``n_top = int(gamma * n)``, ``n_bot = max(0, n - target -
    n_top)``: the ``n_top`` largest go first, then the smallest, to leave ``target`` entries (when
    ``density + gamma > 1`` fewer outliers go). Ties in ``|x|`` are ordered by position (a stable
    sort). ``density >= 1`` returns ``x`` itself.

    Example:
        >>> outlier_trim(torch.tensor([1.0, -4.0, 3.0, 2.0]), 0.5, 0.25)
        tensor([0., -0., 3., 2.])
    """
    if density >= 1:
        return x
    n = x.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = torch.argsort(x.abs().reshape(-1), stable=True)  # ascending |x|
    mask = torch.zeros(n, dtype=torch.bool, device=x.device)
    mask[order[n_bot : n_bot + target]] = True
    return x * mask.reshape(x.shape)


def della_keep_probs(x: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's MagPrune keep probabilities (mergekit's ``della_magprune``), shaped like ``x``.

    Along dim 1 (a 1-D tensor is one row), entries are ranked by ``|x|`` (1 = smallest, ties by
    position); rank r of n gets ``p = (density - epsilon) + (r - 1) / (n - 1) * 2 * epsilon``,
    from ``density - epsilon`` (smallest) to ``density + epsilon`` (largest). A row of one entry
    gets ``p = density`` (mergekit's 0 / 0 gives NaN and ``torch.bernoulli`` raises there).

    Example:
        >>> della_keep_probs(torch.tensor([3.0, -1.0, 2.0]), 0.5, 0.2)
        tensor([0.7000, 0.3000, 0.5000])
    """
    rows = x.reshape(1, -1) if x.dim() < 2 else x
    n = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.argsort(order, dim=1).to(torch.float32)  # 0-based rank = r - 1
    if n > 1:
        rank_norm = (ranks / (n - 1)).clamp(0, 1)
    else:
        rank_norm = torch.full_like(ranks, 0.5)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    return probs.reshape(x.shape)
