"""WUDI against FusionBench's own ``wudi_merging``; CART against the paper's and core-space code.

The outputs in ``fusionbench_wudi_cart.json`` come from ``scripts/golden_fusionbench_wudi.py``
(the command, versions and repo commits are stored in the file), on seeded full-rank float32
task vectors with entries ~1e-3. Tolerances:
- WUDI (Adam, 50 steps, lr 1e-5): ours forms the gradient in closed form, 2 (X G - H), where
  FusionBench back-propagates through the T products, so each gradient differs by float32
  rounding (~1e-7 relative). Adam divides each entry's step by its running RMS, so such a
  difference changes a step by about 1e-7 of lr; an entry could only move differently by up to
  lr per step if its gradient were within rounding of zero (none is here). The test allows
  1e-4 of the largest distance Adam moved an entry from its start (we see ~1e-6 of it) and
  checks that this distance is far above the tolerance, so a no-op would fail.
- CART, the paper's code (JH-GEECS/CART): its SVD and sums are float32, ours float64 rounded
  once: relative Frobenius error 1e-5 (we see up to 3e-6). Non-matrix parameters: the paper
  adds prior * sum_t (tau_t - mean), zero up to float32 rounding (we see 4e-7).
- CART, core-space-merging (float64 SVD like ours): 1e-6 (we see 1.2e-7).
Each CART case also runs our factor path, on an exact factorisation tau = tau @ I.
"""

import json
from pathlib import Path

import pytest
import torch

from starmerge.methods import METHODS
from starmerge.tensors.delta import Dense, LowRank

DATA = Path(__file__).parent / "fusionbench_wudi_cart.json"


@pytest.fixture(scope="module")
def golden():
    return json.loads(DATA.read_text())


def rel(got, want):
    got, want = got.to(torch.float64), want.to(torch.float64)
    return float((got - want).norm() / want.norm())


def as_dense(delta):
    return delta.to_dense(torch.float64) if isinstance(delta, LowRank) else delta.tensor


def inputs(golden, key):
    return [Dense(torch.tensor(tv[key], dtype=torch.float32)) for tv in golden["inputs"]]


def merge(name, deltas, params):
    method = METHODS.get(name)
    return method.fn(deltas, **method.kernel_args(method.resolve(params))).delta


def test_golden_file_records_its_provenance(golden):
    assert "scripts/golden_fusionbench_wudi.py" in golden["command"]
    assert golden["versions"]["fusion_bench"] and golden["versions"]["JH-GEECS/CART"]


def test_wudi_matches_fusionbench(golden):
    run = golden["wudi"]
    for key, shape in golden["shapes"].items():
        deltas = inputs(golden, key)
        got = merge("wudi", deltas, run["params"]).tensor
        want = torch.tensor(run["output"][key])
        if len(shape) != 2:  # averaged by both
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
            continue
        start = sum(d.tensor for d in deltas)
        moved = float((want - start).abs().max())
        assert moved > 1e-2 * float(start.abs().max()), key  # Adam moved the result measurably
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * moved)


@pytest.mark.parametrize(("source", "tol"), [("cart_paper", 1e-5), ("cart_core_space", 1e-6)])
def test_cart_matches_reference_code(golden, source, tol):
    for case in golden[source]:
        for key, out in case["output"].items():
            want = torch.tensor(out)
            deltas = inputs(golden, key)
            assert rel(as_dense(merge("cart", deltas, case["params"])), want) < tol, (case, key)
            if want.ndim == 2:  # the factor path, on tau = tau @ I
                factored = [LowRank(d.tensor, torch.eye(d.shape[1]), 1.0) for d in deltas]
                got = merge("cart", factored, case["params"])
                assert isinstance(got, LowRank)
                assert rel(as_dense(got), want) < tol, (case, key, "lowrank")


def test_cart_default_case_is_the_papers_configuration(golden):
    assert golden["cart_paper"][0]["params"] == METHODS.get("cart").resolve({})
