"""Build tests/golden/fusionbench_spectral.json from FusionBench's own TSV-M, Iso-C and Iso-CTS.

Usage (FusionBench installed in its own environment; this script does not import starmerge):
    /work/venvs/fusionbench/bin/python scripts/golden_fusionbench_spectral.py \
        [--out tests/golden/fusionbench_spectral.json]

Fixtures: 3 seeded full-rank dense task vectors (torch.randn, generator seed 0) for the
parameters ``q.weight`` (12 x 10), ``v.weight`` (10 x 12), ``o.weight`` (16 x 16) and the 1-D
``q.bias`` (10,), with per-task scales 1, 0.5 and 2 so the spectra differ. Each fixture is run in
float32 (FusionBench's usual dtype) and float64 (where FusionBench's SVDs are float64 too, so
the comparison is tight). The functions called are exactly FusionBench's:
- ``fusion_bench.method.task_singular_vector.utils.TSVM_utils.compute_and_sum_svd_mem_reduction``
  (TSV-M, sv_reduction = 1/T; the algorithm class then multiplies by ``alpha``),
- ``fusion_bench.method.isotropic_merging.iso_utils.iso_c`` and ``iso_cts``
  (``common_space_fraction`` 0.8 and 0.5; the algorithm classes multiply by ``scaling_factor``).
They take state dicts of task vectors, so no model object is needed.

LoRA fixtures (``lora``, float64, seed 1): per task factors B_t (out x r_t), A_t (r_t x in) and
an rsLoRA-like scale alpha / sqrt(r_t), densified as scale * B_t @ A_t in float64 and given to
FusionBench's TSV-M and Iso-C: ``lora_q.weight`` (12 x 10, ranks 4, 5, 4: TSV-M's
floor(10 / 3) = 3 directions per task stay inside each task's support, so FusionBench's result
is well defined and ours must equal it) and ``lora_w.weight`` (24 x 20, ranks 3, 2, 4: the sum
has rank 9 < 20, so FusionBench's Iso-C averages 11 zero singular values in and keeps 11
arbitrary null-space directions; the test checks the documented relation instead).
The JSON holds the input values, the outputs, the exact command and the versions.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shlex
import sys
from pathlib import Path

import torch
from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
from fusion_bench.method.task_singular_vector.utils.TSVM_utils import (
    compute_and_sum_svd_mem_reduction,
)

SEED = 0
SHAPES = {"q.weight": (12, 10), "v.weight": (10, 12), "o.weight": (16, 16), "q.bias": (10,)}
TASK_SCALES = [1.0, 0.5, 2.0]
COMMON_FRACTIONS = [0.8, 0.5]
DTYPES = {"float32": torch.float32, "float64": torch.float64}
LORA_SEED = 1
LORA = {"lora_q.weight": ((12, 10), [4, 5, 4]), "lora_w.weight": ((24, 20), [3, 2, 4])}
LORA_ALPHA = 8.0


def task_vectors(dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    """The seeded task vectors (same values for both dtypes: drawn in float32, then cast)."""
    g = torch.Generator().manual_seed(SEED)
    tvs = []
    for scale in TASK_SCALES:
        tvs.append({k: (torch.randn(s, generator=g) * scale).to(dtype) for k, s in SHAPES.items()})
    return tvs


def as_lists(state: dict[str, torch.Tensor]) -> dict[str, list]:
    return {k: v.detach().cpu().to(torch.float64).tolist() for k, v in state.items()}


def run_all(dtype: torch.dtype) -> dict[str, dict]:
    """FusionBench's outputs for one dtype: method label -> parameter -> values."""
    tvs = task_vectors(dtype)
    outputs = {
        "tsv_m": compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu"),
        "iso_c": iso_c(tvs, accelerator="cpu"),
    }
    for frac in COMMON_FRACTIONS:
        outputs[f"iso_cts@{frac}"] = iso_cts(tvs, common_space_fraction=frac, accelerator="cpu")
    return {
        "inputs": [as_lists(tv) for tv in tvs],
        "outputs": {name: as_lists(out) for name, out in outputs.items()},
    }


def run_lora() -> dict[str, dict]:
    """LoRA factors (float64) and FusionBench's TSV-M and Iso-C on their dense products."""
    g = torch.Generator().manual_seed(LORA_SEED)
    factors: list[dict[str, dict]] = [{} for _ in TASK_SCALES]
    for key, ((m, n), ranks) in LORA.items():
        for t, r in enumerate(ranks):
            b = torch.randn(m, r, generator=g, dtype=torch.float64)
            a = torch.randn(r, n, generator=g, dtype=torch.float64)
            factors[t][key] = {"b": b, "a": a, "scale": LORA_ALPHA / r**0.5}
    tvs = [{k: f["scale"] * f["b"] @ f["a"] for k, f in task.items()} for task in factors]
    outputs = {
        "tsv_m": compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu"),
        "iso_c": iso_c(tvs, accelerator="cpu"),
    }
    inputs = [
        {
            k: {"b": f["b"].tolist(), "a": f["a"].tolist(), "scale": f["scale"]}
            for k, f in task.items()
        }
        for task in factors
    ]
    return {"inputs": inputs, "outputs": {name: as_lists(out) for name, out in outputs.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/golden/fusionbench_spectral.json")
    args = parser.parse_args()
    data = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "fusion_bench": importlib.metadata.version("fusion_bench"),
        "torch": torch.__version__,
        "seed": SEED,
        "shapes": {k: list(v) for k, v in SHAPES.items()},
        "task_scales": TASK_SCALES,
        "functions": {
            "tsv_m": "fusion_bench.method.task_singular_vector.utils.TSVM_utils."
            "compute_and_sum_svd_mem_reduction(task_vectors, accelerator='cpu')",
            "iso_c": "fusion_bench.method.isotropic_merging.iso_utils.iso_c("
            "task_vectors, accelerator='cpu')",
            "iso_cts@F": "fusion_bench.method.isotropic_merging.iso_utils.iso_cts("
            "task_vectors, common_space_fraction=F, accelerator='cpu')",
        },
        "runs": {name: run_all(dtype) for name, dtype in DTYPES.items()},
        "lora": run_lora(),
    }
    Path(args.out).write_text(json.dumps(data) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
