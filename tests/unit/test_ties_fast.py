"""The fast TIES / generalized-task-arithmetic path against independent, straightforward rules.

References written here: ``torch.kthvalue`` over every entry for the threshold, and the two-pass
trim / elect / disjoint-merge rule over all T trimmed copies (PEFT's ``ties``), in float32 and in
the same summation order, so the streaming code must match them exactly; float64 for the values.
"""

from __future__ import annotations

import pytest
import torch

import starmerge.tensors.select as select
from starmerge.methods import METHODS
from starmerge.methods.ties import ties
from starmerge.tensors.delta import Dense, LowRank
from starmerge.tensors.select import kth_largest
from starmerge.tensors.vote import Scratch, SignVote, dense_into, trim_into

pytestmark = pytest.mark.usefixtures("one_thread")  # sums match bit for bit on one thread


def kth_ref(values: torch.Tensor, k: int) -> float:
    return float(torch.kthvalue(values, values.numel() - k + 1).values)


def vote_ref(ps, weights, *, zero_elects_plus=False, normalize=True):
    """Elect and disjoint-merge the weighted trimmed tasks ``ps``, held at once (PEFT's rule)."""
    total = torch.zeros_like(ps[0])
    for p in ps:
        total += p
    gamma = torch.where(total >= 0, 1.0, -1.0) if zero_elects_plus else torch.sign(total)
    mixed, count = torch.zeros_like(total), torch.zeros_like(total)
    for p, w in zip(ps, weights, strict=True):
        agree = (torch.sign(p) == gamma) & (p != 0)
        mixed += p * agree
        count += agree * w
    if not normalize:
        return mixed
    return mixed / count.masked_fill(count == 0, 1.0)


def trim_ref(tau, threshold):
    return torch.zeros_like(tau) if threshold is None else tau * (tau.abs() >= threshold)


def lowrank_tasks(n_tasks, shape, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        LowRank(
            torch.randn(shape[0], rank, generator=g), torch.randn(rank, shape[1], generator=g), 0.5
        )
        for _ in range(n_tasks)
    ]


@pytest.mark.parametrize("n", [1, 7, 5_000, 40_000, 300_000])
def test_kth_largest_equals_kthvalue(n):
    g = torch.Generator().manual_seed(n)
    cases = {
        "normal": torch.randn(n, generator=g).abs(),
        "few distinct": torch.randint(0, 5, (n,), generator=g).float(),
        "heavy tail": torch.randn(n, generator=g).abs() ** 6,
        "zeros": torch.zeros(n),
    }
    for name, x in cases.items():
        for k in sorted(k for k in {1, 2, n // 5, n // 2, n - 1, n} if 1 <= k <= n):
            assert kth_largest(x, k) == kth_ref(x, k), (name, k)


def test_kth_largest_exact_when_the_bracket_misses(monkeypatch):
    """A bracket of +-4 sample ranks misses often: the fallback gives the same value."""
    monkeypatch.setattr(select, "_SIGMAS", 0.0)
    results = []
    inside = select._inside
    monkeypatch.setattr(select, "_inside", lambda *a: results.append(inside(*a)) or results[-1])
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(3))
    for k in (1, 17, 20_000, 50_000, 99_999):
        assert kth_largest(x, k) == kth_ref(x, k)
    assert None in results and any(r is not None for r in results)  # both paths ran


def test_kth_largest_refuses_k_out_of_range():
    with pytest.raises(ValueError, match=r"k must be in \[1, 3\], got 0"):
        kth_largest(torch.ones(3), 0)


def test_trim_into_keeps_entries_tied_with_the_threshold():
    x = torch.tensor([0.5, -0.5, 0.4999999, -2.0, 0.0, 1e-45])
    out = torch.empty_like(x)
    assert torch.equal(trim_into(x, 0.5, out), torch.tensor([0.5, -0.5, 0.0, -2.0, 0.0, 0.0]))
    assert torch.equal(trim_into(x, 0.0, out), x)  # threshold 0 keeps everything
    assert torch.equal(
        trim_into(x, 1e-45, out), torch.tensor([0.5, -0.5, 0.4999999, -2.0, 0, 1e-45])
    )
    assert torch.equal(trim_into(x, None, out), torch.zeros(6))


def test_dense_into_matches_to_dense_bit_for_bit():
    (d,) = lowrank_tasks(1, (33, 17))
    out = torch.empty(33, 17)
    assert torch.equal(dense_into(d, out), d.to_dense(torch.float32))
    x = torch.randn(3, 4, dtype=torch.float64)
    assert torch.equal(dense_into(Dense(x), torch.empty(3, 4)), x.float())
    same = torch.randn(2, 2)
    assert dense_into(Dense(same), torch.empty(2, 2)) is same  # no copy of a float32 input


def test_sign_vote_by_hand():
    # task sums: [4, -1, 0]; agreeing entries: [1 and 3], [-2], none (gamma 0)
    tasks = [torch.tensor([1.0, -2.0, 1.0]), torch.tensor([3.0, 1.0, -1.0])]
    vote = SignVote(Scratch((3,), "cpu"), [1.0, 1.0])
    assert [vote.add(t) for t in tasks] == [3, 3]
    assert torch.equal(vote.merge(zero="zero", normalize=True), torch.tensor([2.0, -2.0, 0.0]))
    vote = SignVote(Scratch((3,), "cpu"), [1.0, 1.0])
    for t in tasks:
        vote.add(t)
    # mergekit elects +1 on a zero sum: the positive entry merges
    assert torch.equal(vote.merge(zero="positive", normalize=False), torch.tensor([4.0, -2.0, 1.0]))


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0, 1.0], [0.5, 2.0, -1.0, 0.0]])
@pytest.mark.parametrize("zero", ["zero", "positive"])
@pytest.mark.parametrize("normalize", [True, False])
def test_sign_vote_equals_the_two_pass_rule(weights, zero, normalize):
    g = torch.Generator().manual_seed(1)
    taus = [torch.randn(50, 40, generator=g).round(decimals=1) for _ in weights]  # many ties
    thresholds = [0.3, 1.0, None, 0.0]
    ps = [trim_ref(t, thr) * w for t, thr, w in zip(taus, thresholds, weights, strict=True)]
    want = vote_ref(ps, weights, zero_elects_plus=zero == "positive", normalize=normalize)
    scratch = Scratch((50, 40), "cpu")
    vote = SignVote(scratch, weights)
    counts = [
        vote.add(trim_into(t, thr, scratch.get("trimmed")).mul_(w), w)
        for t, thr, w in zip(taus, thresholds, weights, strict=True)
    ]
    assert counts == [int(torch.count_nonzero(p)) for p in ps]
    assert torch.equal(vote.merge(zero=zero, normalize=normalize), want)


@pytest.mark.parametrize("shape", [(64, 48), (700, 600)])  # small, and above the bracket size
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"weights": [2.0, 0.5, 1.0]}, {"normalize": False, "scaling": 0.7}, {"rescale": True}],
)
def test_ties_local_equals_the_reference(shape, kwargs):
    deltas = lowrank_tasks(3, shape, seed=shape[0])
    dense = [Dense(d.to_dense(torch.float32)) for d in deltas]
    before = [t.tensor.clone() for t in dense]
    weights = kwargs.get("weights", [1.0] * 3)
    ps = []
    for d, w in zip(dense, weights, strict=True):
        tau = d.tensor
        trimmed = trim_ref(tau, kth_ref(tau.abs().reshape(-1), int(0.3 * tau.numel())))
        if kwargs.get("rescale"):
            trimmed = trimmed * (tau.abs().sum() / trimmed.abs().sum())
        ps.append(trimmed * w)
    want = vote_ref(ps, weights, normalize=kwargs.get("normalize", True))
    want = want * kwargs.get("scaling", 1.0)
    got = ties(dense, density=0.3, trim="local", **kwargs)
    assert torch.equal(got.delta.tensor, want)
    assert got.stats == {
        "kept": sum(int(torch.count_nonzero(p)) for p in ps),
        "total": 3 * tau.numel(),
    }
    assert all(
        torch.equal(t.tensor, b) for t, b in zip(dense, before, strict=True)
    )  # inputs unchanged
    # LowRank inputs given directly are densified one at a time: the same merge
    assert torch.equal(ties(deltas, density=0.3, trim="local", **kwargs).delta.tensor, want)


def test_ties_result_is_close_to_a_float64_rule():
    deltas = lowrank_tasks(4, (300, 200), seed=7)
    taus = [d.to_dense(torch.float32).double() for d in deltas]  # the same entries, in float64
    keep = int(0.2 * 300 * 200)
    trimmed = [
        t * (t.abs() >= t.abs().reshape(-1).sort(descending=True).values[keep - 1]) for t in taus
    ]
    total = sum(trimmed)
    agree = [(torch.sign(p) == torch.sign(total)) & (p != 0) for p in trimmed]
    want = sum(p * a for p, a in zip(trimmed, agree, strict=True)) / sum(
        a.double() for a in agree
    ).clamp(min=1)
    got = ties([Dense(d.to_dense(torch.float32)) for d in deltas], density=0.2, trim="local")
    torch.testing.assert_close(got.delta.tensor.double(), want, rtol=1e-5, atol=1e-6)


def reference_gta(taus, masks, weights, *, consensus, normalize, lam, rescale):
    """mergekit's generalized task arithmetic over all sparsified copies at once."""
    sparse = [t * m for t, m in zip(taus, masks, strict=True)]
    if rescale:
        sparse = [s * (t.abs().sum() / s.abs().sum()) for t, s in zip(taus, sparse, strict=True)]
    ps = [s * w for s, w in zip(sparse, weights, strict=True)]
    if consensus:
        merged = vote_ref(ps, weights, zero_elects_plus=True, normalize=normalize)
    else:
        merged = sum(ps)
        merged = merged / sum(weights) if normalize else merged
    return merged * lam, sum(int(torch.count_nonzero(s)) for s in sparse)


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("rescale", [True, False])
def test_dare_streams_to_the_reference(name, rescale, monkeypatch):
    deltas = lowrank_tasks(3, (80, 60), seed=11)
    taus = [d.to_dense(torch.float32) for d in deltas]
    draws = [torch.rand(80, 60, generator=torch.Generator().manual_seed(t)) for t in range(3)]
    monkeypatch.setattr(
        "starmerge.methods.dare.task_uniform",
        lambda delta, seed: draws[next(i for i, d in enumerate(deltas) if d is delta)],
    )
    method = METHODS.get(name)
    weights = [1.0, 2.0, 0.5]
    params = {
        "density": 0.4,
        "weights": weights,
        "rescale": rescale,
        "normalize": True,
        "lambda": 1.3,
    }
    got = method.fn(deltas, **method.kernel_args(method.resolve(params)))
    want, kept = reference_gta(
        taus,
        [u < 0.4 for u in draws],
        weights,
        consensus=name == "dare_ties",
        normalize=True,
        lam=1.3,
        rescale=rescale,
    )
    assert torch.equal(got.delta.tensor, want)
    assert got.stats == {"kept": kept, "total": 3 * 80 * 60, "seed": 0}
    assert all(
        torch.equal(u, torch.rand(80, 60, generator=torch.Generator().manual_seed(t)))
        for t, u in enumerate(draws)
    )  # the draws were not written to
