"""Our methods against the seed code's outputs (IBM/STAR ``merger/*.py``), rebuilt by
``scripts/make_golden.py``; see that script for the known seed behaviours behind the tolerances.
"""

import json
from pathlib import Path

import pytest
import torch

from starmerge.methods import METHODS
from starmerge.tensors.delta import Dense, LowRank

HERE = Path(__file__).parent
DATA = HERE / "seed_merges.safetensors"

pytestmark = pytest.mark.skipif(
    not DATA.exists(),
    reason="tests/golden/seed_merges.safetensors is absent: run "
    "`python scripts/make_golden.py --star-repo PATH` with a checkout of IBM/STAR",
)


@pytest.fixture(scope="module")
def golden():
    from safetensors.torch import load_file

    return load_file(str(DATA)), json.loads((HERE / "seed_merges.json").read_text())


def inputs(golden, key, lowrank):
    tensors, meta = golden
    out = []
    for t, task in enumerate(meta["tasks"]):
        if lowrank:
            b, a = tensors[f"input/{task}/{key}/lora_B"], tensors[f"input/{task}/{key}/lora_A"]
            out.append(LowRank(b, a, meta["scales"][t]))
        else:
            out.append(Dense(tensors[f"input/{task}/{key}/delta"]))
    return out


def merge(name, golden, lowrank, **params):
    """Run a method over all modules as the pipeline does (fit passes first)."""
    method = METHODS.get(name)
    resolved = method.resolve(params)
    model = {key: inputs(golden, key, lowrank) for key in golden[1]["modules"]}
    state = None
    if method.fit is not None:
        fitter = method.fit(len(golden[1]["tasks"]), **resolved)
        while True:
            for key, deltas in model.items():
                fitter.observe(key, deltas)
            if not fitter.end_pass():
                break
        state = fitter.state()
    extra = lambda key: {} if state is None else {"state": state.at(key)}  # noqa: E731
    return {k: method.fn(d, **extra(k), **resolved) for k, d in model.items()}, state


def dense(delta):
    return delta.to_dense(torch.float32) if isinstance(delta, LowRank) else delta.tensor


def rel(got, want):
    return float((got.double() - want.double()).norm() / want.double().norm())


def expected(golden, name, key):
    return golden[0][f"output/{name}/{key}"]


@pytest.mark.parametrize("lowrank", [True, False])
def test_simple_average(golden, lowrank):
    out, _ = merge("simple_average", golden, lowrank)
    for key, merged in out.items():
        assert rel(dense(merged.delta), expected(golden, "simple_average", key)) < 1e-6


@pytest.mark.parametrize("lowrank", [True, False])
def test_task_arithmetic(golden, lowrank):
    ta = golden[1]["task_arithmetic"]
    out, _ = merge("task_arithmetic", golden, lowrank, **ta)
    for key, merged in out.items():
        assert rel(dense(merged.delta), expected(golden, "task_arithmetic", key)) < 1e-6


@pytest.mark.parametrize("lowrank", [True, False])
@pytest.mark.parametrize("eta", [20, 40, 80])
def test_star(golden, lowrank, eta):
    out, _ = merge("star", golden, lowrank, eta=float(eta))
    for key, merged in out.items():
        # the seed's float32 dense SVD carries a ~1e-7 noise tail (see make_golden.py)
        assert rel(dense(merged.delta), expected(golden, f"star_eta{eta}", key)) < 1e-5
        for t, task in enumerate(golden[1]["tasks"]):
            seed_t = expected(golden, f"star_eta{eta}/{task}", key)
            assert merged.stats["kept_ranks"][t] == torch.linalg.matrix_rank(seed_t).item()


@pytest.mark.parametrize("trim", ["global", "local"])
def test_ties(golden, trim):
    out, _ = merge("ties", golden, False, density=golden[1]["ties_k_percent"] / 100, trim=trim)
    for key, merged in out.items():
        want = expected(golden, f"ties_{trim}", key)
        assert torch.equal(merged.delta.tensor != 0, want != 0), "same kept and elected entries"
        torch.testing.assert_close(merged.delta.tensor, want, rtol=1e-6, atol=1e-7)


def test_tall_masks(golden):
    tall = golden[1]["tall_masks"]
    params = {
        "mask_lambda": tall["lambda_"],
        "alpha": tall["scaling_factor"],
        "consensus": tall["k"],
    }
    out, _ = merge("tall_masks", golden, False, **params)
    for key, merged in out.items():
        torch.testing.assert_close(
            merged.delta.tensor, expected(golden, "tall_masks", key), rtol=1e-6, atol=1e-7
        )


@pytest.mark.parametrize("lowrank", [True, False])
def test_metagpt(golden, lowrank):
    out, state = merge("metagpt", golden, lowrank)
    for ours, seed in zip(state.lambdas, golden[1]["metagpt_lambdas"], strict=True):
        assert abs(ours - seed) <= 1e-5 * seed
    for key, merged in out.items():
        assert rel(dense(merged.delta), expected(golden, "metagpt", key)) < 1e-5
