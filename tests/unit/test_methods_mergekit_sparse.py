"""mergekit's task-arithmetic family: float64 references, hand-worked cases and statistics.

The deterministic rules are also checked against mergekit itself in
``tests/golden/test_mergekit_sparse.py``; here: independent float64 references, the documented
edge cases, parameter refusals, and for DARE / DELLA the statistics of the random masks.
"""

import math

import pytest
import torch

from starmerge.errors import ConfigError
from starmerge.methods import METHODS
from starmerge.methods.generalized_ta import task_uniform
from starmerge.methods.task_arithmetic import scale_task
from starmerge.tensors.delta import Dense, LowRank
from starmerge.tensors.sparsify import della_keep_probs, outlier_trim


def merge(name, deltas, **params):
    method = METHODS.get(name)
    return method.fn(deltas, **method.kernel_args(method.resolve(params)))


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def gta_reference(taus, weights, keep, consensus, normalize, lam):
    """Plain float64 generalized task arithmetic over already-sparsified tasks."""
    d = torch.stack([w * (t.double() * k) for t, w, k in zip(taus, weights, keep, strict=True)])
    w = torch.tensor(weights, dtype=torch.float64).reshape(-1, *[1] * taus[0].dim())
    if consensus:
        sign = torch.where(d.sum(0) >= 0, 1.0, -1.0)
        mask = torch.sign(d) == sign
        mixed, div = (d * mask).sum(0), (w * mask).sum(0)
        div = torch.where(div == 0, 1.0, div)
    else:
        mixed, div = d.sum(0), w.sum()
        div = div if abs(div) >= 1e-8 else torch.tensor(1.0)
    return lam * (mixed / div if normalize else mixed)


# --- linear and task_arithmetic's normalize ------------------------------------------------


def test_linear_is_the_weighted_average():
    xs = [randn(5, 4, seed=s) for s in range(3)]
    got = merge("linear", [Dense(x) for x in xs], weights=[1.0, 0.5, 2.5]).delta.tensor
    want = sum(w * x.double() for w, x in zip([1.0, 0.5, 2.5], xs, strict=True)) / 4.0
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    plain = merge("linear", [Dense(x) for x in xs], weights=[1.0, 0.5, 2.5], normalize=False)
    want_sum = sum(w * x.double() for w, x in zip([1.0, 0.5, 2.5], xs, strict=True))
    torch.testing.assert_close(plain.delta.tensor.double(), want_sum, rtol=1e-6, atol=1e-6)


def test_linear_lowrank_stays_factored_and_exact():
    g = torch.Generator().manual_seed(3)
    deltas = [
        LowRank(torch.randn(6, r, generator=g), torch.randn(r, 4, generator=g), 0.5 + r)
        for r in (1, 2, 3)
    ]
    got = merge("linear", deltas, weights=[2.0, 1.0, 1.0]).delta
    assert isinstance(got, LowRank) and got.rank == 6
    want = (
        sum(
            w * d.scale * d.b.double() @ d.a.double()
            for w, d in zip([2.0, 1.0, 1.0], deltas, strict=True)
        )
        / 4
    )
    torch.testing.assert_close(got.to_dense(torch.float64), want, rtol=1e-6, atol=1e-6)


def test_linear_refuses_weights_summing_to_zero_and_wrong_length():
    xs = [Dense(torch.ones(2)), Dense(torch.zeros(2))]
    with pytest.raises(ConfigError) as err:
        merge("linear", xs, weights=[1.0, -1.0])
    assert str(err.value) == (
        "linear: the weights sum to 0, so normalize cannot divide by their sum; "
        "change models[].weight or set normalize: false"
    )
    with pytest.raises(ConfigError, match="linear: weights has 3 entries but there are 2 models"):
        merge("linear", xs, weights=[1.0, 1.0, 1.0])


def test_task_arithmetic_normalize_divides_by_the_weights():
    xs = [randn(4, 3, seed=s) for s in range(2)]
    got = merge(
        "task_arithmetic", [Dense(x) for x in xs], weights=[1.0, 3.0], scaling=0.5, normalize=True
    )
    want = 0.5 * (xs[0].double() + 3 * xs[1].double()) / 4
    torch.testing.assert_close(got.delta.tensor.double(), want, rtol=1e-6, atol=1e-6)
    zero_sum = merge("task_arithmetic", [Dense(x) for x in xs], weights=[1.0, -1.0], normalize=True)
    torch.testing.assert_close(zero_sum.delta.tensor, xs[0] - xs[1])  # mergekit: divisor 0 -> 1


def test_task_arithmetic_transform_refuses_normalize():
    with pytest.raises(ConfigError, match="normalize: true is not a sum of per-task parts"):
        scale_task(Dense(torch.ones(2)), normalize=True)


# --- ties' mergekit parameters ----------------------------------------------------------------


def ties_reference(taus, densities, weights, normalize, rescale):
    """Local TIES in float64 with per-task density, weights, normalize and L1 rescale."""
    rows = []
    for t, d in zip(taus, densities, strict=True):
        x = t.double()
        keep = math.floor(round(d * x.numel(), 9))
        thr = torch.topk(x.abs().reshape(-1), keep).values[-1] if keep else math.inf
        kept = torch.where(x.abs() >= thr, x, 0.0)
        if rescale and kept.abs().sum() > 0:
            kept = kept * x.abs().sum() / kept.abs().sum()
        rows.append(kept)
    d = torch.stack([w * r for w, r in zip(weights, rows, strict=True)])
    sign = torch.sign(d.sum(0))
    agree = (torch.sign(d) == sign) & (d != 0)
    w = torch.tensor(weights, dtype=torch.float64).reshape(-1, 1, 1)
    num, den = (d * agree).sum(0), (w * agree).sum(0)
    return torch.where(den == 0, 0.0, num / torch.where(den == 0, 1.0, den)) if normalize else num


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("rescale", [False, True])
def test_ties_per_model_density_weights_normalize_rescale(normalize, rescale):
    taus = [randn(6, 5, seed=10 + t, scale=1 + t) for t in range(3)]
    dens, ws = [0.3, 0.5, 0.8], [1.0, 0.25, 2.0]
    got = merge(
        "ties",
        [Dense(t) for t in taus],
        trim="local",
        densities=dens,
        weights=ws,
        normalize=normalize,
        rescale=rescale,
    )
    want = ties_reference(taus, dens, ws, normalize, rescale)
    torch.testing.assert_close(got.delta.tensor.double(), want, rtol=1e-5, atol=1e-6)


def test_ties_global_fit_uses_each_models_density():
    method = METHODS.get("ties")
    params = method.resolve({"densities": [0.25, 0.5]})
    fitter = method.fitter(2, params)
    model = {
        "a": [Dense(randn(4, 4, seed=1)), Dense(randn(4, 4, seed=2))],
        "b": [Dense(randn(4, seed=3)), Dense(randn(4, seed=4))],
    }
    while True:
        for key, deltas in model.items():
            fitter.observe(key, deltas)
        if not fitter.end_pass():
            break
    assert fitter.state().summary()["keep"] == [5, 10]  # floor(0.25 * 20), floor(0.5 * 20)


def test_ties_zero_sum_merges_to_zero_but_gta_elects_plus():
    """The documented difference: an exact +a / -a tie is 0 in ties, +a in mergekit's rule."""
    pair = [Dense(torch.tensor([2.0])), Dense(torch.tensor([-2.0]))]
    assert merge("ties", pair, density=1.0).delta.tensor.item() == 0.0
    assert merge("dare_ties", pair, normalize=True).delta.tensor.item() == 2.0


# --- generalized task arithmetic: breadcrumbs, dare at density 1 -----------------------------


def test_outlier_trim_by_hand():
    x = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 1.0, 0.05, -3.0, 0.4, 0.6])
    # n=10, density 0.5 -> target 5; gamma 0.2 -> n_top 2; n_bot 3: drop 0.05, 0.1, -0.2, -5, -3
    want = torch.tensor([0.0, 0.0, 0.3, 2.0, 0.0, 1.0, 0.0, 0.0, 0.4, 0.6])
    assert torch.equal(outlier_trim(x, 0.5, 0.2), want)
    # density + gamma > 1: fewer outliers go (n_bot = 0): the 8 smallest stay
    assert int(torch.count_nonzero(outlier_trim(x, 0.8, 0.5))) == 8
    assert outlier_trim(x, 0.8, 0.5).abs().max().item() == 2.0  # -5 and -3 dropped


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_matches_float64_reference(name):
    taus = [randn(7, 6, seed=20 + t, scale=1 + t) for t in range(3)]
    ws = [1.0, -0.5, 2.0]
    got = merge(name, [Dense(t) for t in taus], density=0.5, gamma=0.1, weights=ws, normalize=True)
    keep = []
    for t in taus:  # drop the int(0.1 * 42) = 4 largest and the 42 - 21 - 4 = 17 smallest
        order = t.abs().reshape(-1).double().argsort()
        k = torch.zeros(42, dtype=torch.bool)
        k[order[17:38]] = True
        keep.append(k.reshape(7, 6))
    want = gta_reference(taus, ws, keep, name.endswith("ties"), True, 1.0)
    torch.testing.assert_close(got.delta.tensor.double(), want, rtol=1e-5, atol=1e-6)
    assert got.stats == {"kept": 63, "total": 126}


@pytest.mark.parametrize("consensus", [False, True])
def test_density_one_is_plain_generalized_task_arithmetic(consensus):
    taus = [randn(5, 5, seed=30 + t) for t in range(3)]
    ws = [0.5, 1.5, 1.0]
    name = "dare_ties" if consensus else "dare_linear"
    got = merge(name, [Dense(t) for t in taus], weights=ws, normalize=True, **{"lambda": 0.6})
    want = gta_reference(taus, ws, [torch.ones(5, 5, dtype=torch.bool)] * 3, consensus, True, 0.6)
    torch.testing.assert_close(got.delta.tensor.double(), want, rtol=1e-5, atol=1e-6)


# --- SCE ---------------------------------------------------------------------------------------


def test_sce_by_hand():
    # mean squares 2.5 and 5 -> w = 1/3, 2/3; signs elected +, -; entry 0: (1/3 + 2) / 1
    got = merge("sce", [Dense(torch.tensor([1.0, -2.0])), Dense(torch.tensor([3.0, 1.0]))])
    torch.testing.assert_close(got.delta.tensor, torch.tensor([7 / 3, -2.0]))


def test_sce_selects_the_highest_variance_entries():
    a, b = torch.tensor([1.0, 1.0, 4.0, 0.0]), torch.tensor([1.0, 3.0, -4.0, 0.5])
    got = merge("sce", [Dense(a), Dense(b)], select_topk=0.5)  # 3 nonzero variances -> k = 1
    assert torch.equal(got.delta.tensor != 0, torch.tensor([False, False, True, False]))
    assert got.stats == {"kept": 1, "total": 4}


def test_sce_small_deltas_get_uniform_weights_as_mergekit():
    a, b = torch.tensor([1e-4, 1e-4]), torch.tensor([3e-4, 3e-4])  # mean squares sum 1e-7 < 1e-6
    got = merge("sce", [Dense(a), Dense(b)]).delta.tensor
    torch.testing.assert_close(got, torch.full((2,), 2e-4))


# --- DELLA's probabilities and checks ------------------------------------------------------------


def test_della_probabilities_by_rank_per_row():
    x = torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    p = della_keep_probs(x, 0.5, 0.2)  # ranks 1..5 -> 0.3, 0.4, 0.5, 0.6, 0.7 within each row
    want = torch.tensor([[0.3, 0.7, 0.6, 0.4, 0.5], [0.7, 0.6, 0.5, 0.4, 0.3]])
    torch.testing.assert_close(p, want)
    assert torch.equal(della_keep_probs(torch.ones(4, 1), 0.4, 0.1), torch.full((4, 1), 0.4))


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_refuses_epsilon_beyond_density(name):
    deltas = [Dense(randn(3, 3, seed=1)), Dense(randn(3, 3, seed=2))]
    with pytest.raises(ConfigError) as err:
        merge(name, deltas, densities=[0.5, 0.1], epsilon=0.15)
    assert str(err.value) == (
        f"{name}: density - epsilon and density + epsilon must lie in (0, 1), got density 0.1 "
        "and epsilon 0.15 for model 1; choose epsilon below 0.1"
    )


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("dare_ties", {"density": 1.5}, "dare_ties: density must be in [0, 1], got 1.5"),
        ("della", {"epsilon": 0.5}, "della: epsilon must be in [0, 0.5), got 0.5"),
        ("dare_linear", {"seed": -1}, "dare_linear: seed must be an integer in [0, 2**63), got -1"),
        (
            "breadcrumbs",
            {"gammas": [0.1, 2]},
            "breadcrumbs: gammas must hold numbers in [0, 1] (entry 1 is not)",
        ),
        ("sce", {"select_topk": -0.1}, "sce: select_topk must be in [0, 1], got -0.1"),
        ("linear", {"weights": "x"}, "linear: weights must be a list of numbers, one per model"),
        ("ties", {"densities": [0.5, 1.2]}, "ties: densities must hold numbers in [0, 1] (entry 1"),
    ],
)
def test_bad_parameters_refused_at_resolve(name, params, message):
    with pytest.raises(ConfigError) as err:
        METHODS.get(name).resolve(params)
    assert str(err.value).startswith(message), str(err.value)


# --- randomness: reproducibility (statistics: tests/golden/test_mergekit_sparse.py) ---------


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_same_seed_same_merge_other_seed_other_merge(name):
    deltas = [Dense(randn(16, 16, seed=40 + t)) for t in range(3)]
    a = merge(name, deltas, density=0.5, seed=7)
    b = merge(name, [Dense(d.tensor.clone()) for d in deltas], density=0.5, seed=7)
    c = merge(name, deltas, density=0.5, seed=8)
    assert torch.equal(a.delta.tensor, b.delta.tensor)
    assert not torch.equal(a.delta.tensor, c.delta.tensor)
    assert a.stats["seed"] == 7 and c.stats["seed"] == 8
    reordered = merge(name, deltas[::-1], density=0.5, seed=7)
    torch.testing.assert_close(reordered.delta.tensor, a.delta.tensor)


def test_draws_depend_on_the_delta_not_its_position():
    x = randn(3, 4, seed=5)
    assert torch.equal(task_uniform(Dense(x), 0), task_uniform(Dense(x.clone()), 0))
    assert not torch.equal(task_uniform(Dense(x), 0), task_uniform(Dense(x + 1), 0))
    low = LowRank(torch.ones(3, 1), torch.ones(1, 4), 0.5)
    same = LowRank(torch.ones(3, 1), torch.ones(1, 4), 0.5)
    assert torch.equal(task_uniform(low, 3), task_uniform(same, 3))
    assert not torch.equal(task_uniform(low, 3), task_uniform(LowRank(low.b, low.a, 0.25), 3))
