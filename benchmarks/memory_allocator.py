"""The time cost of the merge's allocator settings: the same merges with and without them.

The engine fixes glibc's mmap threshold at 1 MiB (``starmerge.memory.bounded_allocator``), so
every tensor of 1 MiB or more is mapped when allocated and unmapped when freed (its pages are
faulted in and zeroed each time), and the CLI asks torch for huge pages for tensors of 2 MiB and
more (``prefer_huge_pages``), which makes those faults 512 times fewer. Here each method merges
``bench_memory.py``'s inputs (model output) with three settings, ``--repeats`` times each, the
order rotated every repeat, in one run:

- ``bounded_thp``: ``starmerge merge`` as a user runs it (both settings);
- ``bounded``: the same with ``THP_MEM_ALLOC_ENABLE=0`` (torch's small pages);
- ``glibc_default``: small pages and glibc's dynamic threshold (``bounded_allocator`` made a
  no-op before the merge): what the merge did before either setting.

The cost is the ratio of the medians of the merge's own wall time (the manifest's
``wall_time_s``) to ``glibc_default``'s; CPU time and peak RssAnon are recorded next to it, and
how many cores other processes used (``foreign_load_cores``).

Usage: python benchmarks/memory_allocator.py [--quick] [--methods ties,star] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import bench_memory as B
import common as C
from memory_inputs import build_inputs

# The CLI with the allocator left to glibc: ``bounded_allocator`` returns its recorded outcome.
GLIBC_DEFAULT = (
    "import sys; import starmerge.memory as m; m._bounded.append(False); "
    "from starmerge.cli import main; sys.exit(main(sys.argv[1:]))"
)
NO_THP = {"THP_MEM_ALLOC_ENABLE": "0"}  # torch's small pages (the CLI keeps a user's value)
# name: (argv, environment overrides). "bounded_thp" is the CLI as a user runs it.
ALLOCATORS = {
    "bounded_thp": ([C.STARMERGE], {}),
    "bounded": ([C.STARMERGE], NO_THP),
    "glibc_default": ([sys.executable, "-c", GLIBC_DEFAULT], NO_THP),
}


def merge_once(allocator: str, config: Path, out: Path) -> dict:
    """One merge with ``allocator``: wall and CPU seconds, peak RssAnon, the manifest's time."""
    cmd, env = ALLOCATORS[allocator]
    argv = [*cmd, "merge", str(config), str(out), "--overwrite", "--quiet"]
    child_env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | env
    with C.ForeignLoad() as load:
        run = C.run_child(argv, poll_s=B.POLL_S, env=child_env)
    res = {
        "returncode": run.returncode,
        "wall_s": run.wall_s,
        "cpu_s": run.cpu_s,
        "peak_rss_anon_bytes": run.peak_rss_anon_bytes,
        "foreign_load_cores": load.cores,
    }
    if run.returncode == 0:
        res["merge_wall_s"] = C.manifest(out).get("wall_time_s")
    else:
        res["stderr_tail"] = run.stderr[-2000:]
    shutil.rmtree(out, ignore_errors=True)
    return res


def compare(method: str, config: Path, work: Path, repeats: int) -> dict:
    """``repeats`` merges with each allocator, alternating; medians and their ratios."""
    runs: dict[str, list[dict]] = {name: [] for name in ALLOCATORS}
    for rep in range(repeats):  # the order rotates every repeat
        names = list(ALLOCATORS)
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            runs[name].append(merge_once(name, config, work / f"out_{method}_{name}"))
    out: dict = {"runs": runs}
    if any(r["returncode"] for rs in runs.values() for r in rs):
        out["failed"] = True
        return out
    for field in ("merge_wall_s", "cpu_s", "peak_rss_anon_bytes"):
        med = {name: C.median([r[field] for r in rs]) for name, rs in runs.items()}
        out[f"median_{field}"] = med
        out[f"over_default_{field}"] = {n: v / med["glibc_default"] for n, v in med.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (bench_memory --quick)")
    p.add_argument("--methods", default="ties,star", help="comma-separated method names")
    p.add_argument("--repeats", type=int, default=3, help="merges per allocator and method")
    args = p.parse_args(argv)
    mode = "quick" if args.quick else "full"
    work = C.WORK / f"memory_{mode}"
    inputs = build_inputs(B.SIZES[mode], work)
    listed = B.registry()
    result = {
        "benchmark": "memory_allocator",
        "mode": mode,
        "machine": C.machine_info(),
        "repeats": args.repeats,
        "mmap_threshold_bytes": 2**20,
        "methods": {},
    }
    for method in [m for m in args.methods.split(",") if m]:
        config = B.write_config(method, inputs, work, listed.get(method, {}))
        res = compare(method, config, work, args.repeats)
        result["methods"][method] = res
        if res.get("failed"):
            print(f"{method}: FAILED", flush=True)
            continue
        wall, rss = res["median_merge_wall_s"], res["median_peak_rss_anon_bytes"]
        ratio, cpu = res["over_default_merge_wall_s"], res["over_default_cpu_s"]
        print(f"{method} (merge wall, its ratio to glibc's default, CPU ratio, peak RssAnon):")
        for name in ALLOCATORS:
            print(
                f"  {name:14s} {wall[name]:7.2f} s  {ratio[name]:.3f}x  CPU {cpu[name]:.3f}x  "
                f"{C.mib(rss[name])}",
                flush=True,
            )
    result["machine"]["loadavg_at_end"] = C.load_average()
    path = C.write_result(f"memory_allocator{'_quick' if args.quick else ''}", result)
    print(
        f"load average {result['machine']['loadavg_at_start']} -> "
        f"{result['machine']['loadavg_at_end']}; -> {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
