"""TIES against an independent float64 implementation, with global (fitted) and local trimming."""

import math

import pytest
import torch

from starmerge.errors import ConfigError
from starmerge.methods import METHODS
from starmerge.methods.ties import TiesFitter, ties
from starmerge.tensors.delta import Dense


def drive(model, **params):
    """Run ``ties`` the way the pipeline does: fit passes over every key, then merge each key."""
    method = METHODS.get("ties")
    resolved = method.resolve(params)
    n_tasks = len(next(iter(model.values())))
    fitter = method.fit(n_tasks, **resolved)
    passes = 0
    while True:
        passes += 1
        for key, deltas in model.items():
            fitter.observe(key, deltas)
        if not fitter.end_pass():
            break
    state = fitter.state()
    out = {}
    for key, deltas in model.items():
        filled = [Dense(torch.zeros(_shape(deltas))) if d is None else d for d in deltas]
        out[key] = method.fn(filled, state=state.at(key), **resolved)
    return out, state, passes


def _shape(deltas):
    return next(d.shape for d in deltas if d is not None)


def ref_ties(model, density, trim, scaling=1.0):
    """Plain float64 TIES: topk over the concatenation (global) or per key (local)."""
    keys = list(model)
    n_tasks = len(model[keys[0]])
    thr = {}
    for t in range(n_tasks):
        present = [k for k in keys if model[k][t] is not None]
        groups = [present] if trim == "global" else [[k] for k in present]
        for group in groups:
            flat = torch.cat([model[k][t].tensor.double().abs().reshape(-1) for k in group])
            keep = math.floor(round(density * flat.numel(), 9))
            value = torch.topk(flat, keep).values[-1].item() if keep > 0 else math.inf
            thr.update({(t, k): value for k in group})
    out = {}
    for k in keys:
        rows = []
        for t in range(n_tasks):
            d = model[k][t]
            x = (
                torch.zeros(_shape(model[k]), dtype=torch.float64)
                if d is None
                else d.tensor.double()
            )
            rows.append(torch.where(x.abs() >= thr.get((t, k), math.inf), x, 0.0))
        stack = torch.stack(rows)
        sign = torch.sign(stack.sum(0))
        agree = (torch.sign(stack) == sign) & (stack != 0)
        num = (stack * agree).sum(0)
        den = agree.sum(0)
        out[k] = torch.where(den > 0, num / den.clamp(min=1), 0.0) * scaling
    return out


def random_model(seed, n_tasks=3):
    g = torch.Generator().manual_seed(seed)
    shapes = {"w1": (8, 4), "w2": (4, 6), "bias": (6,)}
    return {
        k: [Dense(torch.randn(s, generator=g) * (1 + t)) for t in range(n_tasks)]
        for k, s in shapes.items()
    }


@pytest.mark.parametrize("trim", ["global", "local"])
@pytest.mark.parametrize("density", [0.1, 0.2, 0.5, 1.0])
def test_matches_float64_reference(trim, density):
    model = random_model(0)
    got, _, _ = drive(model, density=density, trim=trim, scaling=1.5)
    want = ref_ties(model, density, trim, scaling=1.5)
    for k in model:
        torch.testing.assert_close(got[k].delta.tensor.double(), want[k], rtol=1e-6, atol=1e-7)


def test_global_fit_takes_two_passes_and_reports_exact_counts():
    model = random_model(1)
    _, state, passes = drive(model, density=0.2)
    assert passes == 2
    summary = state.summary()
    assert summary["total"] == [32 + 24 + 6] * 3
    assert summary["keep"] == [12] * 3  # floor(0.2 * 62)
    for t in range(3):
        flat = torch.cat([model[k][t].tensor.abs().reshape(-1) for k in model])
        assert summary["thresholds"][t] == torch.topk(flat, 12).values[-1].item()


def test_ties_at_the_threshold_are_kept():
    x = Dense(torch.tensor([[4.0, -4.0], [4.0, 1.0]]))
    merged = ties([x], density=0.25)  # keep 1, but the 3 entries tied at |4| stay
    assert torch.equal(merged.delta.tensor, torch.tensor([[4.0, -4.0], [4.0, 0.0]]))
    assert merged.stats == {"kept": 3, "total": 4}


@pytest.mark.parametrize("trim", ["global", "local"])
def test_keep_zero_keeps_nothing(trim):
    model = {"w": [Dense(torch.randn(2, 2)), Dense(torch.randn(2, 2))]}
    got, state, _ = drive(model, density=0.1, trim=trim)  # floor(0.4) = 0
    assert torch.equal(got["w"].delta.tensor, torch.zeros(2, 2))
    assert got["w"].stats["kept"] == 0


def test_global_and_local_differ_as_expected():
    big = torch.tensor([10.0, 9.0, 8.0, 7.0])
    small = torch.tensor([1.0, 2.0, 3.0, 4.0])
    model = {"big": [Dense(big)], "small": [Dense(small)]}
    glob, _, _ = drive(model, density=0.5, trim="global")  # keep 4 of 8: all of "big"
    loc, _, _ = drive(model, density=0.5, trim="local")  # keep 2 of 4 in each
    assert torch.equal(glob["big"].delta.tensor, big)
    assert torch.equal(glob["small"].delta.tensor, torch.zeros(4))
    assert torch.equal(loc["big"].delta.tensor, torch.tensor([10.0, 9.0, 0.0, 0.0]))
    assert torch.equal(loc["small"].delta.tensor, torch.tensor([0.0, 0.0, 3.0, 4.0]))


def test_missing_task_is_not_counted_in_n():
    model = random_model(2)
    model["w2"][1] = None  # task 1 lacks w2: its N is 32 + 6
    got, state, _ = drive(model, density=0.3)
    assert state.summary()["total"] == [62, 38, 62]
    assert state.summary()["keep"] == [18, 11, 18]
    want = ref_ties(model, 0.3, "global")
    for k in model:
        torch.testing.assert_close(got[k].delta.tensor.double(), want[k], rtol=1e-6, atol=1e-7)


def test_one_task_density_one_returns_it_scaled():
    x = torch.randn(5, 3)
    assert torch.equal(ties([Dense(x)], density=1.0).delta.tensor, x)
    torch.testing.assert_close(ties([Dense(x)], density=1.0, scaling=0.5).delta.tensor, 0.5 * x)


def test_sign_election_and_disjoint_mean_by_hand():
    a = Dense(torch.tensor([3.0, -1.0, 2.0, 0.0]))
    b = Dense(torch.tensor([-1.0, -3.0, -2.0, 0.0]))
    c = Dense(torch.tensor([1.0, 2.0, 5.0, 0.0]))
    got = ties([a, b, c], density=1.0).delta.tensor
    # sums 3, -2, 5, 0 -> signs +, -, +, 0; means of agreeing: (3+1)/2, (-1-3)/2, (2+5)/2, 0
    assert torch.equal(got, torch.tensor([2.0, -2.0, 3.5, 0.0]))


def test_standalone_local_needs_no_state_and_order_is_irrelevant():
    model = random_model(4)
    deltas = model["w1"]
    fwd = ties(deltas, density=0.3, trim="local").delta.tensor
    rev = ties(deltas[::-1], density=0.3, trim="local").delta.tensor
    torch.testing.assert_close(fwd, rev)
    torch.testing.assert_close(fwd.double(), ref_ties({"w1": deltas}, 0.3, "local")["w1"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_is_kept(dtype):
    deltas = [Dense(torch.randn(4, 4).to(dtype)) for _ in range(2)]
    assert ties(deltas).delta.tensor.dtype == dtype


def test_fitter_ignores_passes_for_local():
    fitter = TiesFitter(2, density=0.2, trim="local")
    fitter.observe("w", [Dense(torch.ones(2)), None])
    assert fitter.end_pass() is False
    assert fitter.state().summary() == {"trim": "local"}


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"density": 0}, "ties: density must be in (0, 1], got 0"),
        ({"density": 1.5}, "ties: density must be in (0, 1], got 1.5"),
        (
            {"trim": "globl"},
            "ties: trim must be one of global, local, got 'globl'. Did you mean: global?",
        ),
    ],
)
def test_bad_params_are_config_errors(params, message):
    with pytest.raises(ConfigError) as err:
        METHODS.get("ties").resolve(params)
    assert str(err.value) == message
