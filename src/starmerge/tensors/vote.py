"""TIES' sign election and disjoint merge in one pass over the tasks, with reused buffers.

The two-pass rule (PEFT's ``calculate_majority_sign_mask`` + ``disjoint_merge``) sums the
weighted trimmed tasks p_t, elects gamma = sign(sum_t p_t), then sums again the p_t that agree
with gamma (same nonzero sign) and their weights. An entry agrees with gamma = +1 exactly when it
is positive, so the second pass is a choice between two sums that can be kept from the first:

    total = sum_t p_t             (in task order: the election's own sum, bit for bit)
    pos   = sum_t max(p_t, 0),    cpos = sum_t w_t [p_t > 0]
    neg   = sum_t min(p_t, 0),    cneg = sum_t w_t [p_t < 0]
    merged = pos / cpos where gamma > 0, neg / cneg where gamma < 0, 0 where gamma = 0

The sums add the same nonzero terms in the same order as the two-pass rule (the zeros it adds
for disagreeing entries change nothing), so the result is identical to the last bit. Each task is
seen once and dropped: a caller streams LoRA tasks through one densified buffer instead of
holding T trimmed copies. With unit weights the counts are exact small integers.

Speed: every step is an ``out=`` or in-place elementwise op on float32 operands: the
comparisons write float 0/1 into a float buffer and the counts are float32 (exact integers up to
2^24 tasks). Boolean and integer outputs take torch's slow paths: on a (192, 4096) block a
comparison into bool costs 0.23 ms, into float32 0.065 ms; ``count_nonzero`` 0.17 ms, a float
sum 0.03 ms. The buffers are allocated once per call: a fresh tensor costs its page faults
(about as much as ten elementwise passes over it on this project's VM).

Threads: the callers (TIES, mergekit's generalized task arithmetic) run this on one thread
(:func:`starmerge.tensors.threads.one_thread`). The work is memory-bound; on this project's
2-core VM, busy with other jobs (load ~9), TIES over 8 tasks of shape (5632, 2048) took 1.53 s
on one thread and 3.4-3.8 s on two, DARE-TIES 2.2 s and 4.8 s (alternated in one run).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from starmerge.tensors.delta import Delta, Dense

_EXACT_SUM = 1 << 24  # a float32 sum of 0/1 flags is exact below this many entries


class Scratch:
    """Named buffers of one shape, allocated on first use and reused (one parameter's work).

    Example:
        >>> s = Scratch((2, 3), "cpu")
        >>> s.get("a") is s.get("a")
        True
    """

    def __init__(self, shape: tuple[int, ...], device: torch.device | str):
        self.shape = shape
        self.device = device
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """The buffer ``name`` (uninitialised on first use)."""
        buf = self._buffers.get(name)
        if buf is None:
            buf = torch.empty(self.shape, dtype=dtype, device=self.device)
            self._buffers[name] = buf
        return buf


def dense_into(delta: Delta, out: Tensor) -> Tensor:
    """``delta`` as a float32 tensor: a Dense float32 input itself, else written into ``out``.

    The product ``scale * b @ a`` of a ``LowRank`` is computed as :meth:`LowRank.to_dense`
    computes it (a float32 matmul, then the scale), so the entries are the same.
    """
    if isinstance(delta, Dense):
        t = delta.tensor
        return t if t.dtype == torch.float32 else out.copy_(t)
    if delta.rank == 0:
        return out.zero_()
    torch.mm(delta.b.to(torch.float32), delta.a.to(torch.float32), out=out)
    return out.mul_(delta.scale)


def trim_into(tau: Tensor, threshold: float | None, out: Tensor) -> Tensor:
    """``tau`` where ``|tau| >= threshold``, else 0, written into ``out`` (None keeps nothing).

    ``hardshrink`` keeps ``|x| > lambda``; with lambda the float32 just below the threshold
    that is ``|x| >= threshold`` for every float32 ``x`` (ties with the threshold kept).
    """
    if threshold is None:
        return out.zero_()
    below = torch.nextafter(
        torch.tensor(threshold, dtype=torch.float32), torch.tensor(-1.0, dtype=torch.float32)
    )
    return torch.hardshrink(tau, float(below), out=out)


class SignVote:
    """Streaming sign election and disjoint mean over T weighted tasks of one parameter.

    Args:
        scratch: Where the accumulators live (the parameter's shape and device).
        weights: The T weights w_t (the counts are integers when all are 1).

    Example:
        >>> vote = SignVote(Scratch((2,), "cpu"), [1.0, 1.0])
        >>> [vote.add(p) for p in (torch.tensor([1.0, -2.0]), torch.tensor([3.0, 1.0]))]
        [2, 2]
        >>> vote.merge(zero="zero", normalize=True)
        tensor([ 2., -2.])
    """

    def __init__(self, scratch: Scratch, weights: list[float]):
        self.s = scratch
        self.unit = all(w == 1.0 for w in weights)
        self.total = scratch.get("vote_total").zero_()
        self.pos = scratch.get("vote_pos").zero_()
        self.neg = scratch.get("vote_neg").zero_()
        self.cpos = scratch.get("vote_cpos").zero_()
        self.cneg = scratch.get("vote_cneg").zero_()

    def add(self, p: Tensor, w: float = 1.0) -> int:
        """Add one task's weighted trimmed delta ``p`` (= w_t * trimmed; ``w`` its weight).

        Returns:
            The number of nonzero entries of ``p`` (the sums of its float 0/1 flags).
        """
        tmp = self.s.get("tmp")
        self.total += p  # Elect Sign: the sum, in task order
        self.pos += torch.clamp(p, min=0, out=tmp)
        self.neg += torch.clamp(p, max=0, out=tmp)
        nonzero = 0
        for count, compare in ((self.cpos, torch.gt), (self.cneg, torch.lt)):
            flags = compare(p, 0, out=tmp)  # 1.0 where p agrees with this sign, else 0.0
            nonzero += _count(flags)
            if self.unit:
                count += flags
            else:
                count.add_(flags, alpha=w)
        return nonzero

    def merge(self, *, zero: Literal["zero", "positive"], normalize: bool) -> Tensor:
        """The disjoint merge (a buffer of the scratch; copy before reusing the scratch).

        Args:
            zero: Where the sum is exactly 0: ``"zero"`` merges to 0 (TIES' sign 0, the seed
                code), ``"positive"`` elects +1 (mergekit: the positive entries merge).
            normalize: Divide by the summed weights of the agreeing entries (0 -> 1).
        """
        if normalize:
            for acc, count in ((self.pos, self.cpos), (self.neg, self.cneg)):
                if self.unit:  # counts are integers >= 0: 0 -> 1, in place (not needed after)
                    acc /= count.clamp_(min=1)
                else:
                    acc /= count.masked_fill_(count == 0, 1.0)
        # gamma as two float 0/1 masks: [total > 0] (or >= 0) and [total < 0]
        mask = self.s.get("tmp")
        compare = torch.gt if zero == "zero" else torch.ge
        self.pos *= compare(self.total, 0, out=mask)
        self.neg *= torch.lt(self.total, 0, out=mask)
        return self.pos.add_(self.neg)  # one of the two is 0 in each entry: exact


def _count(flags: Tensor) -> int:
    """How many entries of a float 0/1 tensor are 1 (exact: float64 sums for large tensors)."""
    if flags.numel() < _EXACT_SUM:
        return int(flags.sum())
    return int(flags.sum(dtype=torch.float64))
