"""Exact streaming top-k thresholds (radix select) against torch.topk on concatenated data."""

import pytest
import torch

from starmerge.tensors.sparsify import (
    LOW_INDEX_SIZE,
    BitScratch,
    RadixSelect,
    keep_count,
    kth_largest_abs,
    kth_largest_abs_local,
)


def magnitude_trim(x, threshold):
    """The seed code's trim: entries with |x| >= threshold kept (ties too); None trims all."""
    return torch.zeros_like(x) if threshold is None else x * (x.abs() >= threshold)


def topk_threshold(tensors, keep):
    flat = torch.cat([t.reshape(-1).float().abs() for t in tensors])
    return float(torch.topk(flat, keep).values[-1])


def chunks(seed, sizes, scale=1.0, integer=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for size in sizes:
        x = torch.randn(size, generator=g) * scale
        out.append(torch.round(x * 3) if integer else x)
    return out


@pytest.mark.parametrize("integer", [False, True])  # True: many exact ties
@pytest.mark.parametrize("keep", [1, 2, 17, 100, 139, 140])
def test_kth_largest_matches_topk(integer, keep):
    tensors = chunks(0, [(8, 4), (5,), (10, 10), (3, 1)], integer=integer)  # 140 entries
    assert kth_largest_abs(tensors, keep) == topk_threshold(tensors, keep)


def test_mixed_magnitudes_and_signed_zero():
    tensors = [
        torch.tensor([1e-30, -1e-30, 0.0, -0.0, 1e30, -3.5, 3.5, 1e-38]),
        torch.tensor([[7.0, -7.0], [2.0, 65504.0]]),
    ]
    for keep in range(1, 13):
        assert kth_largest_abs(tensors, keep) == topk_threshold(tensors, keep)


def test_same_high_bits_resolved_by_low_pass():
    # values differing only in the low mantissa bits fall in one high-16-bit bucket
    base = torch.tensor(1.0).view(torch.int32)
    x = (base + torch.arange(0, 2000, 7, dtype=torch.int32)).view(torch.float32)
    x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(1))]
    for keep in (1, 5, 100, x.numel()):
        assert kth_largest_abs([x], keep) == topk_threshold([x], keep)


def test_keep_zero_gives_none_and_trims_everything():
    x = torch.randn(4, 3)
    assert kth_largest_abs([x], 0) is None
    assert torch.equal(magnitude_trim(x, None), torch.zeros(4, 3))


def test_keep_all_keeps_every_entry():
    x = torch.randn(6, 5)
    thr = kth_largest_abs([x], x.numel())
    assert thr == float(x.abs().min())
    assert torch.equal(magnitude_trim(x, thr), x)


def test_ties_at_threshold_are_kept():
    x = torch.tensor([5.0, -5.0, 5.0, 3.0, 1.0])
    thr = kth_largest_abs([x], 2)
    assert thr == 5.0
    assert torch.equal(magnitude_trim(x, thr), torch.tensor([5.0, -5.0, 5.0, 0.0, 0.0]))


def test_streaming_passes_can_interleave_chunks():
    tensors = chunks(3, [(50,), (7, 7), (1,)])
    sel = RadixSelect()
    for t in tensors:
        sel.add_high(t)
    sel.finish_high(30)
    assert sel.needs_low_pass and sel.n == 100
    for t in reversed(tensors):  # the second pass may see the chunks in any order
        sel.add_low(t)
    sel.finish_low()
    assert sel.threshold == topk_threshold(tensors, 30)


def test_selects_sharing_one_scratch_give_each_its_own_threshold():
    """Three tasks' selects fed in turn through one BitScratch (growing and reused, bf16 too)."""
    scratch = BitScratch()
    tasks = [chunks(seed, [(40,), (9, 9), (3,)]) for seed in (4, 5, 6)]
    tasks[2] = [t.to(torch.bfloat16) for t in tasks[2]]
    selects = [RadixSelect(scratch) for _ in tasks]
    for i in range(3):  # parameter by parameter, task by task, as a fitter feeds them
        for sel, tensors in zip(selects, tasks, strict=True):
            sel.add_high(tensors[i])
    for sel, keep in zip(selects, (10, 55, 124), strict=True):
        sel.finish_high(keep)
    for i in range(3):
        for sel, tensors in zip(selects, tasks, strict=True):
            sel.add_low(tensors[i])
    for sel, tensors, keep in zip(selects, tasks, (10, 55, 124), strict=True):
        sel.finish_low()
        assert sel.threshold == topk_threshold([t.float() for t in tensors], keep)


@pytest.mark.parametrize(
    ("density", "n", "want"),
    [(0.57, 100, 57), (0.2, 10, 2), (0.1, 9, 0), (1.0, 7, 7), (0.3, 10, 3)],
)
def test_keep_count_is_decimal_floor(density, n, want):
    assert keep_count(density, n) == want


@pytest.mark.parametrize("keep", [0, 1, 7, 30, 31])
def test_local_kthvalue_agrees_with_radix_select(keep):
    x = torch.round(torch.randn(31, generator=torch.Generator().manual_seed(5)) * 2)  # ties
    assert kth_largest_abs_local(x, keep) == kth_largest_abs([x], keep)
    if keep:
        assert kth_largest_abs_local(x, keep) == topk_threshold([x], keep)


def test_low_index_keeps_a_buckets_low_bits_and_spreads_the_rest_past_them():
    """Entries of high bucket b map to their low 16 bits, every other one into the spread
    counters after them: NaN and Inf, zeros, the buckets next to b, both signs."""
    g = torch.Generator().manual_seed(4)
    x = torch.cat(
        [
            torch.randn(5000, generator=g) * 10.0 ** torch.randint(-30, 30, (5000,), generator=g),
            torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1.0, -1.0]),
        ]
    )
    bits = x.abs().view(torch.int32)
    for bucket in {int(b) for b in (bits >> 16)[:40]} | {0, 0x3F80, 0x7FFF}:
        index = BitScratch().low_index(x, bucket)
        inside = (bits >> 16) == bucket
        assert torch.equal(index[inside], bits[inside] & 0xFFFF)
        outside = index[~inside]
        assert bool((outside >= 1 << 16).all()) and bool((outside < LOW_INDEX_SIZE).all())
