"""Golden values from mergekit itself for its task-arithmetic family (starmerge issue 13).

Run with mergekit's own environment (not starmerge's), from the repository root:

    /work/venvs/mergekit/bin/python scripts/golden_mergekit_sparse.py

It builds seeded float32 tensors (a base and 3 models, for a few shapes), merges each shape with
mergekit's merge-method code through its in-memory API (``mergekit.merge_methods.api.
merge_tensors``, the same ``merge_group`` / ``merge_batch`` code ``mergekit-yaml`` runs per
tensor), and writes ``tests/golden/mergekit_sparse.json``: the inputs' values, each case's
mergekit parameters and outputs, the command and the versions.

The random methods (DARE, DELLA) draw their masks with ``torch.bernoulli(p)``; here it is
replaced, for those cases only, by ``u < p`` with uniform draws ``u`` made by this script and
stored with the case, so the outputs are exact functions of recorded values and starmerge's
kernels can be checked against them with the same draws.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from pathlib import Path

import torch
from mergekit.merge_methods.api import merge_tensors

OUT = Path(__file__).resolve().parents[1] / "tests" / "golden" / "mergekit_sparse.json"
SHAPES = {"w": (8, 6), "bias": (10,), "conv": (3, 4, 5)}
N_MODELS = 3
WEIGHTS = [1.0, 0.5, 2.0]

CASES = [  # (case name, mergekit method, mergekit parameters)
    ("linear", "linear", {"weight": WEIGHTS, "normalize": True}),
    ("linear_sum1", "linear", {"weight": [0.2, 0.3, 0.5], "normalize": False}),
    ("linear_unnormalized", "linear", {"weight": WEIGHTS, "normalize": False}),
    ("task_arithmetic", "task_arithmetic", {"weight": WEIGHTS, "lambda": 0.7}),
    ("task_arithmetic_norm", "task_arithmetic", {"weight": WEIGHTS, "normalize": True}),
    ("ties", "ties", {"weight": WEIGHTS, "density": [0.5, 0.4, 0.7]}),
    ("ties_unit", "ties", {"weight": [1.0] * 3, "density": 0.3, "lambda": 1.5}),
    (
        "ties_sum_rescale",
        "ties",
        {"weight": WEIGHTS, "density": 0.5, "normalize": False, "rescale": True},
    ),
    ("breadcrumbs", "breadcrumbs", {"weight": WEIGHTS, "density": 0.6, "gamma": 0.1}),
    (
        "breadcrumbs_permodel",
        "breadcrumbs",
        {
            "weight": WEIGHTS,
            "density": [0.5, 0.7, 0.9],
            "gamma": [0.1, 0.2, 0.05],
            "normalize": True,
            "rescale": True,
        },
    ),
    (
        "breadcrumbs_ties",
        "breadcrumbs_ties",
        {"weight": WEIGHTS, "density": 0.6, "gamma": 0.1, "lambda": 0.8},
    ),
    ("sce", "sce", {}),
    ("sce_topk", "sce", {"select_topk": 0.5}),
    ("dare_linear", "dare_linear", {"weight": WEIGHTS, "density": 0.5}),
    ("dare_ties", "dare_ties", {"weight": WEIGHTS, "density": [0.3, 0.5, 0.7]}),
    (
        "dare_ties_norm",
        "dare_ties",
        {"weight": WEIGHTS, "density": 0.4, "normalize": True, "rescale": False},
    ),
    ("della", "della", {"weight": WEIGHTS, "density": 0.5, "epsilon": 0.2}),
    (
        "della_linear",
        "della_linear",
        {"weight": WEIGHTS, "density": [0.4, 0.5, 0.6], "epsilon": [0.1, 0.2, 0.3], "lambda": 1.2},
    ),
]
RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}


def inputs() -> dict[str, list[torch.Tensor]]:
    """Per shape: [base, model_1, ..., model_T], float32, seeded."""
    gen = torch.Generator().manual_seed(1234)
    out = {}
    for key, shape in SHAPES.items():
        base = torch.randn(shape, generator=gen)
        models = [base + torch.randn(shape, generator=gen) * (0.5 + t) for t in range(N_MODELS)]
        out[key] = [base, *models]
    return out


class FixedDraws:
    """Stands in for ``torch.bernoulli``: ``u < p`` with the next recorded uniform draws."""

    def __init__(self, draws: list[torch.Tensor]):
        self.draws = list(draws)

    def __call__(self, p: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        u = self.draws.pop(0)
        assert u.numel() == p.numel(), (u.shape, p.shape)
        return (u.reshape(p.shape) < p).to(p.dtype)  # della views a 1-D tensor as (1, n)


def run_case(method: str, params: dict, tensors: list[torch.Tensor], draws) -> torch.Tensor:
    if method == "linear":  # no base: the models' full weights are averaged
        return merge_tensors(tensors[1:], method, parameters=params)
    if draws is None:
        return merge_tensors(tensors, method, parameters=params, base_index=0)
    real = torch.bernoulli
    torch.bernoulli = FixedDraws(draws)
    try:
        return merge_tensors(tensors, method, parameters=params, base_index=0)
    finally:
        torch.bernoulli = real


def main() -> None:
    data = inputs()
    gen = torch.Generator().manual_seed(99)
    cases = []
    for name, method, params in CASES:
        outputs, uniforms = {}, {}
        for key, tensors in data.items():
            draws = None
            if method in RANDOM:
                draws = [torch.rand(SHAPES[key], generator=gen) for _ in range(N_MODELS)]
                uniforms[key] = [u.tolist() for u in draws]
            outputs[key] = run_case(method, params, tensors, draws).tolist()
        case = {"name": name, "method": method, "parameters": params, "outputs": outputs}
        if uniforms:
            case["uniforms"] = uniforms
        cases.append(case)
    golden = {
        "command": "/work/venvs/mergekit/bin/python scripts/golden_mergekit_sparse.py",
        "api": "mergekit.merge_methods.api.merge_tensors(tensors, method, parameters=..., "
        "base_index=0) per tensor (linear: the 3 models, no base)",
        "random_draws": "torch.bernoulli(p) replaced by (u < p) with the case's stored uniforms, "
        "in call order: per tensor, model 1..3",
        "versions": {
            "mergekit": version("mergekit"),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "dtype": "float32",
        "shapes": {k: list(s) for k, s in SHAPES.items()},
        "inputs": {k: [t.tolist() for t in ts] for k, ts in data.items()},
        "cases": cases,
    }
    OUT.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {OUT} ({len(cases)} cases)")


if __name__ == "__main__":
    main()
