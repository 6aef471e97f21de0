"""Build tests/golden/seed_merges.safetensors from the seed code (IBM/STAR ``merger/*.py``).

Usage:
    python scripts/make_golden.py --star-repo PATH/TO/IBM-STAR [--out tests/golden]

PATH is a checkout of https://github.com/IBM/STAR (read at e6bfcf70). The script builds small
seeded LoRA-like fixtures (3 tasks; modules 16x12, 12x16 and 16x16 with ranks 4/4/2 and
different scales, fp32), forms the dense task vectors tau = (B @ A) * scale exactly as
``LowRank.to_dense`` does, runs IBM's merger functions on them, and stores inputs (factors and
dense deltas) and outputs in ``seed_merges.safetensors`` plus ``seed_merges.json`` (the exact
command line, the IBM commit, torch version, scales, MetaGPT lambdas).

Known seed behaviours the golden test must allow for (tolerances are set from these):
- STAR (``merger/STAR.py star()``, full-SVD path, ``known_rank=None``): a float32 dense SVD whose
  singular values beyond the true rank are ~1e-7 * s_1 noise that enter sum(s) and cumsum(s);
  ours works on the exact factor-space spectrum (float64) and drops that tail. Expect the same
  kept ranks and a relative Frobenius difference of ~1e-6 (the test allows 1e-5). The
  ``known_rank`` path is not used: it is randomized and unseeded in the seed code.
- TIES (``merger/TIES.py``): ``topk(...)[0][-1]`` threshold then ``>=``, so entries tied with the
  keep-th value are all kept (ours too); sign 0 where the trimmed sum is 0; no lambda. Same
  float32 inputs give identical kept sets; only the summation order differs (~1 ulp).
- TALL-masks (``merger/tall_mask.py``): masks against alpha * S (not S), k = 2 hard-coded,
  result M * (alpha * S) -> our ``tall_masks`` (not ``consensus``). A mask entry could flip if
  S differed by an ulp; ours sums in the same task order, so outputs match to float32 rounding.
- MetaGPT (``merger/metagpt.py``): lambdas from float32 ``torch.norm`` of the concatenation;
  ours from float64 factor Grams: lambdas agree to ~1e-6 relative.
- simple_avg (``merger/simple_avg.py weighted_merge``): clone * alpha_0 then ``+=``; exact up to
  rounding. Used with 1/T (simple_average) and with alpha_t = scaling * w_t (task_arithmetic).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

SEED = 0
TASKS = ["task0", "task1", "task2"]
MODULES = {"enc.q.weight": (16, 12), "enc.v.weight": (12, 16), "dec.o.weight": (16, 16)}
RANKS = [4, 4, 2]  # per task: two equal ranks exercise batching, one differs
SCALES = [2.0, 0.5, 4.0]  # per task, LoRA alpha / r
STAR_ETAS = [20, 40, 80]
TIES_K = 20  # percent (ours: density 0.2)
TALL = {"lambda_": 0.4, "scaling_factor": 0.4, "k": 2}
TA = {"scaling": 0.3, "weights": [1.0, 0.5, 2.0]}


def fixtures() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Seeded LoRA factors and the fp32 dense task vectors built from them."""
    g = torch.Generator().manual_seed(SEED)
    tensors: dict[str, torch.Tensor] = {}
    tv_list = []
    for t, task in enumerate(TASKS):
        tv = {}
        for key, (m, n) in MODULES.items():
            b = torch.randn(m, RANKS[t], generator=g) / 4
            a = torch.randn(RANKS[t], n, generator=g) / 4
            tv[key] = (b @ a) * SCALES[t]  # == LowRank(b, a, scale).to_dense()
            tensors[f"input/{task}/{key}/lora_B"] = b
            tensors[f"input/{task}/{key}/lora_A"] = a
            tensors[f"input/{task}/{key}/delta"] = tv[key]
        tv_list.append(tv)
    return tensors, tv_list


def run_seed_code(star_repo: Path, tv_list: list[dict[str, torch.Tensor]]) -> tuple[dict, dict]:
    """Run IBM's mergers; returns output tensors and JSON-able extras."""
    sys.path.insert(0, str(star_repo))
    from merger.metagpt import metagpt_get_lambdas, metagpt_get_merged_tv
    from merger.simple_avg import weighted_merge
    from merger.STAR import star_task_vectors
    from merger.tall_mask import get_merged_tv_tall
    from merger.TIES import disjoint_merge, elect_sign, global_trim_weights, local_trim_weights

    n = len(tv_list)
    tv_dicts = {task: tv for task, tv in zip(TASKS, tv_list, strict=True)}
    out: dict[str, dict[str, torch.Tensor]] = {}
    out["simple_average"] = weighted_merge(_clone(tv_list), [1.0 / n] * n)
    ta_alphas = [TA["scaling"] * w for w in TA["weights"]]
    out["task_arithmetic"] = weighted_merge(_clone(tv_list), ta_alphas)
    for eta in STAR_ETAS:
        per_task = star_task_vectors(_clone_dicts(tv_dicts), eta)
        out[f"star_eta{eta}"] = weighted_merge([per_task[t] for t in TASKS], [1.0 / n] * n)
        for task in TASKS:
            out[f"star_eta{eta}/{task}"] = per_task[task]
    for trim, fn in (("global", global_trim_weights), ("local", local_trim_weights)):
        trimmed = fn(_clone_dicts(tv_dicts), TIES_K, "cpu")
        out[f"ties_{trim}"] = disjoint_merge(trimmed, elect_sign(trimmed))
    out["tall_masks"] = get_merged_tv_tall(_clone(tv_list), **TALL)
    out["metagpt"] = metagpt_get_merged_tv(_clone(tv_list))
    extras = {"metagpt_lambdas": metagpt_get_lambdas(_clone(tv_list))}
    return out, extras


def _clone(tv_list):
    return [{k: v.clone() for k, v in tv.items()} for tv in tv_list]


def _clone_dicts(tv_dicts):
    return {task: {k: v.clone() for k, v in tv.items()} for task, tv in tv_dicts.items()}


def _commit(repo: Path) -> str | None:
    for git_dir in (repo / ".git", repo):
        try:
            cmd = ["git", "--git-dir", str(git_dir), "rev-parse", "HEAD"]
            return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
        except (subprocess.CalledProcessError, FileNotFoundError):
            continue
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--star-repo", type=Path, required=True, help="IBM/STAR checkout")
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "tests/golden")
    args = parser.parse_args()
    torch.manual_seed(SEED)
    tensors, tv_list = fixtures()
    outputs, extras = run_seed_code(args.star_repo.resolve(), tv_list)
    for name, merged in outputs.items():
        for key, value in merged.items():
            tensors[f"output/{name}/{key}"] = value.to(torch.float32).contiguous()
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out / "seed_merges.safetensors"))
    meta = {
        "command": shlex.join(["python", "scripts/make_golden.py", *sys.argv[1:]]),
        "ibm_star_commit": _commit(args.star_repo),
        "torch": torch.__version__,
        "seed": SEED,
        "tasks": TASKS,
        "modules": {k: list(v) for k, v in MODULES.items()},
        "ranks": RANKS,
        "scales": SCALES,
        "star_etas": STAR_ETAS,
        "ties_k_percent": TIES_K,
        "tall_masks": TALL,
        "task_arithmetic": TA,
        **extras,
    }
    (args.out / "seed_merges.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {len(tensors)} tensors to {args.out / 'seed_merges.safetensors'}")


if __name__ == "__main__":
    main()
