"""Merge-space bases computed once per run, blockwise products, and the lift's routes.

References are independent of the library: dense ``s_t B_t A_t`` in float64, the SVD of the
stacked factors (``torch.linalg.svd``), and a merge without the cache (each pass projecting
again, as before the cache existed).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import starmerge.space_form as space_form
from starmerge.methods import METHODS
from starmerge.pipeline import fit_state, merge_params
from starmerge.space_cache import SpaceCache, SpaceState
from starmerge.tensors.delta import Dense, LowRank
from starmerge.tensors.spaces import project, space_basis

SHAPES = {"q": (12, 10), "v": (9, 14), "wide": (16, 9000), "tall": (9000, 16)}  # several blocks


def _tasks(seed: int, ranks=(2, 3, 1, 0, 2)):
    """Five tasks of mixed ranks (one of rank 0); task 2 lacks ``v``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t, r in enumerate(ranks):
        out.append(
            {
                k: LowRank(
                    torch.randn(s[0], r, generator=g), torch.randn(r, s[1], generator=g), 0.5
                )
                for k, s in SHAPES.items()
                if not (t == 2 and k == "v")
            }
        )
    return out


class CountingReader:
    """Every task's delta of a key, counting how often each key is read."""

    def __init__(self, tasks):
        self.tasks, self.reads = tasks, dict.fromkeys(SHAPES, 0)

    def __call__(self, key):
        self.reads[key] += 1
        return [t.get(key) for t in self.tasks]


def _dense(delta):
    return float(delta.scale) * delta.b.double() @ delta.a.double()


@pytest.mark.parametrize("space", ["core", "knots"])
def test_bases_are_computed_once_and_handed_over(space, monkeypatch):
    computed = []
    original = space_form.space_basis
    monkeypatch.setattr(
        space_form, "space_basis", lambda d, s: computed.append(s) or original(d, s)
    )
    method = METHODS.get("ties")
    params = method.resolve({"density": 0.3})
    reader = CountingReader(_tasks(0))
    state = fit_state(method, params, 5, SHAPES, reader, space=space)  # two fit passes
    assert isinstance(state, SpaceState) and sorted(state.cache.bases) == sorted(SHAPES)
    merged = dict(merge_params(method, params, state, SHAPES, reader, space=space))
    assert len(computed) == len(SHAPES)  # one projection per key, not one per pass
    # core's cores come from the basis alone: the second fit pass reads nothing
    assert reader.reads == dict.fromkeys(SHAPES, 2 if space == "core" else 3)
    assert state.cache.bases == {}  # the merge took every basis out
    assert state.summary() == state.state.summary()
    # the very numbers of a merge that projects again in every pass
    again = dict(merge_params(method, params, state.state, SHAPES, reader, space=space))
    for key, result in merged.items():
        assert torch.equal(result.delta.b, again[key].delta.b)
        assert torch.equal(result.delta.a, again[key].delta.a)


@pytest.mark.parametrize("space", ["core", "knots"])
def test_every_pass_reuses_coordinate_buffers_and_release_copies_a_kept_one(space):
    """Two parameters of one shape fill the same buffers, fit and merge pass alike, each with
    its own coordinates; a merged result that is one of them is copied out, others pass."""
    tasks = _tasks(2)
    other = _tasks(3)  # "q" again, other values: a second parameter of the same shape
    cache = SpaceCache(space)
    first = [
        c.tensor.clone() for c in cache.inputs("q", lambda: [t["q"] for t in tasks], keep=True)[1]
    ]
    held = list(cache.buffers)
    _, second = cache.inputs("q2", lambda: [t["q"] for t in other], keep=True)
    assert [c.tensor.data_ptr() for c in second] == [b.data_ptr() for b in held]
    want = project([t["q"] for t in other], space).coords
    for got, ref in zip(second, want, strict=True):
        assert torch.equal(got.tensor, ref)
    for got, ref in zip(first, project([t["q"] for t in tasks], space).coords, strict=True):
        assert torch.equal(got, ref)  # what the fitter saw of the first parameter was its own
    _, merged = cache.inputs("q", lambda: [t["q"] for t in tasks], keep=False)
    assert [c.tensor.data_ptr() for c in merged] == [b.data_ptr() for b in held]
    for got, ref in zip(merged, first, strict=True):
        assert torch.equal(got.tensor, ref)
    kept = merged[0].tensor
    fresh = torch.ones(3, kept.shape[0])
    out = cache.release(LowRank(fresh, kept, 2.0))  # a lift that keeps the input as its A
    assert out.b is fresh and out.scale == 2.0
    assert out.a.data_ptr() != kept.data_ptr() and torch.equal(out.a, kept)
    assert cache.release(Dense(kept)).tensor.data_ptr() != kept.data_ptr()
    assert cache.release(Dense(fresh)).tensor is fresh


def test_a_basis_is_reused_only_for_its_deltas():
    tasks = _tasks(1)
    deltas = [t.get("q") for t in tasks]
    cache = SpaceCache("core")
    cache.inputs("q", lambda: deltas, keep=True)
    other = list(deltas)
    other[0] = LowRank(deltas[0].b, deltas[0].a, 0.25)  # another scale: another delta
    projection, coords = cache.inputs("q", lambda: other, keep=False)
    want = project(other, "core")
    for got, ref in zip(coords, want.coords, strict=True):
        assert torch.equal(got.tensor, ref)
    assert cache.bases == {}


@pytest.mark.parametrize("space", ["core", "knots"])
@pytest.mark.parametrize("key", ["wide", "tall"])
def test_blockwise_coordinates_match_the_svd_of_the_stacks(space, key):
    """Coordinates from several float64 blocks against ``torch.linalg.svd`` (float64, by hand)."""
    deltas = [t.get(key) for t in _tasks(2)]
    coords = space_basis(deltas, space).coordinates(deltas)
    given = [d for d in deltas if d is not None and d.rank]
    if space == "core":  # M_t = U_B^T D_t V_A, U_B / V_A: singular vectors of the stacks
        u = torch.linalg.svd(torch.cat([d.scale * d.b.double() for d in given], 1), False)[0]
        vh = torch.linalg.svd(torch.cat([d.a.double() for d in given]), False)[2]
        want = [u.T @ _dense(d) @ vh.T for d in deltas]
    else:  # V_t^T: blocks of the right singular vectors of [D_1 .. D_T]
        vh = torch.linalg.svd(torch.cat([_dense(d) for d in deltas], 1), False)[2]
        want = list(vh[: coords[0].shape[0]].split(SHAPES[key][1], dim=1))
    for c, w in zip(coords, want, strict=True):  # each singular vector up to its sign
        assert c.dtype == torch.float32
        torch.testing.assert_close(c.double().abs(), w.abs(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ill", [False, True])
def test_core_lift_routes_match_the_dense_product(ill):
    """Well-conditioned A: the adapters' own A is the output's A factor; else U_B (M V_A^T)."""
    g = torch.Generator().manual_seed(3)
    m, n, r = 40, 30, 3
    a = [torch.randn(r, n, generator=g) for _ in range(3)]
    if ill:  # nearly the same rows twice: cond(A) far above 4
        a[1] = a[0] + 1e-3 * torch.randn(r, n, generator=g)
    deltas = [LowRank(torch.randn(m, r, generator=g), x, 2.0) for x in a]
    basis = space_basis(deltas, "core")
    assert basis.a_output is not ill
    if basis.a_output:
        assert torch.equal(basis.lift(Dense(torch.eye(9)), deltas).a, torch.cat(a))  # as given
    # a weighted sum of the cores lifts to the same sum of the dense deltas (float64, by hand)
    w = torch.randn(3, generator=g, dtype=torch.float64)
    merged = sum(wt * c.double() for wt, c in zip(w, basis.coordinates(deltas), strict=True))
    lifted = basis.lift(Dense(merged.float()), deltas)
    p, q = basis.core_shape
    assert lifted.rank == min(p, q) == 9 and lifted.b.dtype == torch.float32
    want = sum(wt * _dense(d) for wt, d in zip(w, deltas, strict=True))
    got = lifted.to_dense(torch.float64)
    assert float((got - want).norm() / want.norm()) < 1e-6
    # and any M: L M R with L, R orthonormal and spanning the stacks (SVD, float64)
    proj = project(deltas, "core")
    x = torch.randn(p, q, generator=g)
    got = basis.lift(Dense(x), deltas).to_dense(torch.float64)
    want = proj.left @ x.double() @ proj.right
    assert float((got - want).norm() / want.norm()) < 1e-6
    u = torch.linalg.svd(torch.cat([2.0 * d.b.double() for d in deltas], 1), False)[0]
    torch.testing.assert_close(proj.left @ proj.left.T, u @ u.T)


def test_rank_deficient_stacks_are_not_kept_but_merge_the_same():
    """Twice the same adapter: the stack is singular (QR route, tall base): never cached."""
    g = torch.Generator().manual_seed(4)
    x = LowRank(torch.randn(16, 2, generator=g), torch.randn(2, 12, generator=g), 1.0)
    tasks = [{"w": x}, {"w": x}, {"w": LowRank(x.b * 2, x.a, 1.0)}]
    shapes = {"w": (16, 12)}
    basis = space_basis([t["w"] for t in tasks], "core")
    assert not basis.reusable and basis.core_shape == (2, 2)
    method = METHODS.get("ties")
    params = method.resolve({"density": 0.5})

    def read(key):
        return [t[key] for t in tasks]

    state = fit_state(method, params, 3, shapes, read, space="core")
    assert state.cache.bases == {}
    got = dict(merge_params(method, params, state, shapes, read, space="core"))["w"]
    again = dict(merge_params(method, params, state.state, shapes, read, space="core"))["w"]
    assert torch.equal(got.delta.to_dense(), again.delta.to_dense())


@pytest.mark.parametrize("space,per_r2", [("core", 4), ("knots", 2)])
def test_a_kept_basis_holds_only_r_by_r_matrices(space, per_r2):
    """The memory bound of the cache: 4 R^2 (core) or 2 R^2 (knots) float64 numbers per key."""
    deltas = [t.get("wide") for t in _tasks(5)]
    basis = space_basis(deltas, space)
    assert basis.reusable
    r = sum(d.rank for d in deltas if d is not None)
    held = [basis.coef, basis.a_coef, basis.left[1], basis.right and basis.right[1]]
    assert basis.left[0] is None and (basis.right is None or basis.right[0] is None)
    numbers = sum(t.numel() for t in held if t is not None)
    assert numbers <= per_r2 * r * r
    assert all(t.dtype == torch.float64 for t in held if t is not None)


@pytest.mark.parametrize("space", ["core", "knots"])
@pytest.mark.parametrize("key", ["wide", "tall"])
@pytest.mark.parametrize("spread", [1.0, 30.0])
def test_blockwise_lift_of_each_task_is_its_delta(space, key, spread):
    """Lifts through several row / column blocks; ``spread`` makes cond(A) > 4 (no A kept)."""
    deltas = [t.get(key) for t in _tasks(6)]
    deltas[0] = LowRank(deltas[0].b, deltas[0].a * spread, deltas[0].scale)
    basis = space_basis(deltas, space)
    if key == "wide" or spread > 1:  # A: 8 random rows of 9000 (cond ~1), or spread out
        assert basis.a_output is (space == "core" and spread == 1.0)
    for c, d in zip(basis.coordinates(deltas), deltas, strict=True):
        got = basis.lift(Dense(c), deltas).to_dense(torch.float64)
        want = torch.zeros(SHAPES[key], dtype=torch.float64) if d is None else _dense(d)
        assert float((got - want).norm()) <= 1e-5 * max(float(want.norm()), 1.0)


# Per-task truncations are asked to keep every singular value: each task's KnOTS coordinates
# V_t^T here are partial isometries (the stacked rows of V^T are orthonormal and rho = R, so
# sum_t V_t^T V_t = I with ranks adding up to rho: every singular value is 1), and keeping
# some of r_t equal singular values is an arbitrary choice that rounding decides.
@pytest.mark.parametrize(
    ("name", "given"),
    [("tsv_m", {"fraction": 1.0}), ("iso_c", {}), ("task_arithmetic", {}), ("star", {"eta": 100})],
)
def test_knots_merge_gives_a_lowrank_method_the_factored_coordinates(name, given):
    """A method that takes LowRank gets each task's KnOTS coordinates as their exact factors:
    the same matrices as the dense coordinates (within their float32 product), and a merge
    within float32 rounding of the method run on the dense coordinates and lifted."""
    method = METHODS.get(name)
    params = method.resolve(given)
    tasks = _tasks(5)
    seen = []

    def spy(deltas, **kwargs):
        seen.append(deltas)
        return method.fn(deltas, **kwargs)

    watched = dataclasses.replace(method, fn=spy)
    merged = dict(merge_params(watched, params, None, SHAPES, CountingReader(tasks), space="knots"))
    for key, inputs in zip(SHAPES, seen, strict=True):
        deltas = [t.get(key) for t in tasks]
        projection = project(deltas, "knots")
        assert all(isinstance(d, LowRank) for d in inputs)
        for got, want in zip(inputs, projection.coords, strict=True):
            assert torch.allclose(got.to_dense(torch.float32), want, rtol=1e-5, atol=1e-6)
        dense = [Dense(c) for c in projection.coords]
        want = projection.lift(method.fn(dense, **method.params_at(params, key, 1)).delta)
        got, ref = _dense(merged[key].delta), _dense(want)
        assert float((got - ref).norm() / ref.norm()) < 1e-5


def test_knots_coordinates_of_a_full_rank_stack_are_partial_isometries():
    """The fact behind the previous test's parameters: with rho = R, each task's V_t^T has its
    r_t nonzero singular values all equal to 1 (float32 rounding aside)."""
    deltas = [t.get("q") for t in _tasks(5)]
    projection = project(deltas, "knots")
    assert projection.core_shape[0] == sum(d.rank for d in deltas)  # rho = R
    for d, c in zip(deltas, projection.coords, strict=True):
        s = torch.linalg.svdvals(c.double())
        assert torch.allclose(s[: d.rank], torch.ones(d.rank, dtype=torch.float64), atol=1e-5)
        assert all(float(x) < 1e-5 for x in s[d.rank :])
