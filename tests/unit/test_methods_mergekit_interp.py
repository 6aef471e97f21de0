"""mergekit's spherical methods: slerp, nuslerp, multislerp, karcher (and two CLI merges).

Each method is checked against a float64 reference written here from the published rule (mergekit
0.1.5's code read as maths, on weights = base + task delta), hand-worked examples and properties;
``tests/golden/test_mergekit_interp.py`` compares with mergekit's own outputs, and
``test_methods_mergekit_interp_more.py`` covers model_stock, nearswap, arcee_fusion and ram.
"""

from __future__ import annotations

import math

import pytest
import torch
from tests.integration.helpers import load_state, peft_dense_deltas, run_cli, write_config

from starmerge.api import merge_deltas
from starmerge.errors import ConfigError
from starmerge.methods import METHODS
from starmerge.tensors.delta import Dense, LowRank

F64 = torch.float64


def run(name, taus, base=None, **params):
    """The kernel through ``merge_deltas`` on one parameter ``x``; the merged delta (float64)."""
    tasks = [{"x": d if isinstance(d, (Dense, LowRank)) else Dense(d)} for d in taus]
    weights = params.pop("weights", None)
    bases = None if base is None else {"x": base}
    out = merge_deltas(name, tasks, params, weights=weights, base=bases)
    return out.deltas["x"]


def rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def ref_slerp(t, v0, v1):
    """SLERP of two weights (float64); mergekit's near-parallel lerp above |cos| = 0.9995."""
    a, b = v0.double().reshape(-1), v1.double().reshape(-1)
    na = a.norm() if a.norm() > 1e-8 else 1.0
    nb = b.norm() if b.norm() > 1e-8 else 1.0
    dot = float(torch.clamp(a @ b / (na * nb), -1, 1))
    if abs(dot) > 0.9995:
        return ((1 - t) * v0.double() + t * v1.double()), True
    th = math.acos(dot)
    out = (math.sin((1 - t) * th) * v0.double() + math.sin(t * th) * v1.double()) / math.sin(th)
    return out, False


def lowrank(seed, shape=(6, 5), rank=2, scale=0.5):
    b, a = rand(shape[0], rank, seed=seed), rand(rank, shape[1], seed=seed + 50)
    return LowRank(b, a, scale)


# ---------------------------------------------------------------- slerp


@pytest.mark.parametrize("size", [0.7, 0.005])  # spherical branch, near-parallel lerp branch
def test_slerp_one_model_interpolates_base_to_model(size):
    base, tau = rand(6, 5, seed=1), rand(6, 5, seed=2, scale=size)
    want, linear = ref_slerp(0.3, base, base + tau)
    got = run("slerp", [tau], base, t=0.3)
    assert linear == (size < 0.1)
    torch.testing.assert_close(got.to_dense(F64), want - base.double(), rtol=1e-5, atol=1e-6)


def test_slerp_two_models_interpolates_model_one_to_model_two():
    base = rand(8, seed=3)
    t1, t2 = rand(8, seed=4, scale=0.8), rand(8, seed=5, scale=0.8)
    want, linear = ref_slerp(0.65, base + t1, base + t2)
    got = run("slerp", [t1, t2], base, t=0.65)
    assert not linear
    torch.testing.assert_close(got.to_dense(F64), want - base.double(), rtol=1e-5, atol=1e-6)


def test_slerp_endpoints_and_zero_delta():
    base, t1, t2 = rand(4, 3, seed=6), rand(4, 3, seed=7), rand(4, 3, seed=8)
    torch.testing.assert_close(run("slerp", [t1, t2], base, t=0.0).tensor, t1, atol=1e-5, rtol=0)
    torch.testing.assert_close(run("slerp", [t1, t2], base, t=1.0).tensor, t2, atol=1e-5, rtol=0)
    assert torch.equal(run("slerp", [t1], base, t=0.0).tensor, torch.zeros(4, 3))
    assert torch.equal(run("slerp", [torch.zeros(4, 3)], base, t=0.4).tensor, torch.zeros(4, 3))


def test_slerp_hand_worked_quarter_circle():
    # base (1, 0), model (0, 1): t = 0.5 lands on (cos 45deg, sin 45deg)
    got = run("slerp", [torch.tensor([-1.0, 1.0])], torch.tensor([1.0, 0.0]), t=0.5).tensor
    h = math.sqrt(0.5)
    torch.testing.assert_close(got, torch.tensor([h - 1.0, h]))


def test_slerp_refuses_other_counts_and_t_out_of_range():
    base, tau = rand(3, seed=9), rand(3, seed=10)
    with pytest.raises(ConfigError, match=r"slerp takes 1 or 2 models.*got 3"):
        run("slerp", [tau, tau, tau], base)
    with pytest.raises(ConfigError, match=r"slerp: t must be in \[0, 1\], got 1.5"):
        METHODS.get("slerp").resolve({"t": 1.5})
    with pytest.raises(ConfigError, match="slerp needs the base model's weights"):
        run("slerp", [tau])


# ---------------------------------------------------------------- nuslerp


def ref_nuslerp(t, x, y, vectors):
    """NuSLERP per vector (rows of ``vectors(x)``), float64."""
    a, b = vectors(x.double()), vectors(y.double())
    out = torch.empty_like(a)
    for i in range(a.shape[0]):
        u, v = a[i], b[i]
        cos = float(
            torch.clamp(u @ v / (u.norm().clamp(min=1e-7) * v.norm().clamp(min=1e-7)), -1, 1)
        )
        if 1 - cos * cos <= 1e-16:
            out[i] = (1 - t) * u + t * v
        else:
            th = math.acos(cos)
            out[i] = (math.sin((1 - t) * th) * u + math.sin(t * th) * v) / math.sin(th)
    return out


VECTORS = {  # (flatten, row_wise) -> vectors as rows, and back
    (True, False): (lambda m: m.reshape(1, -1), lambda v, s: v.reshape(s)),
    (False, False): (lambda m: m, lambda v, s: v),
    (False, True): (lambda m: m.T, lambda v, s: v.T),
}


@pytest.mark.parametrize("flatten,row_wise", list(VECTORS))
@pytest.mark.parametrize("lowrank_in", [False, True])
def test_nuslerp_matches_reference_dense_and_lowrank(flatten, row_wise, lowrank_in):
    x, y = lowrank(11), lowrank(12, rank=3)
    to_rows, back = VECTORS[(flatten, row_wise)]
    want = back(ref_nuslerp(2 / 3, x.to_dense(F64), y.to_dense(F64), to_rows), (6, 5))
    inputs = [x, y] if lowrank_in else [Dense(x.to_dense()), Dense(y.to_dense())]
    got = run(
        "nuslerp", inputs, weights=[1.0, 2.0], nuslerp_flatten=flatten, nuslerp_row_wise=row_wise
    )
    assert isinstance(got, LowRank) == lowrank_in  # exactly low rank: rank 2 + 3
    torch.testing.assert_close(got.to_dense(F64), want, rtol=1e-5, atol=1e-6)


def test_nuslerp_weights_pick_t_and_zero_sum_means_half():
    x, y = rand(5, seed=13), rand(5, seed=14)
    half = run("nuslerp", [x, y]).tensor
    torch.testing.assert_close(run("nuslerp", [x, y], weights=[3.0, -3.0]).tensor, half)
    torch.testing.assert_close(
        run("nuslerp", [x, y], weights=[2.0, 0.0]).tensor, x, atol=1e-6, rtol=0
    )
    # antiparallel task vectors take the colinear (linear) branch: finite
    assert torch.isfinite(run("nuslerp", [x, -x], weights=[1.0, 3.0]).tensor).all()


def test_nuslerp_refuses_one_or_three_models():
    x = rand(4, seed=15)
    for taus in ([x], [x, x, x]):
        with pytest.raises(ConfigError, match=rf"nuslerp takes exactly 2 models.*got {len(taus)}"):
            run("nuslerp", taus)


# ---------------------------------------------------------------- multislerp


def ref_multislerp(taus, w, eps=1e-8):
    """Multi-SLERP on task vectors (float64), the blog's tangent-space barycentre."""
    x = torch.stack([t.double().reshape(-1) for t in taus])
    norms = x.norm(dim=1, keepdim=True)
    u = x / (norms + eps)
    m = (u * w[:, None]).sum(0)
    if m.norm() < eps:
        return (x * w[:, None]).sum(0)
    m = m / m.norm()
    tangent = ((u - (u @ m)[:, None] * m) * w[:, None]).sum(0)
    tn = tangent.norm() + eps
    return (m * torch.cos(tn) + tangent * torch.sin(tn) / tn) * (norms[:, 0] * w).sum()


@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_matches_reference(normalize):
    taus = [rand(4, 6, seed=s) for s in (16, 17, 18)]
    w = torch.tensor([1.0, 2.0, 0.5], dtype=F64)
    want = ref_multislerp(taus, w / w.sum() if normalize else w).reshape(4, 6)
    got = run("multislerp", taus, weights=w.tolist(), normalize_weights=normalize)
    torch.testing.assert_close(got.to_dense(F64), want, rtol=1e-5, atol=1e-6)


def test_multislerp_lowrank_stays_lowrank_and_equals_dense():
    xs = [lowrank(20), lowrank(21, rank=1), lowrank(22, rank=3)]
    got = run("multislerp", xs)
    dense = run("multislerp", [Dense(x.to_dense()) for x in xs])
    assert isinstance(got, LowRank) and got.rank == 6
    torch.testing.assert_close(got.to_dense(), dense.tensor, rtol=1e-5, atol=1e-6)


def test_multislerp_hand_worked_and_degenerate_cases():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    h = math.sqrt(0.5)
    torch.testing.assert_close(run("multislerp", [e1, e2]).tensor, torch.tensor([h, h]))
    one = rand(3, seed=23)
    assert torch.equal(run("multislerp", [one]).tensor, one)  # one model: unchanged
    zeros = [torch.zeros(3)] * 3  # mergekit raises here; we return the (zero) weighted sum
    assert torch.equal(run("multislerp", zeros).tensor, torch.zeros(3))
    got = run("multislerp", [one, -one, 2 * one], weights=[1.0, 1.0, 0.0])  # balanced antipodes
    torch.testing.assert_close(got.tensor, 0.5 * one - 0.5 * one, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="multislerp: weights must not sum to 0"):
        METHODS.get("multislerp").resolve({"weights": [1.0, -1.0]})


# ---------------------------------------------------------------- karcher


def tangent_residual(mean, points):
    """|sum_t log_m(u_t)| / T at a unit vector ``mean``: 0 at the Karcher mean."""
    total = torch.zeros_like(mean)
    for p in points:
        u = p / p.norm()
        c = float(torch.clamp(mean @ u, -1, 1))
        th = math.acos(c)
        if th > 1e-12:
            total += th / math.sin(th) * (u - c * mean)
    return float(total.norm()) / len(points)


def test_karcher_is_the_spherical_mean_with_the_mean_norm():
    base = rand(10, seed=30)
    taus = [rand(10, seed=s, scale=0.9) for s in (31, 32, 33)]
    got = run("karcher", taus, base, max_iter=200, tol=1e-9).to_dense(F64)
    merged = base.double() + got
    points = [base.double() + t.double() for t in taus]
    mean_norm = sum(float(p.norm()) for p in points) / 3
    assert float(merged.norm()) == pytest.approx(mean_norm, rel=1e-6)
    assert tangent_residual(merged / merged.norm(), points) < 1e-5


def test_karcher_two_points_is_the_midpoint_and_equal_models_pass_through():
    got = run("karcher", [torch.tensor([-1.0, 1.0]), torch.zeros(2)], torch.tensor([1.0, 0.0]))
    h = math.sqrt(0.5)
    torch.testing.assert_close(got.tensor, torch.tensor([h - 1.0, h]))
    base, tau = rand(3, 4, seed=34), rand(3, 4, seed=35)
    assert torch.equal(run("karcher", [tau, tau.clone()], base).tensor, tau)
    assert torch.equal(run("karcher", [tau], base).tensor, tau)


def test_karcher_degenerate_points_stay_finite():
    base = torch.tensor([1.0, 0.0, 0.0])
    antipodal = [torch.tensor([0.0, 0.0, 0.0]), torch.tensor([-2.0, 0.0, 0.0])]
    assert torch.isfinite(run("karcher", antipodal, base, tol=1e-9).tensor).all()
    zero_weights = [-base, -base + 1e-9]  # every point has norm <= tol: mergekit returns 0
    torch.testing.assert_close(run("karcher", zero_weights, base).tensor, -base)


# ---------------------------------------------------------------- through `starmerge merge`


def test_cli_slerp_of_an_adapter_into_its_base(tmp_path, capsys, tiny_models, llama_adapters):
    base_dir, adapter = tiny_models["llama"], llama_adapters[0]
    cfg = write_config(
        tmp_path / "c.yaml",
        method="slerp",
        parameters={"t": 0.3},
        base_model=str(base_dir),
        models=[{"adapter": str(adapter)}],
        output={"format": "model", "dtype": "float32"},
    )
    code, _, err = run_cli(capsys, "merge", cfg, tmp_path / "out", "--quiet")
    assert code == 0, err
    taus, base = peft_dense_deltas(base_dir, adapter), load_state(base_dir)
    merged = load_state(tmp_path / "out")
    assert taus
    for key, got in merged.items():
        want = base[key].double()
        if key in taus:
            want = ref_slerp(0.3, want, want + taus[key])[0]
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=key)


def test_cli_nuslerp_of_two_adapters_is_an_exact_adapter(
    tmp_path, capsys, tiny_models, llama_adapters
):
    base_dir, adapters = tiny_models["llama"], llama_adapters[:2]
    cfg = write_config(  # no base_model: nuslerp only needs the task vectors
        tmp_path / "c.yaml",
        method="nuslerp",
        models=[
            {"adapter": str(adapters[0]), "weight": 1.0},
            {"adapter": str(adapters[1]), "weight": 3.0},
        ],
        output={"format": "adapter"},
    )
    code, _, err = run_cli(capsys, "merge", cfg, tmp_path / "out", "--quiet")
    assert code == 0, err
    x, y = (peft_dense_deltas(base_dir, a) for a in adapters)
    got = peft_dense_deltas(base_dir, tmp_path / "out")
    assert set(got) == set(x) == set(y)
    flat = VECTORS[(True, False)]
    for key in got:
        want = flat[1](ref_nuslerp(0.75, x[key], y[key], flat[0]), x[key].shape)
        torch.testing.assert_close(got[key], want, rtol=1e-4, atol=1e-6, msg=key)
