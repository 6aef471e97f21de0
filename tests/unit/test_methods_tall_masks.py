"""tall_masks (seed code) and consensus (paper) against plain float64 formulas."""

import pytest
import torch

from starmerge.errors import ConfigError
from starmerge.methods import METHODS
from starmerge.methods.tall_masks import consensus, tall_masks
from starmerge.tensors.delta import Dense


def taus(seed, n_tasks=4, shape=(8, 4)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n_tasks)]


def ref(xs, mask_lambda, alpha, k, seed_style):
    xs = [x.double() for x in xs]
    s = sum(xs)
    target = alpha * s if seed_style else s
    count = sum((x.abs() > mask_lambda * (target - x).abs()).double() for x in xs)
    keep = count >= k
    return torch.where(keep, alpha * s, 0.0)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize(("lam", "alpha"), [(0.4, 0.4), (0.2, 1.0), (0.6, 0.3)])
def test_tall_masks_matches_reference(k, lam, alpha):
    xs = taus(k)
    got = tall_masks([Dense(x) for x in xs], mask_lambda=lam, alpha=alpha, consensus=k)
    torch.testing.assert_close(got.delta.tensor.double(), ref(xs, lam, alpha, k, True))


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize(("lam", "alpha"), [(0.4, 1.0), (0.2, 0.5), (0.6, 0.3)])
def test_consensus_matches_reference(k, lam, alpha):
    xs = taus(10 + k)
    got = consensus([Dense(x) for x in xs], mask_lambda=lam, alpha=alpha, consensus=k)
    torch.testing.assert_close(got.delta.tensor.double(), ref(xs, lam, alpha, k, False))


def test_variants_differ_only_through_alpha_in_the_mask():
    xs = [Dense(x) for x in taus(5)]
    same_a = tall_masks(xs, alpha=1.0).delta.tensor
    same_b = consensus(xs, alpha=1.0).delta.tensor
    assert torch.equal(same_a, same_b)
    seed_style = tall_masks(xs, alpha=0.4)
    paper = consensus(xs, alpha=0.4)
    assert seed_style.stats["kept"] > paper.stats["kept"]  # masks against 0.4 S are permissive


def test_mask_inequality_is_strict():
    ones = [Dense(torch.ones(3)), Dense(torch.ones(3))]  # |1| vs lambda * |2 - 1|
    assert torch.equal(consensus(ones, mask_lambda=1.0).delta.tensor, torch.zeros(3))
    assert torch.equal(consensus(ones, mask_lambda=0.99).delta.tensor, torch.full((3,), 2.0))


@pytest.mark.parametrize("k", [3, 300])  # 300: beyond the range of the uint8 count (300 % 256 = 44)
def test_consensus_above_task_count_gives_zero(k):
    xs = [Dense(x) for x in taus(6, n_tasks=2)]
    assert torch.equal(tall_masks(xs, consensus=k).delta.tensor, torch.zeros(8, 4))
    assert torch.equal(consensus(xs, consensus=k).delta.tensor, torch.zeros(8, 4))


def test_zero_and_order_invariance_and_stats():
    zero = [Dense(torch.zeros(2, 2))] * 3
    assert torch.equal(tall_masks(zero).delta.tensor, torch.zeros(2, 2))
    xs = [Dense(x) for x in taus(7)]
    fwd, rev = consensus(xs), consensus(xs[::-1])
    torch.testing.assert_close(fwd.delta.tensor, rev.delta.tensor)
    assert fwd.stats["total"] == 32 and 0 <= fwd.stats["kept"] <= 32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_is_kept(dtype):
    xs = [Dense(x.to(dtype)) for x in taus(8)]
    assert tall_masks(xs).delta.tensor.dtype == dtype
    assert consensus(xs).delta.tensor.dtype == dtype


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("tall_masks", {"consensus": 0}, "tall_masks: consensus must be an integer >= 1, got 0"),
        ("consensus", {"mask_lambda": -1}, "consensus: mask_lambda must be >= 0, got -1"),
    ],
)
def test_bad_params(name, params, message):
    with pytest.raises(ConfigError) as err:
        METHODS.get(name).resolve(params)
    assert str(err.value) == message


def test_defaults():
    assert METHODS.get("tall_masks").resolve({}) == {
        "mask_lambda": 0.4,
        "alpha": 0.4,
        "consensus": 2,
    }
    assert METHODS.get("consensus").resolve({}) == {
        "mask_lambda": 0.4,
        "alpha": 1.0,
        "consensus": 2,
    }


def test_consensus_must_be_an_int():
    with pytest.raises(ConfigError, match=r"^consensus: consensus must be an? int, got 1.5"):
        METHODS.get("consensus").resolve({"consensus": 1.5})
