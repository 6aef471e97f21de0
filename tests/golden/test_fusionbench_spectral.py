"""TSV-M, Iso-C and Iso-CTS against FusionBench's own functions (fusion-bench 0.2.33).

The outputs in ``fusionbench_spectral.json`` come from ``scripts/golden_fusionbench_spectral.py``
(the command is stored in the file). Tolerances (relative Frobenius error):
- float64 inputs: FusionBench's SVDs are float64 too, so both compute the same exact answer;
  1e-12 (we see ~1e-15);
- float32 inputs (the same values as the float64 fixture): ours computes in float64 and rounds
  once, so it agrees with FusionBench's float64 output to float32 rounding (1e-6; we see 3e-8)
  and with FusionBench's float32 output to its own float32 SVD error (2e-5; we see up to 6e-6).
For LoRA fixtures our factored result equals FusionBench's where the reference is well defined
(TSV-M inside each task's support) and the documented relation where it is not (Iso-C of a
low-rank sum: FusionBench averages the zero singular values in).
"""

import json
from pathlib import Path

import pytest
import torch

from starmerge.methods import METHODS
from starmerge.tensors.delta import Dense, LowRank

DATA = Path(__file__).parent / "fusionbench_spectral.json"


@pytest.fixture(scope="module")
def golden():
    return json.loads(DATA.read_text())


def rel(got, want):
    got, want = got.to(torch.float64), want.to(torch.float64)
    return float((got - want).norm() / want.norm())


def run(label, deltas):
    """Our method for a golden label (``iso_cts@0.5`` -> iso_cts, common_fraction 0.5)."""
    name, _, frac = label.partition("@")
    method = METHODS.get(name)
    params = method.resolve({"common_fraction": float(frac)} if frac else {})
    return method.fn(deltas, **params).delta


def dense_inputs(golden, run_name, key, dtype):
    return [Dense(torch.tensor(tv[key], dtype=dtype)) for tv in golden["runs"][run_name]["inputs"]]


def lora_inputs(golden, key, dtype=torch.float64):
    out = []
    for task in golden["lora"]["inputs"]:
        f = task[key]
        b, a = torch.tensor(f["b"], dtype=dtype), torch.tensor(f["a"], dtype=dtype)
        out.append(LowRank(b, a, f["scale"]))
    return out


LABELS = ["tsv_m", "iso_c", "iso_cts@0.8", "iso_cts@0.5"]
KEYS = ["q.weight", "v.weight", "o.weight", "q.bias"]


def test_golden_file_records_its_provenance(golden):
    assert golden["fusion_bench"] == "0.2.33"
    assert "golden_fusionbench_spectral.py" in golden["command"]
    assert golden["runs"]["float32"]["inputs"] == golden["runs"]["float64"]["inputs"]


@pytest.mark.parametrize("label", LABELS)
@pytest.mark.parametrize("key", KEYS)
def test_float64_matches_fusionbench(golden, label, key):
    want = torch.tensor(golden["runs"]["float64"]["outputs"][label][key], dtype=torch.float64)
    got = run(label, dense_inputs(golden, "float64", key, torch.float64))
    assert got.dtype == torch.float64
    assert rel(got.tensor, want) < 1e-12


@pytest.mark.parametrize("label", LABELS)
@pytest.mark.parametrize("key", KEYS)
def test_float32_matches_fusionbench(golden, label, key):
    got = run(label, dense_inputs(golden, "float32", key, torch.float32)).tensor
    assert got.dtype == torch.float32
    exact = torch.tensor(golden["runs"]["float64"]["outputs"][label][key])
    theirs32 = torch.tensor(golden["runs"]["float32"]["outputs"][label][key])
    assert rel(got, exact) < 1e-6
    assert rel(got, theirs32) < 2e-5


def test_lora_tsv_m_equals_fusionbench_inside_the_support(golden):
    # ranks 4, 5, 4 >= floor(10 / 3) = 3: FusionBench never reaches a null-space vector here.
    want = torch.tensor(golden["lora"]["outputs"]["tsv_m"]["lora_q.weight"], dtype=torch.float64)
    got = run("tsv_m", lora_inputs(golden, "lora_q.weight"))
    assert isinstance(got, LowRank) and got.rank == 9
    assert rel(got.to_dense(torch.float64), want) < 1e-12
    got32 = run("tsv_m", lora_inputs(golden, "lora_q.weight", torch.float32))
    assert isinstance(got32, LowRank) and rel(got32.to_dense(), want) < 1e-5


def test_lora_iso_c_is_fusionbench_without_the_null_space(golden):
    # FusionBench: U diag(sum(s) / p) V^T over all p = 20 directions (11 of them arbitrary
    # null-space vectors); ours: U_rho (sum(s) / rho) V_rho^T. On our support the two differ by
    # rho / p exactly: P_U theirs P_V = (rho / p) ours.
    theirs = torch.tensor(golden["lora"]["outputs"]["iso_c"]["lora_w.weight"], dtype=torch.float64)
    ours = run("iso_c", lora_inputs(golden, "lora_w.weight"))
    assert isinstance(ours, LowRank) and ours.rank == 9
    u, _, vh = torch.linalg.svd(ours.to_dense(torch.float64))
    p_u, p_v = u[:, :9] @ u[:, :9].T, vh[:9].T @ vh[:9]
    assert rel(p_u @ theirs @ p_v, ours.to_dense(torch.float64) * 9 / 20) < 1e-12
    # ... and theirs keeps 11 directions outside the support, ours none.
    assert float((theirs - p_u @ theirs @ p_v).norm()) > 0.1 * float(theirs.norm())


@pytest.mark.parametrize("label", LABELS)
@pytest.mark.parametrize("key", ["lora_q.weight", "lora_w.weight"])
def test_lora_equals_dense_on_the_densified_deltas(golden, label, key):
    factored = lora_inputs(golden, key)
    got = run(label, factored)
    want = run(label, [Dense(d.to_dense(torch.float64)) for d in factored])
    assert isinstance(got, LowRank)
    assert rel(got.to_dense(torch.float64), want.tensor) < 1e-10


@pytest.mark.parametrize("label", LABELS)
def test_lora_result_is_independent_of_completions(golden, label):
    # Rotating the row and column spaces (orthogonal Q_l, Q_r) rotates the merge exactly: the
    # result depends only on the deltas, not on any basis chosen for their null spaces.
    g = torch.Generator().manual_seed(5)
    q_l, _ = torch.linalg.qr(torch.randn(24, 24, generator=g, dtype=torch.float64))
    q_r, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    deltas = lora_inputs(golden, "lora_w.weight")
    rotated = [LowRank(q_l @ d.b, d.a @ q_r, d.scale) for d in deltas]
    base = run(label, deltas).to_dense(torch.float64)
    assert rel(run(label, rotated).to_dense(torch.float64), q_l @ base @ q_r) < 1e-10
