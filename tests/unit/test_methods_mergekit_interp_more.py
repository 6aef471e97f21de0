"""mergekit's model_stock, nearswap, arcee_fusion and ram (the spherical methods: see
``test_methods_mergekit_interp.py``).

Each method is checked against a float64 reference written here from the published rule (mergekit
0.1.5's code read as maths), hand-worked examples and properties; ``tests/golden/
test_mergekit_interp.py`` compares with mergekit's own outputs.
"""

from __future__ import annotations

import pytest
import torch

from starmerge.api import merge_deltas
from starmerge.errors import ConfigError
from starmerge.methods import METHODS
from starmerge.tensors.delta import Dense, LowRank

F64 = torch.float64


def run(name, taus, base=None, **params):
    """The kernel through ``merge_deltas`` on one parameter ``x``; the merged delta."""
    tasks = [{"x": d if isinstance(d, (Dense, LowRank)) else Dense(d)} for d in taus]
    out = merge_deltas(name, tasks, params, base=None if base is None else {"x": base})
    return out.deltas["x"]


def rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def lowrank(seed, shape=(6, 5), rank=2, scale=0.5):
    b, a = rand(shape[0], rank, seed=seed), rand(rank, shape[1], seed=seed + 50)
    return LowRank(b, a, scale)


# ---------------------------------------------------------------- model_stock


def ref_model_stock(taus, rows):
    x = torch.stack([t.double() for t in taus])  # (T, m, n)
    x = x if rows else x.reshape(len(taus), 1, -1)
    n = len(taus)
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            den = (x[i].norm(dim=-1) * x[j].norm(dim=-1)).clamp(min=1e-6)
            cos.append(((x[i] * x[j]).sum(-1) / den).clamp(-1, 1))
    c = torch.stack(cos).mean(0)
    ratio = n * c / (1 + (n - 1) * c)
    return (ratio[:, None] * x.mean(0)).reshape(taus[0].shape)


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("lowrank_in", [False, True])
def test_model_stock_matches_reference(filter_wise, lowrank_in):
    xs = [lowrank(40), lowrank(41), lowrank(42, rank=1)]
    want = ref_model_stock([x.to_dense(F64) for x in xs], filter_wise)
    inputs = xs if lowrank_in else [Dense(x.to_dense()) for x in xs]
    got = run("model_stock", inputs, filter_wise=filter_wise)
    assert isinstance(got, LowRank) == lowrank_in
    torch.testing.assert_close(got.to_dense(F64), want, rtol=1e-5, atol=1e-6)


def test_model_stock_hand_worked_and_refusal():
    e1, e2 = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])  # orthogonal: ratio 0
    assert torch.equal(run("model_stock", [e1, e2]).tensor, torch.zeros(2))
    same = run("model_stock", [e1, e1.clone()])  # parallel: ratio 2 * 1 / 2 = 1, the mean
    torch.testing.assert_close(same.tensor, e1)
    assert torch.equal(run("model_stock", [e1, -e1]).tensor, torch.zeros(2))  # 1 + cos = 0
    with pytest.raises(ConfigError, match=r"model_stock takes at least 2 models.*got 1"):
        run("model_stock", [e1])


# ---------------------------------------------------------------- nearswap, ram, arcee_fusion


def test_nearswap_takes_near_entries_whole_and_caps_far_ones():
    tau = torch.tensor([0.0, 1e-7, 0.05, -0.3, 2.0])
    got = run("nearswap", [tau], t=0.1).tensor
    weight = (0.1 / tau.double().abs().clamp(min=1e-6)).clamp(0, 1)
    torch.testing.assert_close(got.double(), weight * tau.double())
    torch.testing.assert_close(got, torch.tensor([0.0, 1e-7, 0.05, -0.1, 0.1]))
    with pytest.raises(ConfigError, match=r"nearswap takes exactly 1 model.*got 2"):
        run("nearswap", [tau, tau])


def test_ram_averages_each_entry_over_the_tasks_that_changed_it():
    a = torch.tensor([2.0, 0.0, 1.0, 1e-6, 0.0])
    b = torch.tensor([4.0, 3.0, 0.0, 5.0, 0.0])
    torch.testing.assert_close(run("ram", [a, b]).tensor, torch.tensor([3.0, 3.0, 1.0, 5.0, 0.0]))
    torch.testing.assert_close(run("ram", [b, a]).tensor, run("ram", [a, b]).tensor)
    # a larger epsilon: 1.0 and 2.0 do not count as changes any more
    torch.testing.assert_close(
        run("ram", [a, b], epsilon=2.5).tensor, torch.tensor([4.0, 3.0, 0.0, 5.0, 0.0])
    )


def ref_arcee_fusion(tau, base):
    tau, base = tau.double(), base.double()
    p = torch.softmax(base + tau, -1) + 1e-8
    q = torch.softmax(base, -1) + 1e-8
    score = tau.abs() * (p * (p / q).log()).sum(-1, keepdim=True)
    s = score.reshape(-1).sort().values
    n = s.numel()
    q1, med, q3 = (s[int(f * (n - 1))] for f in (0.25, 0.5, 0.75))
    return tau * (score >= med + 1.5 * (q3 - q1))


@pytest.mark.parametrize("shape", [(9, 7), (11,)])
def test_arcee_fusion_matches_reference(shape):
    base, tau = rand(*shape, seed=50), rand(*shape, seed=51, scale=0.5)
    got = run("arcee_fusion", [tau], base)
    torch.testing.assert_close(
        got.tensor.double(), ref_arcee_fusion(tau, base), rtol=1e-6, atol=1e-7
    )
    kept = int((got.tensor != 0).sum())
    assert 0 < kept < tau.numel()  # an outlier threshold keeps some, not all


def test_arcee_fusion_zero_delta_and_refusal():
    base = rand(4, 4, seed=52)
    assert torch.equal(run("arcee_fusion", [torch.zeros(4, 4)], base).tensor, torch.zeros(4, 4))
    with pytest.raises(ConfigError, match=r"arcee_fusion takes exactly 1 model.*got 2"):
        run("arcee_fusion", [base, base], base)


def test_methods_without_base_need_no_base_model():
    for name in ("nuslerp", "multislerp", "model_stock", "nearswap", "ram"):
        assert not METHODS.get(name).needs_base, name
    for name in ("slerp", "karcher", "arcee_fusion"):
        assert METHODS.get(name).needs_base, name


@pytest.mark.parametrize("name", ["nuslerp", "multislerp", "model_stock"])
def test_flat_spherical_methods_give_their_full_result_in_core_space(name):
    # the core bases are orthonormal: inner products, hence the coefficients, are unchanged
    xs = [lowrank(60), lowrank(61, rank=3), lowrank(62, rank=1)][: 2 if name == "nuslerp" else 3]
    tasks = [{"x": x} for x in xs]
    full = merge_deltas(name, tasks).deltas["x"].to_dense(F64)
    core = merge_deltas(name, tasks, space="core").deltas["x"].to_dense(F64)
    torch.testing.assert_close(core, full, rtol=1e-5, atol=1e-6)
