"""Golden values for ``wudi`` and ``cart`` from the peers' own code, on small dense fixtures.

Usage (in an environment with FusionBench installed, not starmerge's):
    /work/venvs/fusionbench/bin/python scripts/golden_fusionbench_wudi.py \\
        --cart-repo PATH/TO/JH-GEECS-CART --core-space-repo PATH/TO/core-space-merging \\
        [--out tests/golden/fusionbench_wudi_cart.json]

Each repo path is a checkout or a git directory (read at HEAD with ``git show``); nothing of
them is copied into starmerge: the functions are read from the repo at run time into this
process only.

- WUDI: ``fusion_bench.method.wudi.wudi.wudi_merging`` (FusionBench's own code: Adam, lr 1e-5
  fixed, from the sum of the task vectors; non-matrix parameters averaged), ``iter_num`` 50 on
  CPU. The fixtures' entries are ~1e-3, as real task vectors, so 50 steps of lr 1e-5 move the
  result measurably from its start (the test checks that it does).
- CART: FusionBench has no CART. The paper's code (JH-GEECS/CART ``src/merging.py``,
  ``StaticMergeModule._merge_weights("CART")`` with ``_get_origin`` and
  ``_get_truncated_task_vectors``; its module imports ray, wandb, open_clip, so the three methods
  are taken from the file with ``ast`` and bound to a stand-in holding the config, the "pretrained"
  state dict and its ``TaskVector`` objects from ``src/models/task_vectors.py``) and
  core-space-merging's ``TaskMerger.get_cart_delta_w`` (same ``ast`` route; it is a method that
  does not use ``self``). The paper's code truncates only keys containing ``attn``/``mlp`` (not
  ``ln``/``bias``): the 2-D fixture keys are named so. core-space-merging takes ``ceil`` of
  ``rank * min(m, n)``: it is only run where that product is an integer.

The JSON holds the command line, versions and repo commits, the fixtures (float32 values) and the
outputs (merged task vectors, i.e. merged state minus the base).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import platform
import shlex
import subprocess
import sys
import tempfile
import textwrap
import types
import typing
from copy import deepcopy
from importlib.metadata import version
from pathlib import Path

import fusion_bench
import numpy as np
import torch
import tqdm
from fusion_bench.method.wudi.wudi import wudi_merging

SEED = 0
N_TASKS = 3
SHAPES = {
    "blocks.0.attn.in_proj_weight": (12, 8),
    "blocks.0.mlp.c_fc.weight": (16, 20),
    "blocks.0.attn.in_proj_bias": (12,),
    "blocks.0.ln_1.weight": (8,),
}
ENTRY_SCALE = 1e-3  # task-vector-sized entries
WUDI_ITERS = 50
CART_PAPER = [(0.12, 2.0), (0.25, 1.5), (0.5, 0.7)]  # (rank_fraction, scaling); first: defaults
CART_CORE = [(0.25, 1.5), (0.5, 0.7)]  # rank * min(m, n) integral for every matrix


def fixtures() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A zero "pretrained" state dict and T seeded full-rank float32 task vectors.

    The base is zero so that the paper's code (which adds the task vectors to it and returns
    merged weights) loses no precision when the base is subtracted again.
    """
    g = torch.Generator().manual_seed(SEED)
    base = {k: torch.zeros(s) for k, s in SHAPES.items()}
    tvs = [
        {k: torch.randn(s, generator=g) * ENTRY_SCALE for k, s in SHAPES.items()}
        for _ in range(N_TASKS)
    ]
    return base, tvs


def read_repo_file(repo: Path, path: str) -> str:
    """A file of a checkout, or of a git directory's HEAD."""
    if (repo / path).exists():
        return (repo / path).read_text()
    return subprocess.run(
        ["git", "-C", str(repo), "show", f"HEAD:{path}"], check=True, capture_output=True, text=True
    ).stdout


def repo_commit(repo: Path) -> str:
    cmd = ["git", "-C", str(repo), "rev-parse", "HEAD"]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def functions_from(source: str, names: set[str], namespace: dict) -> dict:
    """Execute only the ``def``s called ``names`` (at any depth) of ``source`` in ``namespace``."""
    found = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name in names:
            code = textwrap.dedent(ast.get_source_segment(source, node, padded=True))
            exec(compile(code, f"<{node.name}>", "exec"), namespace)  # noqa: S102
            found[node.name] = namespace[node.name]
    missing = names - set(found)
    if missing:
        raise SystemExit(f"error: functions {sorted(missing)} not found in the reference file")
    return found


def wudi_golden(tvs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    merged = wudi_merging(deepcopy(tvs), accelerator="cpu", iter_num=WUDI_ITERS)
    return {k: v.detach().clone() for k, v in merged.items()}


def cart_paper(repo: Path, base, tvs, rank_fraction: float, prior: float):
    """JH-GEECS/CART's own CART merge; returns merged state minus base."""
    with tempfile.TemporaryDirectory() as tmp:
        tv_file = Path(tmp) / "task_vectors.py"
        tv_file.write_text(read_repo_file(repo, "src/models/task_vectors.py"))
        module = types.ModuleType("cart_task_vectors")
        exec(compile(tv_file.read_text(), str(tv_file), "exec"), module.__dict__)  # noqa: S102
    namespace = {
        "torch": torch,
        "np": np,
        "tqdm": tqdm.tqdm,
        "deepcopy": deepcopy,
        "CPU_DEVICE": "cpu",
        "TaskVector": module.TaskVector,
        "OmegaConf": None,  # only the discrete-rank path uses it
        "List": list,
        "Optional": typing.Optional,
        "Union": typing.Union,
        "Dict": dict,
    }
    names = {"_get_truncated_task_vectors", "_get_origin", "_merge_weights"}
    methods = functions_from(read_repo_file(repo, "src/merging.py"), names, namespace)
    stand_in = type("StaticMergeStandIn", (), methods)()
    stand_in.config = types.SimpleNamespace(
        tasks=[f"task{t}" for t in range(len(tvs))],
        prior=prior,
        initial_rank_ratio=rank_fraction,
        device="cpu",
    )
    stand_in.device = "cpu"
    stand_in.pretrained_model = types.SimpleNamespace(state_dict=lambda: deepcopy(base))
    stand_in.task_vectors = [module.TaskVector(vector=deepcopy(tv)) for tv in tvs]
    stand_in._merge_weights("CART")
    return {k: stand_in._merged_state_dict[k] - base[k] for k in base}


def cart_core_space(repo: Path, tvs, rank_fraction: float, scaling: float):
    """core-space-merging's ``get_cart_delta_w`` per parameter (float64 SVD, ceil rank)."""
    source = read_repo_file(repo, "task_merger.py")
    fn = functions_from(source, {"get_cart_delta_w"}, {"torch": torch, "math": math})
    fn = fn["get_cart_delta_w"]
    matrices = [k for k, shape in SHAPES.items() if len(shape) == 2]  # it is run on matrices only
    return {k: fn(None, [tv[k] for tv in tvs], rank_fraction, scaling) for k in matrices}


def as_json(tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    return {k: v.to(torch.float32).tolist() for k, v in tensors.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cart-repo", type=Path, required=True)
    parser.add_argument("--core-space-repo", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("tests/golden/fusionbench_wudi_cart.json"))
    args = parser.parse_args(argv)
    base, tvs = fixtures()
    record = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "fusion_bench": getattr(fusion_bench, "__version__", None) or version("fusion_bench"),
            "JH-GEECS/CART": repo_commit(args.cart_repo),
            "apanariello4/core-space-merging": repo_commit(args.core_space_repo),
        },
        "seed": SEED,
        "shapes": {k: list(s) for k, s in SHAPES.items()},
        "inputs": [as_json(tv) for tv in tvs],
        "wudi": {"params": {"solver": "adam", "steps": WUDI_ITERS, "lr": 1e-5}},
        "cart_paper": [],
        "cart_core_space": [],
    }
    record["wudi"]["output"] = as_json(wudi_golden(tvs))
    for rank_fraction, scaling in CART_PAPER:
        out = cart_paper(args.cart_repo, base, tvs, rank_fraction, scaling)
        params = {"rank_fraction": rank_fraction, "scaling": scaling}
        record["cart_paper"].append({"params": params, "output": as_json(out)})
    for rank_fraction, scaling in CART_CORE:
        out = cart_core_space(args.core_space_repo, tvs, rank_fraction, scaling)
        params = {"rank_fraction": rank_fraction, "scaling": scaling}
        record["cart_core_space"].append({"params": params, "output": as_json(out)})
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in record.items()]  # one key a line
    args.out.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
