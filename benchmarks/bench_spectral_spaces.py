"""Per-module cost of the merge spaces (``docs/spaces.md``, "Cost"), in process, one thread.

One 4096 x 4096 module, 12 rank-16 float32 LoRA deltas (scale 2, seeded Gaussian factors), run
through ``starmerge.api.merge_deltas`` (and ``starmerge.tensors.spaces.project`` for the basis
alone) on one torch thread: the basis and the coordinates; densifying the 12 deltas and summing
them (what the full space starts with); ``task_arithmetic`` and ``ties`` (its two fit passes and
the merge) in each space. Each time is the fastest of ``--repeats`` runs; the load average and
the cores other processes used are recorded next to them (this machine is shared).

Usage: python benchmarks/bench_spectral_spaces.py [--repeats 3]
Writes benchmarks/results/spectral_spaces.json.
"""

from __future__ import annotations

import argparse
import sys
import time

import common as C
import torch

from starmerge.api import merge_deltas
from starmerge.tensors.delta import LowRank
from starmerge.tensors.spaces import project

SHAPE, TASKS, RANK, SCALE = (4096, 4096), 12, 16, 2.0
SPACES = ("full", "core", "knots")


def adapters(seed: int = 0) -> list[LowRank]:
    """The 12 task deltas of one module (LoRA-like magnitudes)."""
    g = torch.Generator().manual_seed(seed)
    m, n = SHAPE
    return [
        LowRank(
            torch.randn(m, RANK, generator=g) * 0.01,
            torch.randn(RANK, n, generator=g) * 0.01,
            SCALE,
        )
        for _ in range(TASKS)
    ]


def fastest(fn, repeats: int) -> dict:
    """The fastest wall and CPU seconds of ``repeats`` calls, and the load meanwhile."""
    walls, cpus = [], []
    with C.ForeignLoad() as load:
        for _ in range(repeats):
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
    return {"wall_s": min(walls), "cpu_s": min(cpus), "foreign_load_cores": load.cores}


def cases(deltas: list[LowRank]) -> dict:
    """name -> a call that runs it once."""
    tasks = [{"w": d} for d in deltas]
    out = {
        f"basis+coordinates {space}": (lambda s=space: project(deltas, s).coords)
        for space in ("core", "knots")
    }
    out["densify+sum full"] = lambda: sum(d.to_dense() for d in deltas)
    for method in ("task_arithmetic", "ties"):
        for space in SPACES:
            out[f"{method} {space}"] = lambda m=method, s=space: merge_deltas(m, tasks, space=s)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    result = {
        "benchmark": "spectral_spaces",
        "machine": C.machine_info(),
        "module": {"shape": SHAPE, "tasks": TASKS, "rank": RANK, "scale": SCALE},
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "timings": {},
    }
    deltas = adapters()
    for name, fn in cases(deltas).items():
        result["timings"][name] = r = fastest(fn, args.repeats)
        print(
            f"  {name:24s} {r['wall_s']:7.3f} s wall, {r['cpu_s']:7.3f} s CPU "
            f"(others' load {r['foreign_load_cores']} cores)",
            flush=True,
        )
    result["machine"]["loadavg_at_end"] = C.load_average()
    print(f"-> {C.write_result('spectral_spaces', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
