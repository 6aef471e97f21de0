"""Run every benchmark (``make bench``), one child process each, and print a summary.

Each benchmark writes ``benchmarks/results/<name>.json`` (machine, torch version, date, load
average, raw timings, verdicts). Inputs are synthetic and cached under ``benchmarks/work/``
(git-ignored), so a second run skips building them. Performance targets are reported here as
PASS/FAIL, never asserted: the exit status is non-zero only when a benchmark itself crashed.

Usage: python benchmarks/run_all.py [--quick] [--only star,memory,methods,spectral,regression]
Full run: well over an hour on 2 cores (spectral about 50 minutes, memory about 30);
--quick: about 3 minutes (small sizes, no targets).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_memory  # noqa: E402
import bench_methods  # noqa: E402
import bench_regression  # noqa: E402
import bench_spectral  # noqa: E402
import bench_star  # noqa: E402
import common as C  # noqa: E402

BENCHMARKS = {  # name -> (script, module with summary_lines, result name)
    "star": ("bench_star.py", bench_star, "star"),
    "memory": ("bench_memory.py", bench_memory, "memory"),
    "methods": ("bench_methods.py", bench_methods, "methods"),
    "spectral": ("bench_spectral.py", bench_spectral, "spectral"),
    "regression": ("bench_regression.py", bench_regression, "regression"),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHMARKS)}")

    info = C.machine_info()
    print(f"benchmarks on {info['cpu']} ({info['cpu_count']} cores), torch {info['torch']}, "
          f"load average {info['loadavg_at_start']}", flush=True)
    crashed, lines, timings = [], [], {}
    for name in names:
        script, module, result = BENCHMARKS[name]
        cmd = [sys.executable, str(HERE / script)] + (["--quick"] if args.quick else [])
        print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        code = subprocess.call(cmd, cwd=C.ROOT)
        timings[name] = round(time.perf_counter() - t0, 1)
        path = C.RESULTS / f"{result}{'_quick' if args.quick else ''}.json"
        if code != 0 or not path.is_file():
            crashed.append(name)
            lines.append(f"{name}: CRASHED (exit {code}); see the output above")
            continue
        lines.extend(module.summary_lines(json.loads(path.read_text())))

    print("\n" + "=" * 100)
    print(f"summary ({'quick' if args.quick else 'full'}; seconds per benchmark: {timings}; "
          f"load average now {C.load_average()})")
    print("\n".join(lines))
    print(f"results: {C.RESULTS}/")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
