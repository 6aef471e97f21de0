"""Every registered method on the 12-adapter STAR set, restricted to a few layers (a table).

In-process, through ``starmerge.api.merge_deltas`` with the adapters' ``LowRank`` deltas held in
memory (so this times the methods and the pipeline's densification, not file I/O). Methods that
need entries (TIES, TALL-masks, Consensus) densify every task's delta; STAR, Task Arithmetic,
MetaGPT and the simple average stay in factor space. Default hyperparameters throughout, except
``PARAMS`` (WUDI's default Adam runs 300 dense steps per matrix, about 5 min each on 2 cores: its
exact solver is timed instead); methods that merge a fixed number of models are skipped.

Usage: python benchmarks/bench_methods.py [--quick] [--layers N]
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import bench_star
import common as C
import torch

PARAMS = {"wudi": {"solver": "exact"}}


def load_deltas(tasks, modules: list[str]) -> list[dict]:
    from starmerge.tensors.delta import LowRank

    out = []
    for path in tasks:
        config, tensors = C.read_adapter(path)
        scale = config["lora_alpha"] / config["r"]
        out.append({f"{m}.weight": LowRank(tensors[f"{C.PREFIX}{m}.lora_B.weight"],
                                           tensors[f"{C.PREFIX}{m}.lora_A.weight"], scale)
                    for m in modules})
    return out


def describe(delta) -> str:
    from starmerge.tensors.delta import LowRank

    return f"LowRank(r={delta.rank})" if isinstance(delta, LowRank) else "Dense"


def base(name: str, deltas: list[dict]) -> dict | None:
    """A random stand-in base tensor per key, for the methods that interpolate weights."""
    from starmerge.methods import METHODS

    if not METHODS.get(name).needs_base:
        return None
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(d.shape, generator=g) * 0.02 for k, d in deltas[0].items()}


def run(quick: bool, n_layers: int | None) -> dict:
    from starmerge.api import merge_deltas
    from starmerge.methods import METHODS

    mode = "quick" if quick else "full"
    size = bench_star.SIZES[mode]
    work = C.WORK / f"star_{mode}"
    inputs = bench_star.build_inputs(size, work)
    layers = n_layers or (size["layers"] if quick else 2)
    modules = [m for m in inputs["modules"] if int(m.split(".")[2]) < layers]
    deltas = load_deltas(inputs["tasks"], modules)
    torch.set_num_threads(2)
    result = {"benchmark": "methods", "mode": mode, "machine": C.machine_info(),
              "tasks": len(deltas), "layers": layers, "modules": modules,
              "shapes": sorted({str(tuple(d.shape)) for d in deltas[0].values()}), "rows": []}
    print(f"[methods] {mode}: {len(deltas)} tasks x {len(modules)} modules "
          f"(layers 0..{layers - 1})", flush=True)
    for name in METHODS.names():
        row = {"method": name}
        count = METHODS.get(name).models_problem(len(deltas))
        if METHODS.get(name).data is not None or count:
            data = "needs statistics from task data (not data-free); not timed here"
            row["skipped"] = count or data
            print(f"  {name:16s} skipped: {row['skipped']}", flush=True)
            result["rows"].append(row)
            continue
        try:
            with C.ForeignLoad() as load:
                t0, c0 = time.perf_counter(), time.process_time()
                row["parameters"] = PARAMS.get(name, {})
                out = merge_deltas(name, deltas, row["parameters"], base=base(name, deltas))
                row["wall_s"] = time.perf_counter() - t0
                row["cpu_s"] = time.process_time() - c0
            row["foreign_load_cores"] = load.cores
            first = next(iter(out.deltas.values()))
            row["output"] = describe(first)
            row["ms_per_module"] = 1000 * row["wall_s"] / len(modules)
            norms = [float(torch.linalg.norm(d.to_dense())) for d in out.deltas.values()]
            row["finite"] = all(math.isfinite(x) for x in norms)
            print(f"  {name:16s} {row['wall_s']:8.2f} s  {row['ms_per_module']:9.1f} ms/module  "
                  f"{row['output']}", flush=True)
            del out
        except Exception as exc:  # report and go on: the table shows what failed
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            print(f"  {name:16s} FAILED: {row['error'][:200]}", flush=True)
        result["rows"].append(row)
    result["machine"]["loadavg_at_end"] = C.load_average()
    return result


def summary_lines(res: dict) -> list[str]:
    lines = [f"methods ({res['mode']}): {res['tasks']} tasks x {len(res['modules'])} modules "
             f"{', '.join(res['shapes'])}, in-process"]
    for r in res["rows"]:
        if "skipped" in r:
            lines.append(f"  {r['method']:16s} skipped ({r['skipped'][:40]})")
        elif "error" in r:
            lines.append(f"  {r['method']:16s} FAILED {r['error'][:100]}")
        else:
            lines.append(f"  {r['method']:16s} {r['wall_s']:8.2f} s  "
                         f"{r['ms_per_module']:9.1f} ms/module  {r['output']}  "
                         f"(others used {r.get('foreign_load_cores')} cores)")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--layers", type=int, default=None, help="layers to merge (full: 2)")
    args = p.parse_args(argv)
    res = run(args.quick, args.layers)
    path = C.write_result("methods_quick" if args.quick else "methods", res)
    print("\n".join(summary_lines(res)))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
