"""starmerge's mergekit-family kernels against mergekit's own outputs.

``tests/golden/mergekit_sparse.json`` is written by ``scripts/golden_mergekit_sparse.py`` with
mergekit's environment (the command, versions and API are recorded in the file). Each case gives
mergekit's parameters; they are mapped here to starmerge's (per-model lists -> ``weights`` /
``densities`` / ``gammas`` / ``epsilons``; ``lambda`` -> ``scaling`` for ``ties`` and
``task_arithmetic``; ``ties`` with ``trim: local``, mergekit's per-tensor trim). starmerge merges
the task deltas (model - base) and the test compares base + merge with mergekit's merged weights.

Tolerance: |ours - mergekit| <= 1e-5 + 1e-5 |mergekit| per entry (both float32; the sums run in
a different order). For DARE and DELLA the stored uniform draws stand in for both sides' random
numbers (mergekit's ``torch.bernoulli(p)`` became ``u < p`` when the file was made), so the
comparison is exact up to the same tolerance.

The random methods' own draws are checked by their statistics instead: the kept share against a
binomial bound, the L1 rescale, E[merged] = the unsparsified merge over seeds, DELLA's keep rate
per magnitude decile.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from starmerge.methods import METHODS, dare, della
from starmerge.tensors.delta import Dense

GOLDEN = json.loads((Path(__file__).parent / "mergekit_sparse.json").read_text())
PLURAL = {"weight": "weights", "density": "densities", "gamma": "gammas", "epsilon": "epsilons"}
CASES = {case["name"]: case for case in GOLDEN["cases"]}


def our_params(method, params):
    """mergekit's parameters in starmerge's names."""
    out = {"trim": "local"} if method == "ties" else {}
    for key, value in params.items():
        if key == "weight":
            out["weights"] = value if isinstance(value, list) else [value] * 3
        elif isinstance(value, list):
            out[PLURAL[key]] = value
        elif key == "lambda" and method in ("ties", "task_arithmetic"):
            out["scaling"] = value
        else:
            out[key] = value
    return out


def tensors(key):
    base, *models = (torch.tensor(x, dtype=torch.float32) for x in GOLDEN["inputs"][key])
    return base, models


def run(case, key, monkeypatch):
    base, models = tensors(key)
    deltas = [Dense(m - base) for m in models]
    if "uniforms" in case:
        draws = [torch.tensor(u, dtype=torch.float32) for u in case["uniforms"][key]]

        def fixed(delta, seed):  # the stored draws of the task this delta belongs to
            return draws[next(t for t, d in enumerate(deltas) if d is delta)]

        monkeypatch.setattr(dare, "task_uniform", fixed)
        monkeypatch.setattr(della, "task_uniform", fixed)
    method = METHODS.get(case["method"])
    resolved = method.resolve(our_params(case["method"], case["parameters"]))
    merged = method.fn(deltas, **method.kernel_args(resolved)).delta.to_dense(torch.float32)
    return base, base + merged


@pytest.mark.parametrize("name", [n for n in CASES if n != "linear_unnormalized"])
@pytest.mark.parametrize("key", list(GOLDEN["shapes"]))
def test_matches_mergekit(name, key, monkeypatch):
    case = CASES[name]
    _, ours = run(case, key, monkeypatch)
    want = torch.tensor(case["outputs"][key], dtype=torch.float32)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", list(GOLDEN["shapes"]))
def test_linear_unnormalized_differs_only_by_the_base(key, monkeypatch):
    """The documented difference: mergekit sums full weights, so it adds (sum w - 1) * base."""
    case = CASES["linear_unnormalized"]
    base, ours = run(case, key, monkeypatch)
    want = torch.tensor(case["outputs"][key], dtype=torch.float32)
    extra = (sum(case["parameters"]["weight"]) - 1.0) * base
    torch.testing.assert_close(ours + extra, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, want, atol=1e-2)


def test_golden_file_records_its_provenance():
    assert GOLDEN["command"].endswith("scripts/golden_mergekit_sparse.py")
    assert GOLDEN["versions"]["mergekit"]
    methods = {case["method"] for case in GOLDEN["cases"]}
    assert methods == {
        "linear",
        "task_arithmetic",
        "ties",
        "breadcrumbs",
        "breadcrumbs_ties",
        "sce",
        "dare_linear",
        "dare_ties",
        "della",
        "della_linear",
    }


@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "dare_ties", "della", "sce_topk"])
def test_cases_actually_sparsify(name):
    """Guard against a vacuous golden: these cases drop entries (mergekit != the plain sum)."""
    case = CASES[name]
    base, models = tensors("w")
    plain = base + sum(m - base for m in models) / 3
    got = torch.tensor(case["outputs"]["w"])
    assert not torch.allclose(got, plain, atol=1e-3)


# --- DARE / DELLA statistics (their masks are random: no golden values) -------------------------


def merge(name, deltas, **params):
    method = METHODS.get(name)
    return method.fn(deltas, **method.kernel_args(method.resolve(params)))


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def binomial_bound(n, p, sigmas=6.0):
    return sigmas * math.sqrt(n * p * (1 - p))


def test_dare_keeps_density_share_and_rescales_to_the_l1_norm():
    x = randn(1000, 1000, seed=6)
    out = merge("dare_linear", [Dense(x)], density=0.3, seed=1).delta.tensor
    kept = out != 0
    assert abs(int(kept.sum()) - 0.3e6) < binomial_bound(1e6, 0.3)
    factor = x.double().abs().sum() / x.double()[kept].abs().sum()  # mergekit's L1 rescale
    torch.testing.assert_close(out[kept].double(), x[kept].double() * factor, rtol=1e-5, atol=0)
    assert abs(float(factor) - 1 / 0.3) < 0.02  # ~ 1 / density on a large tensor
    raw = merge("dare_linear", [Dense(x)], density=0.3, seed=1, rescale=False).delta.tensor
    assert torch.equal(raw != 0, kept) and torch.equal(raw[kept], x[kept])


def test_dare_is_unbiased_over_seeds():
    """E[merged] = the unsparsified weighted sum: the mean of 200 seeds within 5 sigma per entry."""
    taus = [randn(8, 8, seed=50 + t) for t in range(3)]
    ws, p, runs = [1.0, 0.5, 2.0], 0.5, 200
    total = torch.zeros(8, 8, dtype=torch.float64)
    for seed in range(runs):
        total += merge(
            "dare_linear", [Dense(t) for t in taus], weights=ws, density=p, seed=seed
        ).delta.tensor.double()
    want = sum(w * t.double() for w, t in zip(ws, taus, strict=True))
    # per entry: Var = sum_t (w_t tau_t)^2 (1 - p) / p (the L1 factor ~ 1/p; 64 entries)
    sigma = torch.sqrt(
        sum((w * t.double()) ** 2 for w, t in zip(ws, taus, strict=True)) * (1 - p) / p / runs
    )
    z = (total / runs - want) / sigma
    assert bool((z.abs() <= 5).all())
    assert float(z.pow(2).mean().sqrt()) < 1.5  # RMS of 64 standard scores ~ 1


def test_della_keeps_more_of_the_larger_entries_at_the_stated_rates():
    n, p, e = 200_000, 0.5, 0.2
    x = randn(1, n, seed=9)
    out = merge(
        "della_linear", [Dense(x)], density=p, epsilon=e, seed=2, rescale=False
    ).delta.tensor
    kept = (out != 0).reshape(-1)
    assert abs(int(kept.sum()) - p * n) < binomial_bound(n, p)
    order = x.abs().reshape(-1).argsort()  # ascending magnitude
    for decile in range(10):
        part = order[decile * n // 10 : (decile + 1) * n // 10]
        rate = float(kept[part].double().mean())
        expected = p - e + 2 * e * (decile + 0.5) / 10  # mean p_r over the decile
        assert abs(rate - expected) < binomial_bound(n / 10, expected, 5) / (n / 10), (decile, rate)
