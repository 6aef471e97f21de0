"""starmerge against mergekit on LoRA inputs, side by side in one run, from one mergekit YAML.

The setting of the issue: the ~2 GB Llama-shaped base of ``bench_memory.py`` with 8 rank-16
LoRA adapters (q, v, up), model output, ``ties`` with mergekit's per-tensor trim and
``dare_ties``. The same mergekit config (``model: BASE+LORA`` inputs) goes to ``mergekit-yaml``
(pinned version, installed by this benchmark into its own cached venv under
``benchmarks/work/``, CPU torch first) and to ``starmerge merge`` (which reads mergekit YAML).
Recorded for both: wall time, CPU time, peak memory (``ru_maxrss`` and sampled ``RssAnon``) and
the bytes written to disk (output + mergekit's LoRA merge cache). For the deterministic
``ties`` the two outputs are compared tensor by tensor (largest relative Frobenius error).

Targets: starmerge at least 10x faster, less than a tenth of mergekit's peak memory, no disk
cache. Reported whichever way they go.

Usage: python benchmarks/bench_mergekit.py [--quick] [--methods ties,dare_ties]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import bench_memory as M
import common as C
import torch
from safetensors import safe_open

MERGEKIT = "mergekit==0.1.5"
TORCH = "torch==2.13.0"  # the CPU build; a looser pin downloads a CUDA build
METHODS = {"ties": {"density": 0.2}, "dare_ties": {"density": 0.2}}
TARGETS = {"speedup_min": 10.0, "memory_fraction_max": 0.1}
POLL_S = 0.05


def mergekit_venv(work: Path) -> Path:
    """The benchmark's own venv with mergekit (built once, then reused)."""
    venv = work / "mergekit-venv"
    marker = venv / f".installed-{MERGEKIT}"
    if not marker.is_file():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, TORCH], check=True)
        subprocess.run([*pip, MERGEKIT], check=True)
        marker.write_text("ok\n")
    return venv


def mergekit_config(path: Path, method: str, inputs: dict) -> Path:
    """One mergekit YAML: LoRA inputs as ``BASE+LORA``, mergekit's parameter names."""
    base = str(inputs["base"])
    return C.write_yaml(path, {
        "merge_method": method,
        "base_model": base,
        "models": [{"model": f"{base}+{a}", "parameters": {"weight": 1.0, "density":
                    METHODS[method]["density"]}} for a in inputs["adapters"]],
        "parameters": {"normalize": True},
        "dtype": "float32",
    })


def disk_bytes(*paths: Path) -> int:
    total = 0
    for p in paths:
        if p.is_file():
            total += p.stat().st_size
        elif p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return total


def run_mergekit(venv: Path, cfg: Path, out: Path, cache: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    argv = [str(venv / "bin" / "mergekit-yaml"), str(cfg), str(out), "--lora-merge-cache",
            str(cache), "--no-copy-tokenizer"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with C.ForeignLoad() as load:
        run = C.run_child(argv, poll_s=POLL_S, env=env)
    return {**run.brief(), "foreign_load_cores": load.cores,
            "disk_output_bytes": disk_bytes(out), "disk_cache_bytes": disk_bytes(cache)}


def run_starmerge(cfg: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    with C.ForeignLoad() as load:
        run = C.starmerge_merge(cfg, out, poll_s=POLL_S)
    return {**run.brief(), "foreign_load_cores": load.cores,
            "disk_output_bytes": disk_bytes(out), "disk_cache_bytes": 0}


def compare_outputs(ours: Path, theirs: Path) -> dict:
    """Largest relative Frobenius difference over the tensors both outputs hold."""
    def index(d: Path) -> dict[str, Path]:
        out = {}
        for shard in sorted(d.glob("*.safetensors")):
            with safe_open(str(shard), "pt") as f:
                out.update({k: shard for k in f.keys()})  # noqa: SIM118
        return out

    a, b = index(ours), index(theirs)
    worst, worst_key = 0.0, None
    for key in sorted(set(a) & set(b)):
        with safe_open(str(a[key]), "pt") as fa, safe_open(str(b[key]), "pt") as fb:
            x = fa.get_tensor(key).to(torch.float64)
            y = fb.get_tensor(key).to(torch.float64)
        rel = float((x - y).norm() / y.norm().clamp(min=1e-30))
        if rel > worst:
            worst, worst_key = rel, key
    return {"compared": len(set(a) & set(b)), "only_ours": len(set(a) - set(b)),
            "only_mergekit": len(set(b) - set(a)), "max_rel_err": worst, "worst_key": worst_key}


def compare_in_child(ours: Path, theirs: Path) -> dict:
    """:func:`compare_outputs` in a child process, so that this process stays small.

    On Linux a child's ``ru_maxrss`` starts from its parent's peak RSS (the parent's memory
    high-water mark is carried into the exec'd child's rusage), so one 2 GB comparison here
    would raise the reported peak of every later run to 2 GB.
    """
    argv = [sys.executable, __file__, "--compare", str(ours), str(theirs)]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


# Read every tensor of a checkpoint, the way TensorIndex did (safe_open handles held open, each
# tensor through the memory map) or does (positioned reads), and touch one byte per 4 KiB page
# (a mapped tensor is read lazily); prints the seconds spent.
READ_CHILD = """
import sys, time
from pathlib import Path
import torch
how, base = sys.argv[1], Path(sys.argv[2])
touch = lambda t: int(t.reshape(-1).view(torch.uint8)[::4096].sum())
t0 = time.perf_counter()
if how == "safe_open":
    from safetensors import safe_open
    handles = [safe_open(str(f), "pt") for f in sorted(base.glob("*.safetensors"))]
    n = sum(touch(h.get_tensor(k)) for h in handles for k in h.keys())
else:
    from starmerge.io.checkpoint import TensorIndex
    idx = TensorIndex.open(base)
    n = sum(touch(idx.get(k)) for k in idx.keys())
print(time.perf_counter() - t0, n)
"""


def read_comparison(base: Path, rounds: int = 2) -> dict:
    """Reading every tensor of ``base`` through safe_open's map and with positioned reads.

    Child processes, alternated (pread first: the page cache is warm for both after the first
    round); per way the fastest round's read seconds and its peak RSS (``ru_maxrss``).
    """
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for how in ("pread", "safe_open"):
            child = C.run_child([sys.executable, "-c", READ_CHILD, how, str(base)], poll_s=POLL_S)
            if child.returncode:
                return {"error": child.stderr[-500:]}
            read_s = float(child.stdout.split()[0])
            row = {"read_s": read_s, "ru_maxrss_bytes": child.ru_maxrss_bytes,
                   "peak_rss_file_bytes": child.peak_rss_file_bytes}
            if how not in best or read_s < best[how]["read_s"]:
                best[how] = row
    best["speed_ratio"] = best["safe_open"]["read_s"] / best["pread"]["read_s"]
    return best


def run(quick: bool, methods: list[str]) -> dict:
    mode = "quick" if quick else "full"
    size = M.SIZES[mode]
    work = C.WORK / f"memory_{mode}"  # the memory benchmark's base and adapters, shared
    inputs = M.build_inputs(size, work)
    t0 = time.perf_counter()
    venv = mergekit_venv(C.WORK)
    res: dict = {"benchmark": "mergekit", "mode": mode, "machine": C.machine_info(),
                 "mergekit": MERGEKIT, "venv_s": round(time.perf_counter() - t0, 1),
                 "size": size, "targets": TARGETS, "methods": {}}
    for method in methods:
        cfg = mergekit_config(work / f"mergekit_{method}.yaml", method, inputs)
        print(f"  {method}: starmerge", flush=True)
        ours_out, theirs_out = work / f"sm_{method}", work / f"mk_{method}"
        ours = run_starmerge(cfg, ours_out)
        print(f"    {ours['wall_s']:.1f} s, rc {ours['returncode']}; mergekit", flush=True)
        theirs = run_mergekit(venv, cfg, theirs_out, work / "mk_lora_cache")
        print(f"    {theirs['wall_s']:.1f} s, rc {theirs['returncode']}", flush=True)
        row = {"config": str(cfg), "starmerge": ours, "mergekit": theirs}
        if ours["returncode"] == 0 and theirs["returncode"] == 0:
            row["speedup"] = theirs["wall_s"] / ours["wall_s"]
            row["memory_fraction"] = ours["ru_maxrss_bytes"] / max(1, theirs["ru_maxrss_bytes"])
            if method == "ties":
                row["parity"] = compare_in_child(ours_out, theirs_out)
        res["methods"][method] = row
        for d in (ours_out, theirs_out, work / "mk_lora_cache"):
            shutil.rmtree(d, ignore_errors=True)
    res["read_base"] = read_comparison(inputs["base"])
    res["machine"]["loadavg_at_end"] = C.load_average()
    return res


def summary_lines(res: dict) -> list[str]:
    lines = []
    for method, row in res.get("methods", {}).items():
        ours, theirs = row["starmerge"], row["mergekit"]
        if "speedup" not in row:
            lines.append(f"mergekit/{method}: a run failed (starmerge rc {ours['returncode']}, "
                         f"mergekit rc {theirs['returncode']})")
            continue
        ok = (row["speedup"] >= TARGETS["speedup_min"]
              and row["memory_fraction"] <= TARGETS["memory_fraction_max"])
        parity = row.get("parity", {}).get("max_rel_err")
        lines.append(
            f"mergekit/{method}: starmerge {ours['wall_s']:.1f} s, {C.mib(ours['ru_maxrss_bytes'])}"
            f" peak, {C.mib(ours['disk_output_bytes'])} written | mergekit {theirs['wall_s']:.1f}"
            f" s, {C.mib(theirs['ru_maxrss_bytes'])} peak, "
            f"{C.mib(theirs['disk_output_bytes'] + theirs['disk_cache_bytes'])} written | "
            f"{row['speedup']:.1f}x faster, {row['memory_fraction']:.3f} of its memory"
            + (f", max rel diff {parity:.1e}" if parity is not None else "")
            + f" [{'PASS' if ok else 'FAIL'}]")
    read = res.get("read_base", {})
    if "speed_ratio" in read:
        lines.append(
            f"read base: pread {read['pread']['read_s']:.2f} s, "
            f"{C.mib(read['pread']['ru_maxrss_bytes'])} peak | safe_open "
            f"{read['safe_open']['read_s']:.2f} s, {C.mib(read['safe_open']['ru_maxrss_bytes'])}"
            f" peak | safe_open/pread time {read['speed_ratio']:.2f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--compare", nargs=2, type=Path, help=argparse.SUPPRESS)  # compare_in_child
    args = p.parse_args(argv)
    if args.compare:
        print(json.dumps(compare_outputs(*args.compare)))
        return 0
    res = run(args.quick, [m for m in args.methods.split(",") if m])
    path = C.write_result("mergekit_quick" if args.quick else "mergekit", res)
    print("\n".join(summary_lines(res)))
    print(f"results: {path}")
    print(json.dumps({m: r.get("parity") for m, r in res["methods"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
