"""CART and WUDI against plain float64 dense references; factor space, properties, edge cases."""

import pytest
import torch

from starmerge.errors import ConfigError
from starmerge.methods import METHODS
from starmerge.methods.cart import cart
from starmerge.methods.wudi import wudi
from starmerge.tensors.delta import Dense, LowRank


def dense_mats(seed, shape=(8, 6), n_tasks=3, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g) * scale).to(dtype) for _ in range(n_tasks)]


def lowranks(seed, ranks=(2, 3, 1), shape=(10, 12), scales=(0.5, 2.0, 1.0), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    out = []
    for r, s in zip(ranks, scales, strict=True):
        b = torch.randn(shape[0], r, generator=g).to(dtype)
        a = torch.randn(r, shape[1], generator=g).to(dtype)
        out.append(LowRank(b, a, s))
    return out


def as_dense(delta):
    return delta.to_dense(torch.float64) if isinstance(delta, LowRank) else delta.tensor.double()


def rel_err(got, want):
    return float((as_dense(got) - want).norm() / want.norm())


@pytest.fixture
def no_densify(monkeypatch):
    """Fail any LowRank.to_dense call: the factor paths must never form the matrix."""

    def refuse(self, dtype=None):
        raise AssertionError("a LowRank delta was densified")

    monkeypatch.setattr(LowRank, "to_dense", refuse)


# ---------------------------------------------------------------- CART


def ref_cart(mats, scaling, k):
    """Textbook CART in float64: mean + scaling * sum_t SVD_k(D_t - mean)."""
    mats = [m.double() for m in mats]
    mean = sum(mats) / len(mats)
    out = mean.clone()
    for x in mats:
        u, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
        out += scaling * (u[:, :k] @ torch.diag(s[:k]) @ vh[:k])
    return out


@pytest.mark.parametrize(("rank_fraction", "k"), [(0.5, 3), (0.12, 1), (0.34, 2), (1.0, 6)])
def test_cart_dense_matches_reference(rank_fraction, k):
    mats = dense_mats(0)
    got = cart([Dense(m) for m in mats], scaling=1.5, rank_fraction=rank_fraction)
    assert rel_err(got.delta, ref_cart(mats, 1.5, k)) < 1e-6
    assert got.stats == {"kept_ranks": [k] * 3}


def test_cart_lowrank_matches_dense_reference_without_densifying(no_densify):
    deltas = lowranks(1) + [LowRank(torch.zeros(10, 2), torch.randn(2, 12), 1.0)]  # zero adapter
    mats = [(d.b.double() @ d.a.double()) * d.scale for d in deltas]
    got = cart(deltas, scaling=2.0, rank_fraction=0.25)  # k = floor(0.25 * 10) = 2
    assert isinstance(got.delta, LowRank)
    assert got.delta.rank <= 8  # R = sum_t r_t: the merge lies in span(B) x span(A)
    assert got.stats == {"kept_ranks": [2, 2, 2, 2]}
    b, a = got.delta.b.double(), got.delta.a.double()
    assert float((b @ a - ref_cart(mats, 2.0, 2)).norm() / ref_cart(mats, 2.0, 2).norm()) < 1e-6


def test_cart_rank_capped_by_numerical_rank():
    deltas = lowranks(2, ranks=(1, 1), scales=(1.0, 1.0))  # each centred delta has rank 2
    got = cart(deltas + [LowRank(torch.zeros(10, 0), torch.zeros(0, 12))], rank_fraction=1.0)
    assert got.stats == {"kept_ranks": [2, 2, 2]}
    dense = cart([Dense(d.to_dense()) for d in deltas], rank_fraction=1.0)
    assert dense.stats == {"kept_ranks": [2, 2]}  # the float32 noise tail is not kept


def test_cart_hand_worked():
    # mean diag(1.5, 1); centred diag(1.5, -1), diag(-1.5, 2), diag(0, -1); top-1 parts sum to
    # diag(1.5, 1); merged = diag(1.5, 1) + 2 * diag(1.5, 1)
    mats = [torch.diag(torch.tensor(v)) for v in ([3.0, 0.0], [0.0, 3.0], [1.5, 0.0])]
    got = cart([Dense(m) for m in mats], scaling=2.0, rank_fraction=0.5)
    torch.testing.assert_close(got.delta.tensor, torch.diag(torch.tensor([4.5, 3.0])))


@pytest.mark.parametrize("lowrank", [False, True])
def test_cart_reduces_to_the_mean(lowrank):
    deltas = lowranks(3) if lowrank else [Dense(m) for m in dense_mats(3)]
    mean = sum(as_dense(d) for d in deltas) / 3
    for params in ({"rank_fraction": 0.0}, {"scaling": 0.0}, {"rank_fraction": 1.0}):
        assert rel_err(cart(deltas, **params).delta, mean) < 1e-6, params  # full rank: sum = 0
    two = deltas[:2]  # T = 2: the centred deltas are opposite, so are their truncations
    assert rel_err(cart(two).delta, (as_dense(two[0]) + as_dense(two[1])) / 2) < 1e-6


@pytest.mark.parametrize("lowrank", [False, True])
def test_cart_one_task_is_that_task(lowrank):
    delta = lowranks(4)[1] if lowrank else Dense(dense_mats(4)[0])
    assert rel_err(cart([delta]).delta, as_dense(delta)) < 1e-6


def test_cart_non_matrix_is_averaged_and_dtype_kept():
    vecs = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0])]
    got = cart([Dense(v.bfloat16()) for v in vecs]).delta.tensor
    assert got.dtype == torch.bfloat16 and got.tolist() == [2.0, 1.0]
    half = cart([Dense(m.half()) for m in dense_mats(5)]).delta
    assert half.dtype == torch.float16 and torch.isfinite(half.tensor).all()


# ---------------------------------------------------------------- WUDI


def objective(x, mats):
    """sum_t ||(X - D_t) D_t^T||^2 / ||D_t||^2 over the non-zero D_t (float64)."""
    x = x.double()
    total = torch.zeros((), dtype=torch.float64)
    for d in (m.double() for m in mats):
        if d.norm() > 0:
            total += ((x - d) @ d.T).square().sum() / d.square().sum()
    return float(total)


def normal_equations(mats):
    """G and H of the stationarity condition X G = H (float64)."""
    mats = [m.double() for m in mats if m.norm() > 0]
    w = [1 / m.square().sum() for m in mats]
    gram = sum(wt * m.T @ m for wt, m in zip(w, mats, strict=True))
    h = sum(wt * m @ m.T @ m for wt, m in zip(w, mats, strict=True))
    return gram, h


def ref_adam(mats, steps, lr):
    """The paper's procedure, written plainly: autograd + torch.optim.Adam from the sum."""
    tvs = torch.stack(mats)
    x = torch.nn.Parameter(tvs.sum(0).clone())
    opt = torch.optim.Adam([x], lr=lr)
    norms = tvs.reshape(len(mats), -1).norm(dim=-1).square()
    for _ in range(steps):
        loss = (((x[None] - tvs) @ tvs.mT).square() / norms[:, None, None]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return x.detach()


def test_wudi_exact_is_the_minimiser_dense():
    mats = dense_mats(10, shape=(6, 8), dtype=torch.float64)  # T m = 18 >= n: G invertible
    got = wudi([Dense(m) for m in mats], solver="exact")
    gram, h = normal_equations(mats)
    x = got.delta.tensor
    assert got.stats == {"solver": "exact"} and x.dtype == torch.float64
    assert float((x @ gram - h).norm() / h.norm()) < 1e-10  # gradient 2 (X G - H) = 0
    torch.testing.assert_close(x, torch.linalg.solve(gram, h.T).T)  # G symmetric
    f = objective(x, mats)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert f <= objective(x + 1e-3 * torch.randn(x.shape, generator=g, dtype=x.dtype), mats)
    adam = wudi([Dense(m.float()) for m in mats]).delta.tensor
    assert f <= objective(adam, mats)
    assert f <= objective(wudi([Dense(m) for m in mats], steps=2000, lr=1e-2).delta.tensor, mats)


def test_wudi_exact_lowrank_is_the_min_norm_minimiser_without_densifying(no_densify):
    deltas = lowranks(11, dtype=torch.float64)  # R = 6 < n = 12: G singular
    got = wudi(deltas, solver="exact")
    assert isinstance(got.delta, LowRank) and got.delta.rank <= 6
    mats = [(d.b @ d.a) * d.scale for d in deltas]
    gram, h = normal_equations(mats)
    want = h @ torch.linalg.pinv(gram, hermitian=True)
    x = got.delta.b @ got.delta.a
    assert float((x - want).norm() / want.norm()) < 1e-9
    assert float((x @ gram - h).norm() / h.norm()) < 1e-9


def test_wudi_exact_lowrank_float32_matches_dense_path():
    deltas = lowranks(12, shape=(16, 9))  # R = 6 < n = 9
    lr = wudi(deltas, solver="exact").delta
    dense = wudi([Dense(d.to_dense()) for d in deltas], solver="exact").delta
    assert rel_err(lr, as_dense(dense)) < 1e-4


@pytest.mark.parametrize("lowrank", [False, True])
def test_wudi_adam_matches_plain_autograd_adam(lowrank):
    deltas = lowranks(13) if lowrank else [Dense(m) for m in dense_mats(13, scale=0.01)]
    if lowrank:  # small entries, as real task vectors: Adam's lr-sized steps then matter
        deltas = [LowRank(d.b * 0.1, d.a * 0.1, d.scale) for d in deltas]
    mats = [d.to_dense(torch.float32) for d in deltas]
    got = wudi(deltas, steps=50, lr=1e-4).delta.tensor
    want = ref_adam(mats, 50, 1e-4)
    moved = float((want - sum(mats)).abs().max())
    assert moved > 1e-3  # the test can tell Adam's result from its start
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * moved)
    assert objective(got, mats) < objective(sum(mats), mats)


@pytest.mark.parametrize("solver", ["adam", "exact"])
@pytest.mark.parametrize("lowrank", [False, True])
def test_wudi_properties(solver, lowrank):
    deltas = lowranks(14) if lowrank else [Dense(m) for m in dense_mats(14)]
    one = wudi(deltas[1:2], solver=solver).delta  # one task in, that task out
    assert rel_err(one, as_dense(deltas[1])) < 1e-5
    zero = (
        LowRank(torch.zeros(10, 0), torch.zeros(0, 12)) if lowrank else Dense(0 * deltas[0].tensor)
    )
    with_zero = wudi([deltas[0], zero, deltas[2]], solver=solver).delta
    without = as_dense(wudi([deltas[0], deltas[2]], solver=solver).delta)
    assert torch.isfinite(as_dense(with_zero)).all()
    assert rel_err(with_zero, without) < 1e-5  # a zero delta has no term (and S is unchanged)
    all_zero = wudi([zero, zero], solver=solver).delta
    assert torch.equal(as_dense(all_zero), torch.zeros(as_dense(zero).shape, dtype=torch.float64))


def test_wudi_exact_is_homogeneous_and_steps_zero_is_the_sum():
    mats = dense_mats(15)
    x = as_dense(wudi([Dense(m) for m in mats], solver="exact").delta)
    x3 = wudi([Dense(3 * m) for m in mats], solver="exact").delta
    assert rel_err(x3, 3 * x) < 1e-5
    start = wudi([Dense(m) for m in mats], steps=0).delta.tensor
    torch.testing.assert_close(start, sum(mats))


def test_wudi_non_matrix_is_averaged():
    got = wudi([Dense(torch.tensor([1.0, 2.0])), Dense(torch.tensor([3.0, 0.0]))]).delta.tensor
    assert got.tolist() == [2.0, 1.0]


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("cart", {"rank_fraction": 1.5}, "cart: rank_fraction must be in [0, 1], got 1.5"),
        ("cart", {"scaling": 2000.0}, "cart: scaling must be in [-1000, 1000], got 2000.0"),
        ("wudi", {"steps": -1}, "wudi: steps must be in [0, 100000], got -1"),
        ("wudi", {"lr": 0.0}, "wudi: lr must be in (0, 1], got 0.0"),
        (
            "wudi",
            {"steps": 2.5},
            "wudi: steps must be an int, got 2.5 (float); fix the value in `parameters:`",
        ),
    ],
)
def test_bad_parameters_are_refused(name, params, message):
    with pytest.raises(ConfigError) as err:
        METHODS.get(name).resolve(params)
    assert str(err.value) == message


def test_unknown_solver_is_refused():
    with pytest.raises(ConfigError) as err:
        METHODS.get("wudi").resolve({"solver": "sgd"})
    assert str(err.value).startswith("wudi: solver must be one of adam, exact, got 'sgd'.")


def test_defaults():
    assert METHODS.get("cart").resolve({}) == {"scaling": 2.0, "rank_fraction": 0.12}
    assert METHODS.get("wudi").resolve({}) == {"solver": "adam", "steps": 300, "lr": 1e-5}
