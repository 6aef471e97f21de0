"""Build tests/golden/core_space.json from the Core Space reference code and its KnOTS paths.

Usage (the reference needs torch, tqdm and einops; this script does not import starmerge):
    /work/venvs/fusionbench/bin/python scripts/golden_core_space.py \
        [--repo /work/.mirror/apanariello4+core-space-merging/repo] \
        [--out tests/golden/core_space.json]

``--repo`` is a git directory of apanariello4/core-space-merging (the Core Space paper's code,
built on KnOTS's). Its ``task_merger.py``, ``merging_functions.py``, ``masking_ops.py`` and
``ft_handlers.py`` are extracted with ``git archive`` into a temporary directory and imported
from there, unchanged. Their ``utils.py`` imports CLIP, PEFT, transformers and scikit-learn at
the top; ``task_merger`` only needs its ``get_mask_fn``, so that one function's source is
compiled out of ``utils.py`` into a stand-in ``utils`` module. Nothing of theirs is copied into
starmerge.

The merges are the reference's own classes on a one-layer model (a zero float64 base weight per
fixture, LoRA state dicts through their ``LoRAHandler``), so the output is their merged delta:
- ``MatrixPerLayerMerger`` (Core Space's code), ``merge_space`` ``core`` (cores
  U_B^T B_t A_t V_A in the SVD bases of the stacked factors, float64) and ``knots`` (coordinates
  V_t^T of the SVD of the stacked deltas, float32 after a float64 SVD), with ``merge_method``
  ``tv``, ``mean``, ``ties`` (their ``topK`` %), ``tsv``, ``cart`` and ``tv`` + ``isotropize``;
- ``SVDMerger`` (KnOTS's own code path: coordinates S V_t^T, ``ties_masking`` / ``tv_masking``
  and ``masked_merge``, float32).
Their ``scaling_coeffs`` multiply the result (chosen exact in float32: the reference stores them
as a float32 tensor). For TIES runs the file also records how many entries per task their
``topk_values_mask`` keeps (``int(N * K) + 1``, not ``int(N * K)``).

Fixtures (float64, torch.randn, generator seed 0), 3 tasks, parameter -> (shape, ranks, scales):
``w`` (24 x 20, ranks 4/4/2, LoRA scales 2/2/4), ``e`` (20 x 24, ranks 4/4/4, scales 4/1/2: every
task's rank is at least R / T, where the reference TSV is well defined), ``dup`` (24 x 20, task 3
is the first two directions of task 1: the stacks have rank 8 < T r = 10) and ``tiny`` (24 x 20,
scales 1e-4/1e-4/1e-7: some stacked singular values fall under the reference's absolute 1e-5
cut). The reference ignores the LoRA scale (it stacks the stored factors); the runs marked
``folded`` give it s_t B_t (the true delta), ``stored`` the factors as stored.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.metadata
import inspect
import io
import json
import shlex
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import torch
from torch import nn

REPO = "/work/.mirror/apanariello4+core-space-merging/repo"
FILES = ["task_merger.py", "merging_functions.py", "masking_ops.py", "ft_handlers.py", "utils.py"]
SEED = 0
F64 = torch.float64
# name -> (shape (m, n), ranks, LoRA scales); ``dup`` makes task 3 a copy of task 1's first two.
FIXTURES = {
    "w": ((24, 20), [4, 4, 2], [2.0, 2.0, 4.0]),
    "e": ((20, 24), [4, 4, 4], [4.0, 1.0, 2.0]),
    "dup": ((24, 20), [4, 4, 2], [1.0, 1.0, 1.0]),
    "tiny": ((24, 20), [4, 4, 2], [1e-4, 1e-4, 1e-7]),
}
# (merger, space, merge_config, scaling_coeffs, fixtures, factors)
RUNS = [
    ("matrix", "core", {"merge_method": "tv"}, 0.75, ["w", "e", "dup", "tiny"], "folded"),
    ("matrix", "core", {"merge_method": "mean"}, 1.0, ["w"], "folded"),
    ("matrix", "core", {"merge_method": "ties", "topK": 10}, 1.0, ["w", "dup"], "folded"),
    ("matrix", "core", {"merge_method": "ties", "topK": 30}, 0.5, ["w"], "folded"),
    ("matrix", "core", {"merge_method": "ties", "topK": 20}, 1.0, ["e"], "folded"),
    (
        "matrix",
        "core",
        {"merge_method": "tv", "isotropize": True},
        0.5,
        ["w", "e", "dup"],
        "folded",
    ),
    ("matrix", "core", {"merge_method": "tsv"}, 0.5, ["e"], "folded"),
    (
        "matrix",
        "core",
        {"merge_method": "cart", "cart_pruning_rank": 0.2, "cart_scaling_coeffs": 0.5},
        1.0,
        ["w", "e", "dup"],
        "folded",
    ),
    ("matrix", "core", {"merge_method": "tv"}, 0.75, ["w"], "stored"),
    ("matrix", "core", {"merge_method": "ties", "topK": 10}, 1.0, ["w"], "stored"),
    ("matrix", "knots", {"merge_method": "tv"}, 0.75, ["w", "e", "dup", "tiny"], "folded"),
    ("matrix", "knots", {"merge_method": "mean"}, 1.0, ["w"], "folded"),
    ("matrix", "knots", {"merge_method": "ties", "topK": 10}, 1.0, ["w", "dup"], "folded"),
    ("matrix", "knots", {"merge_method": "ties", "topK": 30}, 0.5, ["w"], "folded"),
    ("matrix", "knots", {"merge_method": "ties", "topK": 20}, 1.0, ["e"], "folded"),
    ("matrix", "knots", {"merge_method": "tsv"}, 0.5, ["e"], "folded"),
    (
        "matrix",
        "knots",
        {"merge_method": "cart", "cart_pruning_rank": 0.2, "cart_scaling_coeffs": 0.5},
        1.0,
        ["w", "e"],
        "folded",
    ),
    ("matrix", "knots", {"merge_method": "tv"}, 0.75, ["w"], "stored"),
    (
        "svd",
        "knots",
        {"merge_method": "tv", "topK": 100, "merging_type": "sum"},
        0.75,
        ["w", "tiny"],
        "folded",
    ),
    (
        "svd",
        "knots",
        {"merge_method": "ties", "topK": 10, "merging_type": "mean"},
        1.0,
        ["w"],
        "folded",
    ),
    (
        "svd",
        "knots",
        {"merge_method": "ties", "topK": 30, "merging_type": "mean"},
        0.5,
        ["w"],
        "folded",
    ),
    (
        "svd",
        "knots",
        {"merge_method": "ties", "topK": 20, "merging_type": "mean"},
        1.0,
        ["e"],
        "folded",
    ),
]


def load_reference(git_dir: str, workdir: Path) -> tuple[dict[str, types.ModuleType], str]:
    """Extract the reference files at HEAD into ``workdir`` and import them from there."""
    git = ["git", f"--git-dir={git_dir}"]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, check=True, text=True)
    commit = commit.stdout.strip()
    tar = subprocess.run([*git, "archive", commit, *FILES], capture_output=True, check=True).stdout
    tarfile.open(fileobj=io.BytesIO(tar)).extractall(workdir, filter="data")
    sys.path.insert(0, str(workdir))
    sys.modules["utils"] = utils_stand_in(workdir / "utils.py")
    names = ["task_merger", "merging_functions", "masking_ops", "ft_handlers"]
    return {name: importlib.import_module(name) for name in names}, commit


def utils_stand_in(path: Path) -> types.ModuleType:
    """A ``utils`` module holding only the reference's own ``get_mask_fn`` (compiled from it)."""
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_mask_fn")
    module = types.ModuleType("utils")
    module.getmembers, module.isfunction = inspect.getmembers, inspect.isfunction
    code = compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec")
    exec(code, module.__dict__)  # noqa: S102 - the reference's own function, run as written
    return module


def fixtures() -> dict[str, list[dict]]:
    """Per fixture, per task: ``b`` (m, r), ``a`` (r, n), ``scale`` (float64 factors)."""
    g = torch.Generator().manual_seed(SEED)
    out = {}
    for name, ((m, n), ranks, scales) in FIXTURES.items():
        tasks = []
        for r, s in zip(ranks, scales, strict=True):
            b = torch.randn(m, r, generator=g, dtype=F64)
            a = torch.randn(r, n, generator=g, dtype=F64)
            tasks.append({"b": b, "a": a, "scale": s})
        if name == "dup":  # task 3 = task 1's first two directions: rank-deficient stacks
            tasks[2]["b"], tasks[2]["a"] = tasks[0]["b"][:, :2].clone(), tasks[0]["a"][:2].clone()
        out[name] = tasks
    return out


class Layer(nn.Module):
    """A zero float64 weight with (zero) LoRA modules, as their handler expects of the base."""

    def __init__(self, m: int, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(m, n, dtype=F64))
        self.lora_A = nn.Linear(n, 1, bias=False, dtype=F64)
        self.lora_B = nn.Linear(1, m, bias=False, dtype=F64)
        nn.init.zeros_(self.lora_A.weight)
        nn.init.zeros_(self.lora_B.weight)


def base_model(name: str, shape: tuple[int, int]) -> nn.Module:
    model = nn.Module()
    setattr(model, name, Layer(*shape))
    return model


def lora_state_dicts(name: str, tasks: list[dict], factors: str) -> list[dict]:
    """PEFT-style LoRA state dicts; ``folded``: B holds the scale (the true delta is B A)."""
    out = []
    for t in tasks:
        b = t["b"] * t["scale"] if factors == "folded" else t["b"]
        out.append({f"{name}.lora_A.weight": t["a"].clone(), f"{name}.lora_B.weight": b.clone()})
    return out


def kept_counts(ref: dict, coords: list[torch.Tensor], top_k: float) -> list[int]:
    """How many entries per task the reference's ``topk_values_mask`` keeps."""
    stacked = torch.vstack([c.flatten() for c in coords])
    mask = ref["merging_functions"].topk_values_mask(stacked, K=top_k, return_mask=True)[2]
    return [int(x) for x in mask.sum(dim=1)]


def run_one(ref: dict, run: tuple, name: str, tasks: list[dict]) -> dict:
    """One reference merge of one fixture; its merged delta and what the coordinates were."""
    merger_kind, space, config, coeff, _, factors = run
    config = {"merge_space": space, **config}
    shape = FIXTURES[name][0]
    sds = lora_state_dicts(name, tasks, factors)
    handler = ref["ft_handlers"].LoRAHandler
    key = f"{name}.weight"
    info: dict = {}
    if merger_kind == "matrix":
        merger = ref["task_merger"].MatrixPerLayerMerger(sds, base_model(name, shape), handler)
        merger.set_scaling_coeffs(coeff)
        merged = merger.merge(config)
        coords = merger.cache[key][0] if space == "core" else merger.cache[key][2]
        delta = getattr(merged, name).weight.detach()
    else:
        config = {**config, "concat_across_output": True}
        merger = ref["task_merger"].SVDMerger(sds, base_model(name, shape), handler)
        merger.set_scaling_coeffs(coeff)
        merger.transform(config)
        merged = merger.merge(config)
        coords = [sv[name] for sv in merger.ingredients["task_sVs"]]
        delta = getattr(merged, name).weight.detach()
    info["coord_shape"] = list(coords[0].shape)
    if config["merge_method"] == "ties":
        info["kept"] = kept_counts(ref, list(coords), config["topK"])
    method = config["merge_method"] + (f"@{config['topK']}" if "topK" in config else "")
    method += "+iso" if config.get("isotropize") else ""
    suffix = "" if factors == "folded" else f".{factors}"
    return {
        "id": f"{merger_kind}.{space}.{method}.{name}{suffix}",
        "merger": {"matrix": "MatrixPerLayerMerger", "svd": "SVDMerger"}[merger_kind],
        "space": space,
        "merge_config": config,
        "scaling_coeffs": coeff,
        "fixture": name,
        "factors": factors,
        **info,
        "output": delta.to(F64).tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=REPO, help="git dir of apanariello4/core-space-merging")
    parser.add_argument("--out", default="tests/golden/core_space.json")
    args = parser.parse_args()
    torch.manual_seed(SEED)
    data = fixtures()
    with tempfile.TemporaryDirectory() as tmp:
        ref, commit = load_reference(args.repo, Path(tmp))
        runs = [run_one(ref, run, name, data[name]) for run in RUNS for name in run[4]]
    out = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "repo": "apanariello4/core-space-merging",
        "commit": commit,
        "files": FILES[:-1] + ["utils.py (get_mask_fn only)"],
        "torch": torch.__version__,
        "einops": importlib.metadata.version("einops"),
        "seed": SEED,
        "fixtures": {
            name: [{"b": t["b"].tolist(), "a": t["a"].tolist(), "scale": t["scale"]} for t in tasks]
            for name, tasks in data.items()
        },
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(out) + "\n")
    print(f"wrote {args.out}: {len(runs)} runs from {out['repo']}@{commit}")


if __name__ == "__main__":
    main()
