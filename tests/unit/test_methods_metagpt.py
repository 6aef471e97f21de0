"""MetaGPT: lambdas from whole-model norms (factors never densified) and the weighted sum."""

import json

import torch

from starmerge.methods import METHODS
from starmerge.methods.metagpt import MetaGPTFitter, metagpt
from starmerge.tensors.delta import Dense, LowRank
from starmerge.tensors.factors import sq_frobenius


def drive(model):
    method = METHODS.get("metagpt")
    resolved = method.resolve({})
    fitter = method.fit(len(next(iter(model.values()))), **resolved)
    while True:
        for key, deltas in model.items():
            fitter.observe(key, deltas)
        if not fitter.end_pass():
            break
    state = fitter.state()
    out = {}
    for key, deltas in model.items():
        shape = next(d.shape for d in deltas if d is not None)
        filled = [d if d is not None else Dense(torch.zeros(shape)) for d in deltas]
        out[key] = method.fn(filled, state=state.at(key), **resolved)
    return out, state


def lowrank_model(seed):
    g = torch.Generator().manual_seed(seed)

    def lr(m, n, r, t):
        return LowRank(
            torch.randn(m, r, generator=g), torch.randn(r, n, generator=g), 0.5 * (t + 1)
        )

    return {"q": [lr(8, 4, 2, t) for t in range(3)], "v": [lr(4, 6, 3, t) for t in range(3)]}


def dense_of(model):
    return {
        k: [None if d is None else d.to_dense(torch.float64) for d in ds] for k, ds in model.items()
    }


def ref_lambdas(dense):
    norms = [0.0] * len(next(iter(dense.values())))
    for ds in dense.values():
        for t, x in enumerate(ds):
            if x is not None:
                norms[t] += float((x * x).sum())
    return [n / sum(norms) for n in norms]


def test_sq_norm_from_factors_equals_dense_norm():
    for d in lowrank_model(0)["q"] + lowrank_model(0)["v"]:
        want = float((d.to_dense(torch.float64) ** 2).sum())
        assert abs(sq_frobenius(d) - want) <= 1e-10 * want


def test_lowrank_merge_matches_float64_reference():
    model = lowrank_model(1)
    got, state = drive(model)
    dense = dense_of(model)
    lambdas = ref_lambdas(dense)
    assert max(abs(a - b) for a, b in zip(state.lambdas, lambdas, strict=True)) < 1e-12
    for k in model:
        assert isinstance(got[k].delta, LowRank)
        want = sum(lam * x for lam, x in zip(lambdas, dense[k], strict=True))
        err = (got[k].delta.to_dense(torch.float64) - want).norm() / want.norm()
        assert err < 1e-5


def test_dense_and_lowrank_give_the_same_merge():
    model = lowrank_model(2)
    as_dense = {k: [Dense(d.to_dense()) for d in ds] for k, ds in model.items()}
    low, _ = drive(model)
    den, _ = drive(as_dense)
    for k in model:
        torch.testing.assert_close(
            low[k].delta.to_dense(), den[k].delta.tensor, rtol=1e-5, atol=1e-5
        )


def test_missing_task_contributes_no_norm():
    model = lowrank_model(3)
    model["v"][2] = None
    _, state = drive(model)
    lambdas = ref_lambdas(dense_of(model))
    assert max(abs(a - b) for a, b in zip(state.lambdas, lambdas, strict=True)) < 1e-12


def test_all_zero_gives_uniform_lambdas_and_zero():
    fitter = MetaGPTFitter(2)
    zeros = [Dense(torch.zeros(3)), LowRank(torch.zeros(3, 0), torch.zeros(0, 1))]
    fitter.observe("w", zeros[:1] * 2)
    fitter.end_pass()
    state = fitter.state()
    assert state.lambdas == (0.5, 0.5)
    assert torch.equal(metagpt(zeros[:1] * 2, state=state).delta.tensor, torch.zeros(3))
    json.dumps(state.summary())


def test_standalone_uses_this_parameter_norms_and_one_task_returns_it():
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 1.0])
    got = metagpt([Dense(a), Dense(b)]).delta.tensor
    torch.testing.assert_close(got, 0.9 * a + 0.1 * b)
    x = torch.randn(4, 2)
    torch.testing.assert_close(metagpt([Dense(x)]).delta.tensor, x)


def test_order_invariance_and_dtype():
    model = lowrank_model(4)
    fwd = metagpt(model["q"]).delta.to_dense()
    rev = metagpt(model["q"][::-1]).delta.to_dense()
    torch.testing.assert_close(fwd, rev)
    half = [LowRank(d.b.half(), d.a.half(), d.scale) for d in model["q"]]
    assert metagpt(half).delta.dtype == torch.float16
    bf = [Dense(d.to_dense().bfloat16()) for d in model["q"]]
    assert metagpt(bf).delta.dtype == torch.bfloat16
