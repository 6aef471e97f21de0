"""Merge spaces (core, knots): the maths against float64 references, and methods run in them.

References are written here independently of the library: dense ``s_t B_t A_t`` in float64,
``torch.linalg.svd`` of the stacked factors / stacked deltas, TIES by hand on the cores.
"""

from __future__ import annotations

import math

import pytest
import torch

from starmerge.api import merge_deltas
from starmerge.errors import ConfigError, InputError
from starmerge.methods import METHODS, Merged
from starmerge.tensors.delta import Dense, LowRank
from starmerge.tensors.spaces import project

SHAPES = {"q": (12, 10), "v": (9, 14)}
RANKS = (2, 3, 1, 0, 2)  # mixed ranks; a rank-0 adapter; the last one's B is zero


def _adapter(g, shape, r, *, zero_b=False, rslora=False):
    alpha = 4.0
    scale = alpha / math.sqrt(r) if rslora else alpha / max(r, 1)
    b = torch.zeros(shape[0], r) if zero_b else torch.randn(shape[0], r, generator=g)
    return LowRank(b, torch.randn(r, shape[1], generator=g) * 0.3, scale)


def _tasks(seed=0):
    """Five tasks: mixed ranks, rsLoRA (task 1), rank 0 (task 3), zero B (task 4).

    Task 2 lacks ``v``.
    """
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t, r in enumerate(RANKS):
        tasks.append(
            {
                key: _adapter(g, shape, r, zero_b=t == 4, rslora=t == 1)
                for key, shape in SHAPES.items()
                if not (t == 2 and key == "v")
            }
        )
    return tasks


def _dense(delta):
    return delta.scale * delta.b.double() @ delta.a.double()


def _column_space(x, tol=1e-9):
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    return u[:, : int((s > tol * s[0]).sum())] if s.numel() and s[0] > 0 else u[:, :0]


def _core_reference(deltas):
    """U_B, V_A and the cores M_t = U_B^T D_t V_A, all float64 (None: a zero core)."""
    given = [d for d in deltas if d is not None]
    u_b = _column_space(torch.cat([d.scale * d.b.double() for d in given], dim=1))
    v_a = _column_space(torch.cat([d.a.double() for d in given], dim=0).T)
    zero = torch.zeros(u_b.shape[1], v_a.shape[1], dtype=torch.float64)
    return u_b, v_a, [zero if d is None else u_b.T @ _dense(d) @ v_a for d in deltas]


def _reference_deltas(deltas, shape):
    return [torch.zeros(shape, dtype=torch.float64) if d is None else _dense(d) for d in deltas]


@pytest.mark.parametrize("space", ["core", "knots"])
@pytest.mark.parametrize("key", list(SHAPES))
def test_lift_of_each_projection_is_the_task_delta(space, key):
    deltas = [t.get(key) for t in _tasks()]
    proj = project(deltas, space)
    assert not proj.coords[3].any() and not proj.coords[4].any()  # rank 0, zero B: exact zeros
    for c, want in zip(proj.coords, _reference_deltas(deltas, SHAPES[key]), strict=True):
        got = proj.lift(Dense(c.double())).to_dense(torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_core_matches_the_svd_bases_up_to_signs():
    deltas = [t.get("q") for t in _tasks()]
    u_b, v_a, cores = _core_reference(deltas)
    proj = project(deltas, "core")
    assert proj.core_shape == (6, 8) == (u_b.shape[1], v_a.shape[1])  # zero B: not in U_B
    for got, want in zip(proj.coords, cores, strict=True):  # singular vectors: +-1 each
        torch.testing.assert_close(got.double().abs(), want.abs(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((proj.left.T @ u_b).abs(), torch.eye(6, dtype=torch.float64))


def test_knots_matches_the_svd_of_the_stacked_deltas():
    deltas = [t.get("v") for t in _tasks()]
    stacked = torch.cat(_reference_deltas(deltas, SHAPES["v"]), dim=1)  # (m, T n)
    u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    rho = int((s > 1e-9 * s[0]).sum())
    proj = project(deltas, "knots")
    assert proj.core_shape == (rho, SHAPES["v"][1]) and rho == 5  # task 2 lacks v
    torch.testing.assert_close(proj.left.norm(dim=0), s[:rho])  # columns of U S
    blocks = vh[:rho].split(SHAPES["v"][1], dim=1)  # V_t^T, up to the sign of each row
    for got, want in zip(proj.coords, blocks, strict=True):
        torch.testing.assert_close(got.double().abs(), want.abs(), rtol=1e-5, atol=1e-6)


def test_all_zero_parameter_has_no_coordinates():
    g = torch.Generator().manual_seed(1)
    deltas = [_adapter(g, (5, 4), 2, zero_b=True), None, _adapter(g, (5, 4), 0)]
    for space in ("core", "knots"):
        proj = project(deltas, space)
        lifted = proj.lift(Dense(proj.coords[0]))
        assert proj.empty and lifted.rank == 0 and torch.equal(lifted.to_dense(), torch.zeros(5, 4))


def _full_reference(tasks, combine):
    out = {}
    for key, shape in SHAPES.items():
        out[key] = combine(_reference_deltas([t.get(key) for t in tasks], shape))
    return out


@pytest.mark.parametrize("space", ["core", "knots"])
@pytest.mark.parametrize(
    "method,params,weights,combine",
    [
        ("simple_average", {}, None, lambda ds: sum(ds) / len(ds)),
        (
            "task_arithmetic",
            {"scaling": 0.7},
            [1.0, -2.0, 0.5, 3.0, 1.0],
            lambda ds: 0.7 * (ds[0] - 2 * ds[1] + 0.5 * ds[2] + 3 * ds[3] + ds[4]),
        ),
    ],
)
def test_linear_methods_give_their_full_space_result(space, method, params, weights, combine):
    tasks = _tasks(2)
    out = merge_deltas(method, tasks, params, weights, space=space)
    want = _full_reference(tasks, combine)
    full = merge_deltas(method, tasks, params, weights)
    for key in SHAPES:
        assert isinstance(out.deltas[key], LowRank) and out.deltas[key].shape == SHAPES[key]
        got = out.deltas[key].to_dense(torch.float64)
        torch.testing.assert_close(got, want[key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            got, full.deltas[key].to_dense(torch.float64), rtol=1e-5, atol=1e-6
        )
    # Order invariance: the bases change with the order, the merge does not.
    rev = merge_deltas(method, tasks[::-1], params, weights and weights[::-1], space=space)
    for key in SHAPES:
        got = rev.deltas[key].to_dense(torch.float64)
        torch.testing.assert_close(got, want[key], rtol=1e-5, atol=1e-6)


def _ties_by_hand(cores, present, density):
    """TIES with global trimming over each task's cores (counted where the task has the key)."""
    n_tasks = len(next(iter(cores.values())))
    thresholds = []
    for t in range(n_tasks):
        entries = torch.cat([cores[k][t].flatten() for k in cores if present[k][t]]).abs()
        keep = math.floor(density * entries.numel())
        thresholds.append(entries.sort(descending=True).values[keep - 1] if keep else math.inf)
    merged = {}
    for key, taus in cores.items():
        trimmed = torch.stack(
            [tau * (tau.abs() >= thr) for tau, thr in zip(taus, thresholds, strict=True)]
        )
        sign = torch.sign(trimmed.sum(0))
        agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
        merged[key] = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    return merged


def test_ties_in_core_space_is_ties_on_the_cores():
    tasks, density = _tasks(3), 0.3
    cores, present, bases = {}, {}, {}
    for key in SHAPES:
        deltas = [t.get(key) for t in tasks]
        u_b, v_a, cores[key] = _core_reference(deltas)
        present[key], bases[key] = [d is not None for d in deltas], (u_b, v_a)
    merged = _ties_by_hand(cores, present, density)
    out = merge_deltas("ties", tasks, {"density": density}, space="core")
    for key, (u_b, v_a) in bases.items():
        want = u_b @ merged[key] @ v_a.T
        torch.testing.assert_close(
            out.deltas[key].to_dense(torch.float64), want, atol=1e-5, rtol=1e-5
        )
    rev = merge_deltas("ties", tasks[::-1], {"density": density}, space="core")
    for key, delta in rev.deltas.items():  # the bases' signs change with the order; TIES not
        want = out.deltas[key].to_dense(torch.float64)
        torch.testing.assert_close(delta.to_dense(torch.float64), want, atol=1e-5, rtol=1e-5)
    totals = out.stats["state"]["total"]  # N_t: core entries of the keys task t has
    assert totals == [
        sum(c[t].numel() for k, c in cores.items() if present[k][t]) for t in range(5)
    ]
    assert out.stats["per_parameter"]["q"]["core_shape"] == list(cores["q"][0].shape)


def test_ties_in_knots_space_ignores_the_task_order():
    tasks = _tasks(6)
    out = merge_deltas("ties", tasks, {"density": 0.4}, space="knots")
    rev = merge_deltas("ties", tasks[::-1], {"density": 0.4}, space="knots")
    for key, delta in rev.deltas.items():
        want = out.deltas[key].to_dense(torch.float64)
        torch.testing.assert_close(delta.to_dense(torch.float64), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("space", ["core", "knots"])
def test_star_metagpt_core_equal_full_and_results_are_lowrank(space):
    tasks = _tasks(4)
    for method in ("star", "metagpt"):
        out = merge_deltas(method, tasks, space=space)
        assert all(isinstance(d, LowRank) for d in out.deltas.values())
        if space == "core":  # orthonormal bases keep singular values and norms
            full = merge_deltas(method, tasks)
            for key, d in out.deltas.items():
                want = full.deltas[key].to_dense(torch.float64)
                torch.testing.assert_close(d.to_dense(torch.float64), want, rtol=1e-4, atol=1e-5)


def test_refusals_name_the_parameter_and_the_fix():
    tasks = _tasks()
    with pytest.raises(
        InputError, match=r"task 1's 'w' \(shape \(12, 10\)\) is a dense delta.*use space: full"
    ):
        merge_deltas("ties", [{"w": tasks[0]["q"]}, {"w": Dense(torch.ones(12, 10))}], space="core")
    with pytest.raises(
        InputError, match=r"'bias' \(shape \(4,\)\) is not a matrix; use space: full"
    ):
        merge_deltas("task_arithmetic", [{"bias": Dense(torch.ones(4))}], space="knots")
    with pytest.raises(ConfigError, match=r"space must be one of full, core, knots, got 'kernel'"):
        merge_deltas("ties", tasks, space="kernel")
    with pytest.raises(ConfigError, match=r"Did you mean: knots\?"):
        merge_deltas("ties", tasks, space="knot")
    with pytest.raises(ConfigError, match=r"mats does not run in space core \(its data step"):
        merge_deltas("mats", tasks, space="core")


def test_spaces_are_derived_from_the_declarations(register_test_method):
    def kernel(deltas, **_):
        """A test kernel."""
        return Merged(deltas[0])

    register_test_method("plain_dense", paper="https://example.org")(kernel)
    register_test_method("lowrank_only", accepts=("lowrank",))(kernel)
    register_test_method("with_base", needs_base=True)(kernel)
    register_test_method("with_masks", artifacts={"m": (lambda s, t: s, torch.bool)})(kernel)
    register_test_method("declared", spaces=("full", "core"))(kernel)
    spaces = {n: METHODS.get(n).spaces for n in METHODS.names()}
    assert spaces["plain_dense"] == {"full", "core", "knots"}
    assert spaces["lowrank_only"] == spaces["with_base"] == spaces["with_masks"] == {"full"}
    assert spaces["declared"] == {"full", "core"} and spaces["mats"] == {"full"}
    assert spaces["task_arithmetic"] == spaces["ties"] == {"full", "core", "knots"}
    with pytest.raises(ValueError, match="spaces must hold full"):
        register_test_method("bad", spaces=("core",))(kernel)
    with pytest.raises(ConfigError, match=r"with_base does not run in space knots \(it works on"):
        merge_deltas("with_base", _tasks(), space="knots")
    with pytest.raises(ConfigError, match=r"declared does not run in space knots \(it declares"):
        merge_deltas("declared", _tasks(), space="knots")


def _space_methods():
    return [
        (n, s) for n in METHODS.names() for s in ("core", "knots") if s in METHODS.get(n).spaces
    ]


@pytest.mark.parametrize("name,space", _space_methods())
def test_every_method_runs_in_its_spaces(name, space):
    """Every registered method that accepts a space: finite, exactly low rank, zero stays zero."""
    tasks = _tasks(5)
    try:
        merge_deltas(name, tasks)
    except ConfigError as exc:  # e.g. a method defined for one or two models only
        pytest.skip(f"{name} refuses these five tasks in full space too: {exc}")
    out = merge_deltas(name, tasks, space=space)
    for key, shape in SHAPES.items():
        delta = out.deltas[key]
        assert isinstance(delta, LowRank) and delta.shape == shape
        assert torch.isfinite(delta.to_dense()).all()
        assert out.stats["per_parameter"][key]["core_shape"][0] <= sum(RANKS)
    zero = [{k: LowRank(torch.zeros_like(d.b), d.a, d.scale) for k, d in t.items()} for t in tasks]
    for delta in merge_deltas(name, zero, space=space).deltas.values():
        assert delta.rank == 0
