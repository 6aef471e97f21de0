"""Golden values from mergekit itself for its interpolation family (starmerge issue 13).

Run with mergekit's own environment (not starmerge's), from the repository root:

    /work/venvs/mergekit/bin/python scripts/golden_mergekit_interp.py

It builds seeded float32 weights (a base and 3 models = base + task vector, for a matrix, a
1-D tensor and a 3-D tensor) in three regimes (``far``: task vectors about half the base's size,
so SLERP takes its spherical branch; ``near``: small task vectors, the near-parallel linear
branch; ``sparse``: task vectors with many exact zeros and overlaps, for RAM), merges each tensor
with mergekit's own merge-method code through its in-memory API
(``mergekit.merge_methods.api.merge_tensors``: the same ``merge_group`` / ``merge_batch`` code
``mergekit-yaml`` runs per tensor), and writes ``tests/golden/mergekit_interp.json``: the inputs'
values, each case's mergekit inputs (which models, which is the base) and parameters, the
outputs, the command and the versions.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from pathlib import Path

import torch
from mergekit.merge_methods.api import merge_tensors

OUT = Path(__file__).resolve().parents[1] / "tests" / "golden" / "mergekit_interp.json"
SHAPES = {"w": (12, 10), "bias": (10,), "conv": (3, 4, 5)}
REGIMES = {"far": 0.6, "near": 0.01, "sparse": 0.5}  # task-vector scale relative to the base
N_MODELS = 3

# (case, mergekit method, regime, mergekit inputs, mergekit parameters[, starmerge models]).
# Inputs: "base" and model indices; the first listed is mergekit's base_model where the case
# has one ("base" or, for slerp between two models, model 0), None: no base_model. Starmerge's
# task models default to the other inputs (the base is our base_model); "base" among them is a
# model whose task delta is zero (karcher counts mergekit's base_model as one more point).
CASES = [
    ("slerp_t03", "slerp", "far", ["base", 0], {"t": 0.3}),
    ("slerp_t08", "slerp", "far", ["base", 1], {"t": 0.8}),
    ("slerp_near", "slerp", "near", ["base", 0], {"t": 0.4}),
    ("slerp_two_models", "slerp", "far", [0, 1], {"t": 0.35}),
    ("slerp_two_models_near", "slerp", "near", [1, 2], {"t": 0.5}),
    ("nuslerp", "nuslerp", "far", ["base", 0, 1], {"weight": [1.0, 2.0]}),
    (
        "nuslerp_rows",
        "nuslerp",
        "far",
        ["base", 1, 2],
        {"weight": [0.7, 0.3], "nuslerp_flatten": False},
    ),
    (
        "nuslerp_row_wise",
        "nuslerp",
        "far",
        ["base", 0, 2],
        {"weight": [1.0, 1.0], "nuslerp_flatten": False, "nuslerp_row_wise": True},
    ),
    ("multislerp", "multislerp", "far", ["base", 0, 1, 2], {"weight": [1.0, 2.0, 3.0]}),
    (
        "multislerp_raw",
        "multislerp",
        "far",
        ["base", 0, 1, 2],
        {"weight": [0.5, 0.3, 0.4], "normalize_weights": False},
    ),
    ("multislerp_two", "multislerp", "near", ["base", 1, 2], {"weight": [0.25, 0.75]}),
    ("karcher", "karcher", "far", [None, 0, 1, 2], {}),
    ("karcher_iter3", "karcher", "far", [None, 0, 1, 2], {"max_iter": 3, "tol": 1e-4}),
    ("karcher_two_near", "karcher", "near", [None, 0, 2], {}),
    ("karcher_with_base_model", "karcher", "far", ["base", 0, 1], {}, ["base", 0, 1]),
    ("model_stock", "model_stock", "far", ["base", 0, 1, 2], {}),
    ("model_stock_filter", "model_stock", "far", ["base", 0, 1, 2], {"filter_wise": True}),
    ("model_stock_two", "model_stock", "near", ["base", 1, 2], {}),
    ("nearswap", "nearswap", "far", ["base", 0], {"t": 0.3}),
    ("nearswap_small", "nearswap", "near", ["base", 1], {"t": 0.004}),
    ("arcee_fusion", "arcee_fusion", "far", ["base", 0], {}),
    ("arcee_fusion_sparse", "arcee_fusion", "sparse", ["base", 2], {}),
    ("ram", "ram", "sparse", ["base", 0, 1, 2], {}),
    ("ram_eps", "ram", "sparse", ["base", 0, 1], {"epsilon": 0.05}),
    ("ram_far", "ram", "far", ["base", 0, 1, 2], {}),
]


def fixtures() -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """Per regime: ``{"base": {key: tensor}, "model0": ..., ...}``, float32, seeded."""
    g = torch.Generator().manual_seed(13)
    out = {}
    for regime, scale in REGIMES.items():
        base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
        sets = {"base": base}
        for m in range(N_MODELS):
            models = {}
            for key, shape in SHAPES.items():
                tau = torch.randn(shape, generator=g) * scale
                if regime == "sparse":  # about half the entries unchanged per model
                    tau = tau * (torch.rand(shape, generator=g) < 0.5)
                models[key] = base[key] + tau
            sets[f"model{m}"] = models
        out[regime] = sets
    return out


def run_case(method, inputs, params, tensors):
    """Merge each tensor key with mergekit; the first input is the base unless it is None."""
    out = {}
    names = ["base" if i == "base" else f"model{i}" for i in inputs if i is not None]
    base_index = None if inputs[0] is None else 0
    for key in SHAPES:
        group = [tensors[name][key] for name in names]
        out[key] = merge_tensors(group, method, parameters=params, base_index=base_index)
    return out


def main() -> None:
    data = fixtures()
    cases = []
    for case, method, regime, inputs, params, *ours in CASES:
        merged = run_case(method, inputs, params, data[regime])
        cases.append(
            {
                "case": case,
                "method": method,
                "regime": regime,
                "inputs": inputs,
                "starmerge_models": ours[0]
                if ours
                else [i for i in inputs if i not in (None, "base")],
                "parameters": params,
                "output": {k: v.tolist() for k, v in merged.items()},
            }
        )
    doc = {
        "command": "/work/venvs/mergekit/bin/python scripts/golden_mergekit_interp.py",
        "argv": sys.argv,
        "mergekit_version": version("mergekit"),
        "torch_version": torch.__version__,
        "api": "mergekit.merge_methods.api.merge_tensors (one TensorGroup per tensor)",
        "shapes": {k: list(s) for k, s in SHAPES.items()},
        "inputs": {
            regime: {name: {k: v.tolist() for k, v in ts.items()} for name, ts in sets.items()}
            for regime, sets in data.items()
        },
        "cases": cases,
    }
    OUT.write_text(json.dumps(doc) + "\n")
    print(f"wrote {OUT} ({len(cases)} cases)")


if __name__ == "__main__":
    main()
