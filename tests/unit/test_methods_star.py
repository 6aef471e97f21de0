"""STAR against a plain float64 dense-SVD implementation; factor space, edge cases, spectra."""

import pytest
import torch

from starmerge.errors import ConfigError
from starmerge.methods import METHODS
from starmerge.methods import star as star_module
from starmerge.methods.star import star
from starmerge.tensors import threads
from starmerge.tensors.delta import Dense, LowRank


def ref_star_one(x, eta):
    """Textbook STAR on one float64 matrix (singular values below 1e-10 * s_1 are zero)."""
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    s = torch.where(s > 1e-10 * s[0], s, 0.0) if s[0] > 0 else s
    total = float(s.sum())
    if total == 0:
        return torch.zeros_like(x, dtype=torch.float64), 0
    k, acc = 0, 0.0
    while k < len(s) and s[k] > 0 and acc < total * eta / 100:
        acc += float(s[k])
        k += 1
    s_new = s[:k] * (total / acc)
    return u[:, :k] @ torch.diag(s_new) @ vh[:k], k


def ref_star(mats, eta):
    outs = [ref_star_one(x, eta) for x in mats]
    return sum(o for o, _ in outs) / len(mats), [k for _, k in outs]


def rel_err(got, want):
    return float((got.double() - want).norm() / want.norm())


def lowranks(seed, ranks=(3, 4, 2), shape=(8, 6)):
    g = torch.Generator().manual_seed(seed)
    return [
        LowRank(
            torch.randn(shape[0], r, generator=g), torch.randn(r, shape[1], generator=g), 2.0 / r
        )
        for r in ranks
    ]


def with_spectrum(s, seed=0, shape=(6, 4)):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(shape[0], len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], len(s), generator=g, dtype=torch.float64))
    return u, torch.tensor(s, dtype=torch.float64), v


@pytest.mark.parametrize("eta", [1.0, 20.0, 40.0, 60.0, 90.0, 100.0])
def test_lowrank_factor_space_matches_float64_dense_svd(eta):
    deltas = lowranks(0)
    merged = star(deltas, eta=eta)
    want, ks = ref_star([d.to_dense(torch.float64) for d in deltas], eta)
    assert isinstance(merged.delta, LowRank)
    assert merged.delta.rank == sum(ks)
    assert merged.stats == {"kept_ranks": ks}
    assert rel_err(merged.delta.to_dense(torch.float64), want) < 1e-5


@pytest.mark.parametrize("split", [False, True])
def test_lowrank_on_two_threads_matches_float64_dense_svd(split, monkeypatch):
    """Grams and kept-column products split over two threads give the same merge.

    Mixed ranks (two groups), one rank-deficient factor (that group's QR route) and a zero
    scale (a task that keeps nothing) cover every branch of the split work.
    """
    monkeypatch.setattr(threads, "_cores", lambda: 2)
    monkeypatch.setattr(threads, "SPLIT_MIN_ENTRIES", 0 if split else 1 << 62)
    deltas = lowranks(5, ranks=(4, 4, 3, 4, 3, 4), shape=(60, 50))
    b = deltas[1].b.clone()
    b[:, 3] = b[:, 0]  # rank 3 of 4: not well conditioned
    deltas[1] = LowRank(b, deltas[1].a, deltas[1].scale)
    deltas[4] = LowRank(deltas[4].b, deltas[4].a, 0.0)
    merged = star(deltas, eta=40.0)
    want, ks = ref_star([d.to_dense(torch.float64) for d in deltas], 40.0)
    assert merged.stats == {"kept_ranks": ks} and ks[4] == 0
    assert rel_err(merged.delta.to_dense(torch.float64), want) < 1e-5


@pytest.mark.parametrize("eta", [10.0, 40.0, 75.0, 100.0])
@pytest.mark.parametrize("shape", [(8, 4), (4, 8), (40, 30)])
@pytest.mark.parametrize("float32_svd", [False, True])
def test_dense_matches_float64_reference(eta, shape, float32_svd, monkeypatch):
    if float32_svd:  # the path large matrices take
        monkeypatch.setattr(star_module, "_SMALL", 0)
    g = torch.Generator().manual_seed(1)
    mats = [torch.randn(shape, generator=g) for _ in range(3)]
    merged = star([Dense(x) for x in mats], eta=eta)
    want, ks = ref_star(mats, eta)
    assert merged.stats == {"kept_ranks": ks}
    assert rel_err(merged.delta.tensor, want) < 1e-5


@pytest.mark.parametrize(
    ("eta", "k", "factor"),
    [(39.0, 1, 10 / 4), (41.0, 2, 10 / 7), (69.0, 2, 10 / 7), (71.0, 3, 10 / 9), (100.0, 4, 1.0)],
)
def test_hand_worked_spectrum(eta, k, factor):
    # s = [4, 3, 2, 1]: sum 10, cumsum 4, 7, 9, 10; eta 41 -> target 4.1 -> k = 2, factor 10 / 7
    u, s, v = with_spectrum([4.0, 3.0, 2.0, 1.0])
    x = (u * s) @ v.T
    want = (u[:, :k] * (s[:k] * factor)) @ v[:, :k].T
    dense = star([Dense(x.float())], eta=eta)
    assert dense.stats == {"kept_ranks": [k]}
    assert rel_err(dense.delta.tensor, want) < 1e-6
    low = star([LowRank((u * s).float(), v.T.float(), 1.0)], eta=eta)
    assert low.stats == {"kept_ranks": [k]}
    assert rel_err(low.delta.to_dense(), want) < 1e-6


@pytest.mark.parametrize(("eta", "k"), [(40.0, 1), (70.0, 2), (90.0, 3)])
def test_cumsum_equal_to_target_counts_as_reached(eta, k):
    # an exactly representable spectrum: eta 40 -> target 4 = cumsum_1, so k = 1 (seed: ">=")
    x = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    assert star([Dense(x)], eta=eta).stats == {"kept_ranks": [k]}
    assert star([LowRank(x, torch.eye(4, dtype=torch.float64), 1.0)], eta=eta).stats == {
        "kept_ranks": [k]
    }


def test_eta_100_is_identity_even_when_rank_deficient():
    g = torch.Generator().manual_seed(2)
    b = torch.randn(10, 3, generator=g)
    b = torch.cat([b, b[:, :2]], dim=1)  # r = 5, true rank 3: two exactly dependent columns
    d = LowRank(b, torch.randn(5, 7, generator=g), 0.5)
    merged = star([d], eta=100.0)
    assert merged.stats == {"kept_ranks": [3]}
    torch.testing.assert_close(merged.delta.to_dense(), d.to_dense(), rtol=1e-5, atol=1e-5)
    dense = star([Dense(d.to_dense())], eta=100.0)
    assert dense.stats == {"kept_ranks": [3]}
    torch.testing.assert_close(dense.delta.tensor, d.to_dense(), rtol=1e-5, atol=1e-5)


def test_zero_matrix_stays_zero_not_nan():
    zero_b = LowRank(torch.zeros(6, 2), torch.randn(2, 4), 2.0)  # LoRA B at its zero init
    rank0 = LowRank(torch.zeros(6, 0), torch.zeros(0, 4), 1.0)
    for eta in (1.0, 40.0, 100.0):
        low = star([zero_b, rank0], eta=eta)
        assert low.stats == {"kept_ranks": [0, 0]}
        assert torch.equal(low.delta.to_dense(), torch.zeros(6, 4))
        dense = star([Dense(torch.zeros(6, 4))] * 2, eta=eta)
        assert torch.equal(dense.delta.tensor, torch.zeros(6, 4))


def test_zero_task_still_counts_in_the_average():
    d = lowranks(3, ranks=(2,))[0]
    zero = LowRank(torch.zeros(8, 0), torch.zeros(0, 6), 1.0)
    alone = star([d], eta=100.0).delta.to_dense()
    with_zero = star([d, zero], eta=100.0)
    assert with_zero.stats == {"kept_ranks": [2, 0]}
    torch.testing.assert_close(with_zero.delta.to_dense(), alone / 2)


def test_non_matrix_parameters_are_averaged():
    xs = [torch.randn(5), torch.randn(5), torch.randn(5)]
    got = star([Dense(x) for x in xs], eta=10.0)
    torch.testing.assert_close(got.delta.tensor, sum(xs) / 3)
    assert got.stats == {}


def test_order_invariance_and_determinism():
    deltas = lowranks(4, ranks=(2, 5, 3))
    fwd, rev = star(deltas), star(deltas[::-1])
    assert fwd.stats["kept_ranks"] == rev.stats["kept_ranks"][::-1]
    torch.testing.assert_close(fwd.delta.to_dense(), rev.delta.to_dense(), rtol=1e-5, atol=1e-6)
    again = star(deltas)
    assert torch.equal(fwd.delta.b, again.delta.b) and torch.equal(fwd.delta.a, again.delta.a)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_upcast_and_kept(dtype):
    deltas = lowranks(5)
    low = star([LowRank(d.b.to(dtype), d.a.to(dtype), d.scale) for d in deltas])
    assert low.delta.dtype == dtype
    dense = star([Dense(d.to_dense().to(dtype)) for d in deltas])
    assert dense.delta.dtype == dtype
    want, _ = ref_star([d.to_dense(torch.float64) for d in deltas], 40.0)
    assert rel_err(dense.delta.tensor.float(), want) < 2e-2


@pytest.mark.parametrize(
    ("eta", "message"),
    [
        (0, "star: eta must be in (0, 100], got 0"),
        (100.5, "star: eta must be in (0, 100], got 100.5"),
    ],
)
def test_eta_out_of_range(eta, message):
    with pytest.raises(ConfigError) as err:
        METHODS.get("star").resolve({"eta": eta})
    assert str(err.value) == message
