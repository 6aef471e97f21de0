"""Task Arithmetic against a float64 sum, dense and factored."""

import pytest
import torch

from starmerge.errors import ConfigError
from starmerge.methods import METHODS
from starmerge.methods.task_arithmetic import task_arithmetic
from starmerge.tensors.delta import Dense, LowRank


def lowranks(seed, ranks=(2, 3, 1), shape=(8, 4)):
    g = torch.Generator().manual_seed(seed)
    return [
        LowRank(
            torch.randn(shape[0], r, generator=g), torch.randn(r, shape[1], generator=g), 0.5 + t
        )
        for t, r in enumerate(ranks)
    ]


def rel_err(got, want):
    return float((got.double() - want).norm() / want.norm())


def test_dense_matches_float64_weighted_sum():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 4, generator=g) for _ in range(3)]
    weights = [0.2, -1.0, 3.0]
    got = task_arithmetic([Dense(x) for x in xs], scaling=0.7, weights=weights).delta.tensor
    want = 0.7 * sum(w * x.double() for w, x in zip(weights, xs, strict=True))
    assert rel_err(got, want) < 1e-6


def test_lowrank_stays_factored_and_exact():
    deltas = lowranks(1)
    merged = task_arithmetic(deltas, scaling=0.3, weights=[1.0, 2.0, -0.5]).delta
    assert isinstance(merged, LowRank) and merged.rank == 6
    want = 0.3 * sum(
        w * d.scale * d.b.double() @ d.a.double()
        for w, d in zip([1.0, 2.0, -0.5], deltas, strict=True)
    )
    assert rel_err(merged.to_dense(), want) < 1e-5


def test_no_weights_means_all_ones():
    deltas = [Dense(torch.full((2,), float(t))) for t in range(1, 4)]
    assert torch.equal(task_arithmetic(deltas).delta.tensor, torch.full((2,), 6.0))


def test_one_task_returns_it_scaled():
    x = torch.randn(3, 5)
    assert torch.equal(task_arithmetic([Dense(x)]).delta.tensor, x)


def test_weights_of_wrong_length_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        task_arithmetic([Dense(torch.ones(2))] * 3, weights=[1.0, 1.0])
    assert str(err.value) == (
        "task_arithmetic: weights has 2 entries but there are 3 models; give one weight per "
        "model (models[].weight) or leave weights unset"
    )


def test_weights_must_be_numbers():
    with pytest.raises(ConfigError) as err:
        METHODS.get("task_arithmetic").resolve({"weights": ["a"]})
    assert str(err.value) == (
        "task_arithmetic: weights must be a list of numbers, one per model (or unset), got ['a']"
    )


def test_order_invariance_and_zero():
    deltas = lowranks(2)
    fwd = task_arithmetic(deltas).delta.to_dense()
    rev = task_arithmetic(deltas[::-1]).delta.to_dense()
    torch.testing.assert_close(fwd, rev)
    zero = task_arithmetic([Dense(torch.zeros(3, 2))] * 2).delta.tensor
    assert torch.equal(zero, torch.zeros(3, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_is_kept(dtype):
    dense = [Dense(torch.randn(4, 4).to(dtype)) for _ in range(2)]
    assert task_arithmetic(dense).delta.dtype == dtype
    low = [LowRank(d.b.to(dtype), d.a.to(dtype), d.scale) for d in lowranks(3)]
    assert task_arithmetic(low).delta.dtype == dtype
