"""Our interpolation methods against mergekit 0.1.5's own outputs (``mergekit_interp.json``).

The file is rebuilt by ``/work/venvs/mergekit/bin/python scripts/golden_mergekit_interp.py``
(mergekit's ``merge_tensors`` on seeded float32 weights; see the script). Each case gives
mergekit a base and models (weights); here the same weights become starmerge's inputs: the base
model's tensors and the task deltas ``model - base`` (float32), merged through
``starmerge.api.merge_deltas``, and ``base + merged delta`` is compared with mergekit's output.

Role mapping (``docs/methods_mergekit.md``): mergekit's ``base_model`` is our base model;
for ``slerp`` between two models (mergekit's base_model is the first) both become our models;
``karcher`` (no base_model in mergekit) averages our models, the base only recovers weights;
a mergekit karcher config that names a base_model counts it as one more point, which our
config reproduces by listing the base as one more model (a zero task delta).

Tolerance: |ours - mergekit| <= 2e-6 + 1e-5 |mergekit| per entry. Both compute in float32;
ours forms the result in delta form from a float64-combined Gram matrix, mergekit combines
the weights directly, so entries (of size about 1-3) differ by float32 rounding (observed
at most 6e-7). The masks (arcee_fusion, ram, nearswap's clamp) must select the same entries.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from starmerge.api import merge_deltas
from starmerge.tensors.delta import Dense

DATA = Path(__file__).parent / "mergekit_interp.json"
DOC = json.loads(DATA.read_text())
METHODS = {"slerp", "nuslerp", "multislerp", "karcher", "model_stock"}
METHODS |= {"nearswap", "arcee_fusion", "ram"}


def test_the_golden_file_covers_every_method_and_records_its_provenance():
    assert {case["method"] for case in DOC["cases"]} == METHODS
    assert DOC["mergekit_version"] == "0.1.5"
    assert DOC["command"].endswith("scripts/golden_mergekit_interp.py")


@pytest.mark.parametrize("case", DOC["cases"], ids=[c["case"] for c in DOC["cases"]])
def test_matches_mergekit(case):
    sets = DOC["inputs"][case["regime"]]
    base = {k: torch.tensor(v) for k, v in sets["base"].items()}
    names = ["base" if i == "base" else f"model{i}" for i in case["starmerge_models"]]
    tasks = [{k: Dense(torch.tensor(v) - base[k]) for k, v in sets[n].items()} for n in names]
    params = dict(case["parameters"])
    weights = params.pop("weight", None)  # mergekit's per-model weight -> our weights
    out = merge_deltas(case["method"], tasks, params, weights=weights, base=base)
    for key, value in case["output"].items():
        want = torch.tensor(value, dtype=torch.float64)
        got = base[key].double() + out.deltas[key].to_dense(torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6, msg=f"{case['case']} {key}")
