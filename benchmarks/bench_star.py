"""STAR on 12 Mistral-7B-Instruct-shaped rank-16 adapters, against the seed code's two paths.

The issue's targets (2 CPU cores):
- the whole ``starmerge merge`` CLI run (adapters in, merged adapter out) at least 1000x faster
  than the seed code's dense path (``torch.linalg.svd``);
- the merge's own cost (that run minus the same command on two tiny adapters) at least 100x
  faster than the seed's low-rank path (``torch.svd_lowrank(q=r+5)``), both timed quiet and
  again beside one CPU-bound process that the benchmark starts and stops itself (a busy loop on
  one core: the loaded case of a shared machine or CI runner);
- the merged adapter equal to a float64 reference of STAR to 1e-5 (relative Frobenius).

The seed paths are timed per matrix on a sample (densify ``B @ A * alpha / r`` as its loader
does, ``star()``, and its ``weighted_merge`` accumulation) and extrapolated to every matrix of
every task. The seed's adapter loading and output writing are not counted (in its favour).
Wall clock and CPU time (user + sys, all threads) are both recorded: this machine is shared and
its load inflates wall times, CPU time much less.

Usage: python benchmarks/bench_star.py [--quick] [--no-profile]
"""

from __future__ import annotations

import argparse
import io
import math
import pstats
import shutil
import sys
import time
from pathlib import Path

import common as C
import torch
from safetensors import safe_open

SIZES = {
    "full": {"tasks": 12, "layers": 32, "hidden": 4096, "kv_out": 1024,
             "dense_sample": {"q": 2, "kv": 2}, "lowrank_sample": {"q": 8, "kv": 8},
             "repeats": 3, "acc_layers": "first,middle,last", "crosscheck": True},
    "quick": {"tasks": 4, "layers": 4, "hidden": 1024, "kv_out": 256,
              "dense_sample": {"q": 1, "kv": 1}, "lowrank_sample": {"q": 4, "kv": 4},
              "repeats": 2, "acc_layers": "first,last", "crosscheck": False},
}
TARGETS = {"dense_speedup_min": 1000.0, "lowrank_speedup_min": 100.0,
           "lowrank_speedup_aim": 100.0, "max_rel_err": 1e-5}
ETA = 40.0
R, ALPHA = 16, 32


# --------------------------------------------------------------------------- inputs
def build_inputs(size: dict, work: Path) -> dict:
    """Write (or reuse) the task adapters and the two tiny adapters; return their paths."""
    modules = C.attention_modules(size["layers"], size["hidden"], size["kv_out"])
    spec = C.LoraSpec(modules, r=R, alpha=ALPHA)
    tasks = [work / "adapters" / f"task{t:02d}" for t in range(size["tasks"])]
    stamp = {"modules": len(modules), "hidden": size["hidden"], "kv_out": size["kv_out"],
             "r": R, "alpha": ALPHA, "dtype": spec.dtype, "tasks": size["tasks"], "v": 1}

    def build() -> None:
        for t, path in enumerate(tasks):
            C.write_lora(path, spec, seed=1000 + t)

    t0 = time.perf_counter()
    built = C.cached(work / "adapters", stamp, build)
    tiny_spec = C.LoraSpec(C.attention_modules(1, 64, 32), r=R, alpha=ALPHA)
    tiny = [work / "tiny" / f"tiny{t}" for t in range(2)]
    C.cached(work / "tiny", {"tiny": 1, "r": R},
             lambda: [C.write_lora(p, tiny_spec, seed=7 + i) for i, p in enumerate(tiny)])
    return {"tasks": tasks, "tiny": tiny, "modules": modules, "built": built,
            "build_s": time.perf_counter() - t0}


def merge_config(path: Path, adapters: list[Path]) -> Path:
    return C.write_yaml(path, {
        "method": "star",
        "parameters": {"eta": ETA},
        "models": [{"adapter": str(a)} for a in adapters],
        "output": {"format": "adapter", "dtype": "float32"},
    })


# --------------------------------------------------------------------------- the CLI
def time_cli(cfg: Path, tiny_cfg: Path, work: Path, repeats: int) -> dict:
    """Interleave full and tiny CLI runs (after one untimed warm-up of each).

    Each round also runs the full merge once with one thread (OMP/MKL_NUM_THREADS=1), a
    diagnostic: on a loaded 2-core machine, 2-thread OpenMP regions on small tensors stall.
    """
    out, tiny_out = work / "out", work / "out_tiny"
    runs: dict[str, list] = {"tiny": [], "full": [], "full_1thread": []}
    variants = (("tiny", tiny_cfg, tiny_out, None), ("full", cfg, out, None),
                ("full_1thread", cfg, work / "out_1thread", 1))
    for i in range(repeats + 1):
        for name, c, o, threads in variants:
            if i == 0 and threads is not None:
                continue
            run = C.starmerge_merge(c, o, threads=threads)
            if run.returncode:
                raise RuntimeError(f"starmerge merge failed ({run.returncode}): "
                                   f"{run.stderr[-3000:]}")
            if i > 0:  # the first round warms the page cache and the imports
                runs[name].append(run)
            print(f"    {name}: {run.wall_s:.2f} s wall, {run.cpu_s:.2f} s CPU"
                  f"{' (warm-up)' if i == 0 else ''}", flush=True)
    wall = {k: [r.wall_s for r in v] for k, v in runs.items()}
    cpu = {k: [r.cpu_s for r in v] for k, v in runs.items()}
    man = C.manifest(out)
    kept = [k for st in man.get("statistics", {}).get("per_parameter", {}).values()
            for k in st.get("kept_ranks", [])]
    return {
        "wall_s": wall, "cpu_s": cpu,
        "full_wall_s_min": min(wall["full"]), "full_wall_s_median": C.median(wall["full"]),
        "tiny_wall_s_min": min(wall["tiny"]), "tiny_wall_s_median": C.median(wall["tiny"]),
        "full_1thread_wall_s_min": min(wall["full_1thread"]),
        "merge_own_wall_s": min(wall["full"]) - min(wall["tiny"]),
        "merge_own_1thread_wall_s": min(wall["full_1thread"]) - min(wall["tiny"]),
        "merge_own_cpu_s": min(cpu["full"]) - min(cpu["tiny"]),
        "full_cpu_s_min": min(cpu["full"]),
        "manifest_wall_time_s": man.get("wall_time_s"),
        "manifest_peak_memory_bytes": man.get("peak_memory_bytes"),
        "kept_rank_mean": sum(kept) / len(kept) if kept else None,
        "kept_rank_min": min(kept) if kept else None,
        "kept_rank_max": max(kept) if kept else None,
        "output_bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file()),
        "out_dir": str(out),
    }


def profile_cli(cfg: Path, work: Path, top: int = 25) -> dict:
    """One extra (untimed) CLI run under cProfile: the functions that dominate the merge."""
    prof = work / "star_cli.prof"
    run = C.run_child([sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "starmerge",
                       "merge", str(cfg), str(work / "out_prof"), "--overwrite", "--quiet"])
    if run.returncode or not prof.is_file():
        return {"error": run.stderr[-2000:]}
    res = {"wall_s_under_profiler": run.wall_s}
    for sort in ("cumulative", "tottime"):
        buf = io.StringIO()
        pstats.Stats(str(prof), stream=buf).strip_dirs().sort_stats(sort).print_stats(top)
        lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
        start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")), 0)
        res[f"top_by_{sort}"] = lines[start:]
    return res


# --------------------------------------------------------------------------- the seed's paths
def _sample(modules: dict, kind: str, n: int, n_tasks: int, n_layers: int) -> list[tuple[int, str]]:
    projs = ["q_proj"] if kind == "q" else ["k_proj", "v_proj"]
    out = []
    for i in range(n):
        layer = (i * 7 + 3) % n_layers
        out.append((i % n_tasks, f"model.layers.{layer}.self_attn.{projs[i % len(projs)]}"))
    return out


def _factors(adapter: Path, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        return (f.get_tensor(f"{C.PREFIX}{module}.lora_A.weight"),
                f.get_tensor(f"{C.PREFIX}{module}.lora_B.weight"))


def time_seed_path(star_fn, tasks: list[Path], modules: dict, size: dict, known_rank: int | None,
                   sample: dict, reps: int = 1) -> dict:
    """Per-matrix cost of the seed pipeline on a sample, extrapolated to all matrices.

    Each sampled matrix is timed ``reps`` times and its fastest repetition kept (as the CLI's
    fastest run is): densify ``(B @ A) * alpha / r``, ``star()``, ``merged += out / T``.
    """
    torch.manual_seed(0)  # svd_lowrank draws from the global RNG; the seed code never seeds it
    per_kind = {}
    for kind, n in sample.items():
        rows = []
        for task, module in _sample(modules, kind, n, size["tasks"], size["layers"]):
            a, b = _factors(tasks[task], module)
            best = None
            for _ in range(reps):
                acc = torch.zeros(b.shape[0], a.shape[1])
                w_dense, c_dense, delta = C.timed(lambda a=a, b=b: (b @ a) * (ALPHA / R))
                w_star, c_star, out = C.timed(lambda d=delta: star_fn(d, ETA, known_rank))
                w_avg, c_avg, _ = C.timed(lambda o=out, acc=acc: acc.add_(o * (1 / size["tasks"])))
                row = {"task": task, "module": module, "shape": list(delta.shape),
                       "densify_s": w_dense, "star_s": w_star, "average_s": w_avg,
                       "wall_s": w_dense + w_star + w_avg, "cpu_s": c_dense + c_star + c_avg}
                if best is None or row["wall_s"] < best["wall_s"]:
                    best = row
                del delta, out, acc
            best["reps"] = reps
            rows.append(best)
            path = "lowrank" if known_rank else "dense"
            print(f"    seed {path} {module} {tuple(best['shape'])}: "
                  f"{best['star_s']:.3f} s star, {best['densify_s'] + best['average_s']:.3f} s "
                  f"densify+average (best of {reps})", flush=True)
        per_kind[kind] = {"n_sampled": len(rows), "rows": rows,
                          "wall_s_median": C.median([r["wall_s"] for r in rows]),
                          "wall_s_mean": sum(r["wall_s"] for r in rows) / len(rows),
                          "wall_s_min": min(r["wall_s"] for r in rows),
                          "cpu_s_median": C.median([r["cpu_s"] for r in rows])}
    counts = {"q": size["tasks"] * size["layers"], "kv": size["tasks"] * size["layers"] * 2}
    total = {stat: sum(per_kind[k][stat] * counts[k] for k in counts)
             for stat in ("wall_s_median", "wall_s_mean", "wall_s_min", "cpu_s_median")}
    return {"per_kind": per_kind, "matrix_counts": counts, "extrapolated_total": total}


def _warm_up(star_fn) -> None:
    x = torch.randn(256, 16) @ torch.randn(16, 256)
    star_fn(x, ETA)
    star_fn(x, ETA, R)


# --------------------------------------------------------------------------- accuracy
def star_reference(delta: torch.Tensor, eta: float, route: str) -> torch.Tensor:
    """STAR of one dense float64 matrix, independent of the library.

    ``dense``: thin SVD of the dense matrix (of its transpose when wide: the same SVD, faster).
    ``range``: exact SVD of a matrix of rank <= 16: the range of ``delta @ omega`` with 32
    Gaussian probes is the range of delta, then a dense SVD of ``Q^T delta`` (32 x n). Singular
    values at or below 1e-10 * s_max count as 0 (float64 noise; no effect at this tolerance).
    """
    d = delta.to(torch.float64)
    if route == "dense":
        if d.shape[0] < d.shape[1]:
            v, s, uh = torch.linalg.svd(d.T, full_matrices=False)
            u, vh = uh.T, v.T
        else:
            u, s, vh = torch.linalg.svd(d, full_matrices=False)
    else:
        g = torch.Generator().manual_seed(0)
        omega = torch.randn(d.shape[1], 32, generator=g, dtype=torch.float64)
        q, _ = torch.linalg.qr(d @ omega)  # (m, 32)
        u_s, s, vh = torch.linalg.svd(q.T @ d, full_matrices=False)
        u = q @ u_s
    if s.numel() == 0 or s[0] == 0:
        return torch.zeros_like(d)
    s = torch.where(s > 1e-10 * s[0], s, torch.zeros_like(s))
    rank = int((s > 0).sum())
    k = min(int((s.cumsum(0) < s.sum() * eta / 100).sum()) + 1, rank)
    kept = s[:k] * (s.sum() / s[:k].sum())
    return (u[:, :k] * kept) @ vh[:k]


def _output_delta(out_dir: Path, module: str) -> torch.Tensor:
    config, tensors = C.read_adapter(out_dir)
    return C.adapter_delta(config, tensors, module, torch.float64)


def accuracy(out_dir: Path, tasks: list[Path], size: dict) -> dict:
    """Relative Frobenius error of the merged adapter against a float64 STAR reference."""
    n_layers = size["layers"]
    layers = sorted({{"first": 0, "middle": n_layers // 2, "last": n_layers - 1}[w]
                     for w in size["acc_layers"].split(",")})
    route = "dense" if size["hidden"] <= 1024 else "range"
    config, tensors = C.read_adapter(out_dir)
    rows = []
    for layer in layers:
        for proj in ("q_proj", "k_proj", "v_proj"):
            module = f"model.layers.{layer}.self_attn.{proj}"
            ref = None
            for t in tasks:
                cfg_t, ten_t = C.read_adapter(t)
                part = star_reference(C.adapter_delta(cfg_t, ten_t, module), ETA, route)
                ref = part if ref is None else ref + part
            ref /= len(tasks)
            got = C.adapter_delta(config, tensors, module, torch.float64)
            err = float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref))
            rows.append({"module": module, "shape": list(ref.shape), "rel_frobenius_err": err,
                         "reference": route})
            print(f"    accuracy {module}: {err:.2e} (reference: float64 {route})", flush=True)
    res = {"rows": rows, "max_rel_err": max(r["rel_frobenius_err"] for r in rows),
           "reference_route": route}
    if size["crosscheck"]:
        res["range_vs_dense_reference"] = _crosscheck(tasks[0], f"model.layers.{layers[0]}"
                                                      ".self_attn.k_proj")
    return res


def _crosscheck(adapter: Path, module: str) -> dict:
    """The range-finder reference against a full dense float64 SVD on one matrix."""
    cfg, ten = C.read_adapter(adapter)
    delta = C.adapter_delta(cfg, ten, module)
    wall, _, dense = C.timed(lambda: star_reference(delta, ETA, "dense"))
    rng = star_reference(delta, ETA, "range")
    diff = float(torch.linalg.norm(dense - rng) / torch.linalg.norm(dense))
    print(f"    reference cross-check on {module}: range vs dense float64 SVD {diff:.1e} "
          f"(dense f64 SVD took {wall:.1f} s)", flush=True)
    return {"module": module, "rel_diff": diff, "dense_f64_svd_wall_s": wall}


# --------------------------------------------------------------------------- main
def run(quick: bool, do_profile: bool = True) -> dict:
    mode = "quick" if quick else "full"
    size = SIZES[mode]
    work = C.WORK / f"star_{mode}"
    result = {"benchmark": "star", "mode": mode, "machine": C.machine_info(), "size": size,
              "targets": TARGETS, "eta": ETA, "r": R, "lora_alpha": ALPHA,
              "adapter_dtype": "float32"}
    n_modules = len(C.attention_modules(size["layers"], 1, 1))
    print(f"[star] {mode}: {size['tasks']} adapters x {n_modules}"
          f" modules ({size['hidden']}x{size['hidden']} and {size['kv_out']}x{size['hidden']})",
          flush=True)
    inputs = build_inputs(size, work)
    result["inputs"] = {"built_now": inputs["built"], "build_s": inputs["build_s"],
                        "bytes_per_adapter": (inputs["tasks"][0] / "adapter_model.safetensors")
                        .stat().st_size}
    cfg = merge_config(work / "star.yaml", inputs["tasks"])
    tiny_cfg = merge_config(work / "star_tiny.yaml", inputs["tiny"])
    commands = {"full": f"starmerge merge {cfg} {work / 'out'} --overwrite --quiet",
                "tiny": f"starmerge merge {tiny_cfg} {work / 'out_tiny'} --overwrite --quiet"}
    result["commands"] = commands

    print("  CLI runs (warm-up, then interleaved full/tiny)...", flush=True)
    with C.ForeignLoad() as load:
        cli = time_cli(cfg, tiny_cfg, work, size["repeats"])
    result["cli"] = cli
    result["foreign_load_cores"] = {"cli": load.cores}
    print(f"    full {cli['full_wall_s_min']:.2f} s (min of {len(cli['wall_s']['full'])}), tiny "
          f"{cli['tiny_wall_s_min']:.2f} s -> merge's own cost {cli['merge_own_wall_s']:.2f} s",
          flush=True)

    star_fn, origin = C.load_seed_star()
    result["seed_star"] = origin
    torch.set_num_threads(2)
    result["seed_torch_threads"] = torch.get_num_threads()
    _warm_up(star_fn)
    print(f"  seed paths ({origin}; torch threads {torch.get_num_threads()})", flush=True)
    with C.ForeignLoad() as load:
        result["seed_lowrank"] = time_seed_path(star_fn, inputs["tasks"], inputs["modules"], size,
                                                R, size["lowrank_sample"], reps=3)
    result["foreign_load_cores"]["seed_lowrank"] = load.cores
    with C.ForeignLoad() as load:
        result["seed_dense"] = time_seed_path(star_fn, inputs["tasks"], inputs["modules"], size,
                                              None, size["dense_sample"])
    result["foreign_load_cores"]["seed_dense"] = load.cores
    print(f"  other processes used on average {result['foreign_load_cores']} cores during the "
          "timings (0 = quiet machine)", flush=True)

    print("  loaded: the same CLI and seed low-rank timings beside one busy-loop process",
          flush=True)
    with C.BusyLoop(), C.ForeignLoad() as load:
        loaded_cli = time_cli(cfg, tiny_cfg, work, size["repeats"])
        loaded_seed = time_seed_path(star_fn, inputs["tasks"], inputs["modules"], size, R,
                                     size["lowrank_sample"], reps=3)
    result["loaded"] = {"cli": loaded_cli, "seed_lowrank": loaded_seed,
                        "foreign_load_cores": load.cores,
                        "competitor": "python -c 'while True: pass' (one core)"}

    print("  accuracy against float64 STAR...", flush=True)
    result["accuracy"] = accuracy(Path(cli["out_dir"]), inputs["tasks"], size)
    if do_profile:
        print("  profiling one CLI run (cProfile)...", flush=True)
        result["profile"] = profile_cli(cfg, work)
    for extra in ("out_1thread", "out_prof"):  # keep only the timed run's output
        shutil.rmtree(work / extra, ignore_errors=True)
    result["verdict"] = verdict(result)
    result["machine"]["loadavg_at_end"] = C.load_average()
    return result


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None  # a merge cost lost in the noise has no ratio


def verdict(res: dict) -> dict:
    """Speedups (median per-matrix seed cost x counts, over min CLI times) and pass/fail."""
    cli, dense, low = res["cli"], res["seed_dense"], res["seed_lowrank"]
    dense_t, low_t = dense["extrapolated_total"], low["extrapolated_total"]
    v = {
        "seed_dense_total_wall_s": dense_t["wall_s_median"],
        "seed_lowrank_total_wall_s": low_t["wall_s_median"],
        "cli_whole_run_wall_s": cli["full_wall_s_min"],
        "merge_own_wall_s": cli["merge_own_wall_s"],
        "dense_speedup_wall": _ratio(dense_t["wall_s_median"], cli["full_wall_s_min"]),
        "dense_speedup_cpu": _ratio(dense_t["cpu_s_median"], cli["full_cpu_s_min"]),
        "lowrank_speedup_wall": _ratio(low_t["wall_s_median"], cli["merge_own_wall_s"]),
        "lowrank_speedup_cpu": _ratio(low_t["cpu_s_median"], cli["merge_own_cpu_s"]),
        "lowrank_speedup_wall_1thread": _ratio(low_t["wall_s_median"],
                                               cli["merge_own_1thread_wall_s"]),
        "dense_speedup_wall_1thread": _ratio(dense_t["wall_s_median"],
                                             cli["full_1thread_wall_s_min"]),
        "max_rel_err": res["accuracy"]["max_rel_err"],
        "targets_apply": res["mode"] == "full",  # the targets are for the full (Mistral) sizes
    }

    def at_least(x: float | None, target: float) -> bool:
        return x is not None and x >= target

    v["pass_dense"] = at_least(v["dense_speedup_wall"], TARGETS["dense_speedup_min"])
    v["pass_lowrank"] = at_least(v["lowrank_speedup_wall"], TARGETS["lowrank_speedup_min"])
    v["meets_lowrank_aim"] = at_least(v["lowrank_speedup_wall"], TARGETS["lowrank_speedup_aim"])
    loaded = res.get("loaded")
    if loaded:
        low_l = loaded["seed_lowrank"]["extrapolated_total"]["wall_s_median"]
        v["loaded_seed_lowrank_total_wall_s"] = low_l
        v["loaded_merge_own_wall_s"] = loaded["cli"]["merge_own_wall_s"]
        v["loaded_lowrank_speedup_wall"] = _ratio(low_l, loaded["cli"]["merge_own_wall_s"])
        v["pass_lowrank_loaded"] = at_least(v["loaded_lowrank_speedup_wall"],
                                            TARGETS["lowrank_speedup_min"])
    err = v["max_rel_err"]
    v["pass_accuracy"] = math.isfinite(err) and err <= TARGETS["max_rel_err"]
    return v


def summary_lines(res: dict) -> list[str]:
    v = res["verdict"]

    def ok(flag: bool) -> str:
        if not v["targets_apply"]:
            return "n/a (quick sizes)"
        return "PASS" if flag else "FAIL"

    def x(r: float | None, fmt: str = ",.0f") -> str:
        return "n/a" if r is None else f"{r:{fmt}}x"

    return [
        f"star ({res['mode']}): CLI {v['cli_whole_run_wall_s']:.2f} s whole run, "
        f"{v['merge_own_wall_s']:.2f} s merge's own cost",
        f"  vs seed dense  : {v['seed_dense_total_wall_s']:,.0f} s extrapolated -> "
        f"{x(v['dense_speedup_wall'])} wall ({x(v['dense_speedup_cpu'])} CPU)   "
        f"target >= 1000x: {ok(v['pass_dense'])}",
        f"  vs seed lowrank: {v['seed_lowrank_total_wall_s']:,.1f} s extrapolated -> "
        f"{x(v['lowrank_speedup_wall'], ',.1f')} wall "
        f"({x(v['lowrank_speedup_cpu'], ',.1f')} CPU)   "
        f"target >= 100x: {ok(v['pass_lowrank'])}",
        *([f"  loaded (+1 busy process): seed lowrank {v['loaded_seed_lowrank_total_wall_s']:,.1f}"
           f" s, merge's own cost {v['loaded_merge_own_wall_s']:.2f} s -> "
           f"{x(v['loaded_lowrank_speedup_wall'], ',.1f')}   target >= 100x: "
           f"{ok(v['pass_lowrank_loaded'])}"] if "loaded_lowrank_speedup_wall" in v else []),
        f"  (diagnostic)   : CLI with OMP/MKL_NUM_THREADS=1: whole run "
        f"{res['cli']['full_1thread_wall_s_min']:.2f} s ({x(v['dense_speedup_wall_1thread'])} vs "
        f"dense), merge's own cost {res['cli']['merge_own_1thread_wall_s']:.2f} s "
        f"({x(v['lowrank_speedup_wall_1thread'], ',.1f')} vs lowrank)",
        f"  machine load   : other processes used {res.get('foreign_load_cores')} cores "
        "(of 2) during the timings",
        f"  accuracy       : max rel. Frobenius error {v['max_rel_err']:.2e}   "
        f"target <= 1e-5: {ok(v['pass_accuracy'])}",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--no-profile", action="store_true", help="skip the cProfile run")
    args = p.parse_args(argv)
    res = run(args.quick, not args.no_profile)
    path = C.write_result("star_quick" if args.quick else "star", res)
    print("\n".join(summary_lines(res)))
    print(f"-> {path}")
    if "profile" in res and "top_by_tottime" in res["profile"]:
        print("  top functions by own time (cProfile):")
        print("\n".join("    " + ln for ln in res["profile"]["top_by_tottime"][:12]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
