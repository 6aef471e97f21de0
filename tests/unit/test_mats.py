"""MaTS conjugate gradient against closed forms, the average, and the null space of the system."""

import pytest
import torch
from safetensors.torch import save_file

from starmerge.api import merge_deltas
from starmerge.errors import ConfigError
from starmerge.methods.fisher_regmean import fisher_merging, regmean
from starmerge.methods.mats import mats
from starmerge.tensors.delta import Dense

KEY = "model.layers.0.mlp.up_proj.weight"
BIAS = "model.layers.0.mlp.up_proj.bias"
MODULE = "model.layers.0.mlp.up_proj"
OUT, IN = 5, 4


def _taus(n_tasks=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(OUT, IN, generator=gen, dtype=torch.float64) for _ in range(n_tasks)]


def _gram(rows, dim, seed):
    x = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.T @ x / rows


def _dense(ts):
    return [Dense(t) for t in ts]


def test_diagonal_fisher_cg_matches_closed_form():
    taus = _taus()
    gen = torch.Generator().manual_seed(1)
    fishers = [torch.rand(OUT, IN, generator=gen, dtype=torch.float64) + 0.1 for _ in taus]
    cg = mats(
        _dense(taus),
        objective="diagonal_fisher",
        precision="float64",
        iterations=200,
        tolerance=1e-13,
        state={"fisher": fishers},
    )
    closed = fisher_merging(_dense(taus), floor=0.0, normalize=False, state={"fisher": fishers})
    # the closed form computes in float32
    torch.testing.assert_close(cg.delta.tensor, closed.delta.tensor, rtol=1e-5, atol=1e-6)
    assert cg.stats["solved"] and cg.stats["residual"] <= 1e-13


def test_regmean_cg_matches_closed_form_through_statistics_files(tmp_path):
    taus = _taus()
    files = []
    for i in range(3):  # one statistics file per task, as `data:` would produce
        path = tmp_path / f"task{i}.safetensors"
        save_file({f"{MODULE}::gram_in": _gram(12, IN, seed=10 + i).float()}, path)
        files.append(str(path))
    task_deltas = [{KEY: Dense(t.float()), BIAS: Dense(t[:, 0].float())} for t in taus]
    params = {"statistics": files, "shrinkage": 0.9}
    cg = merge_deltas("mats", task_deltas, {**params, "precision": "float64", "tolerance": 1e-12})
    closed = merge_deltas("regmean", task_deltas, params)
    torch.testing.assert_close(
        cg.deltas[KEY].tensor, closed.deltas[KEY].tensor, rtol=1e-5, atol=1e-6
    )
    # the bias has no statistics: averaged by both
    mean_bias = sum(t[:, 0] for t in taus).float() / 3
    torch.testing.assert_close(cg.deltas[BIAS].tensor, mean_bias)
    torch.testing.assert_close(closed.deltas[BIAS].tensor, mean_bias)
    assert cg.stats["per_parameter"][BIAS] == {
        "solved": False,
        "reason": "no statistics for regmean",
    }


def test_kfac_cg_matches_dense_kronecker_solve():
    taus = _taus(2)
    a = [_gram(10, IN, seed=20 + i) for i in range(2)]
    g = [_gram(10, OUT, seed=30 + i) for i in range(2)]
    cg = mats(
        _dense(taus),
        objective="kfac",
        precision="float64",
        iterations=200,
        tolerance=1e-13,
        state={"gram_in": a, "gram_out": g},
    )
    # vec(G X A) = (A kron G) vec(X) for column-major vec; A, G symmetric
    system = sum(torch.kron(ai, gi) for ai, gi in zip(a, g, strict=True))
    rhs = sum(torch.kron(ai, gi) @ t.T.reshape(-1) for ai, gi, t in zip(a, g, taus, strict=True))
    expected = torch.linalg.solve(system, rhs).reshape(IN, OUT).T
    torch.testing.assert_close(cg.delta.tensor, expected, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("init_scaling", [0.0, 0.3, 5.0])
def test_average_objective_returns_the_average(init_scaling):
    taus = [t.float() for t in _taus()]
    out = mats(_dense(taus), objective="average", init_scaling=init_scaling)
    torch.testing.assert_close(out.delta.tensor, sum(taus) / 3)
    assert out.delta.tensor.dtype == torch.float32


def test_null_space_component_of_the_init_survives():
    taus = _taus()
    # rank-2 Grams sharing a 2-dim column space: sum_i G_i has a 2-dim null space in R^4
    basis = torch.linalg.qr(
        torch.randn(IN, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    )[0]
    grams = [
        basis @ torch.diag(torch.tensor([1.0 + i, 2.0], dtype=torch.float64)) @ basis.T
        for i in range(3)
    ]
    init = 0.3 * sum(taus)
    out = mats(
        _dense(taus),
        objective="regmean",
        precision="float64",
        iterations=50,
        tolerance=0.0,
        state={"gram_in": grams},
    ).delta.tensor
    null = torch.eye(IN, dtype=torch.float64) - basis @ basis.T  # projector onto the null space
    torch.testing.assert_close(out @ null, init @ null, rtol=0, atol=1e-12)
    # and the range part solves the system
    closed = regmean(_dense(taus), shrinkage=1.0, state={"gram_in": grams}).delta.tensor
    torch.testing.assert_close(out @ basis, closed @ basis, rtol=1e-9, atol=1e-10)


def test_zero_fisher_entries_keep_the_init_exactly():
    taus = [t.float() for t in _taus()]
    fishers = [torch.rand(OUT, IN) for _ in taus]
    for f in fishers:
        f[0] = 0.0  # no task says anything about row 0
    out = mats(
        _dense(taus), objective="diagonal_fisher", init_scaling=0.3, state={"fisher": fishers}
    ).delta.tensor
    assert torch.equal(out[0], 0.3 * sum(taus)[0])


def test_data_objective_without_statistics_says_how_to_fix():
    with pytest.raises(ConfigError, match=r"mats: objective 'kfac' needs statistics.*`data:`"):
        merge_deltas("mats", [{KEY: Dense(torch.ones(OUT, IN))}] * 2, {"objective": "kfac"})
