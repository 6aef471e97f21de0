"""No slower than before: the methods benchmark at a reference revision and here, interleaved.

A timing on a shared machine is noise unless it is a ratio taken in one run, so this compares two
versions of the library side by side: ``git worktree`` checks the reference revision out under
``benchmarks/work/ref-<sha>``, and each round runs one child process per version (the reference
first, then this tree, alternating the order every round) that merges the 12-adapter set of
``bench_methods.py`` (two layers of the Mistral-7B-shaped STAR set) with every data-free method
both versions have, through ``starmerge.api.merge_deltas``. Per method the faster of the rounds
is kept on each side (within a round, a merge shorter than a second is repeated for a second and
its fastest call kept); the verdict is this tree / reference <= 1.10 (PASS) per method, and for a
merge that takes under 50 ms on both sides, a difference of at most 10 ms (``PASS (floor)``).

The children share this script: ``--child SRC`` puts ``SRC`` (a ``src/`` directory) first on
``sys.path`` and prints the timings as JSON. Methods that need base weights or a fixed number of
models are left out (the reference may not have them).

Usage: python benchmarks/bench_regression.py [--quick] [--ref REV] [--rounds N] [--methods a,b]
(default reference: ``DEFAULT_REF``, the tree before the method-contract refactor; about 6
minutes with 3 rounds on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import common as C

#: The methods table before the method-contract refactor (issue 11), results/methods.json of 11-23.
DEFAULT_REF = "c225795834da84247eef1c7444896ed30a6f40dd"
DEFAULT_METHODS = "simple_average,task_arithmetic,ties,tall_masks,consensus,metagpt,star"
LIMIT = 1.10  # this tree / reference, per method
# Merges of a few milliseconds (both sides under SMALL_S) are judged by their difference: within
# FLOOR_S is a PASS. At that scale the fastest of a second's repeats still moves 2-3x between
# processes running the same tree (glibc maps and faults in every fresh multi-MiB factor
# concatenation; docs/benchmarks.md), far more than the 10 % the ratio allows.
SMALL_S, FLOOR_S = 0.05, 0.01
# A method is merged again until REPEAT_S seconds have gone by (at most MAX_REPEATS times) and its
# fastest call counts: a merge of a few milliseconds is otherwise timed at the scheduler's mercy.
REPEAT_S, MAX_REPEATS = 1.0, 50


def child(src: str, methods: list[str]) -> dict:
    """Time every method of ``methods`` with the library at ``src``; {method: seconds}."""
    sys.path.insert(0, src)
    import bench_methods
    import bench_star
    import torch

    from starmerge.api import merge_deltas

    size = bench_star.SIZES["full"]
    inputs = bench_star.build_inputs(size, C.WORK / "star_full")
    modules = [m for m in inputs["modules"] if int(m.split(".")[2]) < 2]
    deltas = bench_methods.load_deltas(inputs["tasks"], modules)
    torch.set_num_threads(2)
    merge_deltas("task_arithmetic", deltas[:2], {})  # warm-up: lazy imports, thread pools
    out = {}
    for name in methods:
        params = bench_methods.PARAMS.get(name, {})
        times: list[float] = []
        while not times or (sum(times) < REPEAT_S and len(times) < MAX_REPEATS):
            t0 = time.perf_counter()
            merged = merge_deltas(name, deltas, params)
            times.append(time.perf_counter() - t0)
            del merged
        out[name] = min(times)
    return out


def worktree(rev: str) -> Path:
    """A checkout of ``rev`` under benchmarks/work (made once, reused)."""
    sha = subprocess.check_output(["git", "rev-parse", rev], cwd=C.ROOT, text=True).strip()
    path = C.WORK / f"ref-{sha[:12]}"
    if not (path / "src").is_dir():
        subprocess.check_call(["git", "worktree", "add", "--detach", "-f", str(path), sha],
                              cwd=C.ROOT)
    return path


def verdict(reference_s: float, this_s: float) -> str:
    """PASS within ``LIMIT``; a merge of milliseconds on both sides is judged by ``FLOOR_S``."""
    if reference_s > 0 and this_s / reference_s <= LIMIT:
        return "PASS"
    if max(reference_s, this_s) < SMALL_S:
        return "PASS (floor)" if this_s - reference_s <= FLOOR_S else "FAIL"
    return "FAIL"


def run(ref: str, rounds: int, methods: list[str]) -> dict:
    ref_src = worktree(ref) / "src"
    sides = {"reference": str(ref_src), "this tree": str(C.ROOT / "src")}
    times: dict[str, dict[str, list[float]]] = {side: {} for side in sides}
    info = C.machine_info()
    for n in range(rounds):
        order = list(sides) if n % 2 == 0 else list(sides)[::-1]
        for side in order:
            cmd = [sys.executable, __file__, "--child", sides[side], "--methods", ",".join(methods)]
            line = subprocess.check_output(cmd, cwd=C.ROOT, text=True).strip().splitlines()[-1]
            for name, secs in json.loads(line).items():
                times[side].setdefault(name, []).append(secs)
            print(f"  round {n + 1} {side}: " + ", ".join(
                f"{k} {v:.2f}s" for k, v in json.loads(line).items()), flush=True)
    rows = []
    for name in methods:
        best = {side: min(times[side][name]) for side in sides}
        ratio = best["this tree"] / best["reference"] if best["reference"] > 0 else None
        rows.append({"method": name, "reference_s": best["reference"],
                     "this_tree_s": best["this tree"], "ratio": ratio,
                     "verdict": verdict(best["reference"], best["this tree"]),
                     "all_s": {side: times[side][name] for side in sides}})
    info["loadavg_at_end"] = C.load_average()
    return {"benchmark": "regression", "reference": ref, "rounds": rounds, "limit": LIMIT,
            "small_s": SMALL_S, "floor_s": FLOOR_S,
            "machine": info, "rows": rows}


def summary_lines(res: dict) -> list[str]:
    lines = [f"regression: this tree vs {res['reference']} (best of {res['rounds']} interleaved "
             f"rounds; PASS when <= {res['limit']:.2f}x, or within {FLOOR_S * 1e3:.0f} ms for "
             f"merges under {SMALL_S * 1e3:.0f} ms)"]
    for r in res["rows"]:
        lines.append(f"  {r['method']:16s} {r['reference_s']:8.3f} s -> {r['this_tree_s']:8.3f} s"
                     f"  {r['ratio']:.2f}x  {r['verdict']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref", default=DEFAULT_REF, help="reference revision")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--quick", action="store_true", help="one round of two methods (a smoke run)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.methods = 1, "task_arithmetic,star"
    methods = [m for m in args.methods.split(",") if m]
    if args.child:
        print(json.dumps(child(args.child, methods)))
        return 0
    res = run(args.ref, args.rounds, methods)
    path = C.write_result("regression_quick" if args.quick else "regression", res)
    print("\n".join(summary_lines(res)))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
