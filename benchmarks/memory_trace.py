"""Where a merge's anonymous memory peaks: run a config in-process, tag phases, sample RssAnon.

A diagnostic for ``bench_memory.py`` (run on a method that misses its bound): the merge runs
through ``starmerge.api.merge`` while a thread samples ``RssAnon`` from ``/proc/self/status``
every 5 ms. ``Plan.read`` and ``engine.fit_state`` are wrapped (read-only: they only record which
stage, pass and parameter the library is in), so every sample is attributed to a phase.

Usage: python benchmarks/memory_trace.py CONFIG.yaml OUT_DIR   (prints one JSON object)
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class Tracer:
    """Samples RssAnon and keeps, per phase, the peak and the parameter being processed then."""

    def __init__(self) -> None:
        self.stage, self.phase, self.key = "plan", "plan", None
        self.peaks: dict[str, dict] = {}
        self.timeline: list[tuple[float, str, int]] = []
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last = -1.0
        while not self._stop.is_set():
            value, phase, key = rss_anon(), self.phase, self.key
            peak = self.peaks.setdefault(phase, {"peak_rss_anon_bytes": 0, "key": None})
            if value > peak["peak_rss_anon_bytes"]:
                peak.update(peak_rss_anon_bytes=value, key=key)
            now = time.perf_counter() - self.t0
            if now - last >= 0.25:  # a coarse timeline for the record
                self.timeline.append((round(now, 2), phase, value))
                last = now
            time.sleep(0.005)

    def __enter__(self) -> Tracer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str]) -> int:
    config, out_dir = Path(argv[0]), Path(argv[1])
    import starmerge.engine as engine
    import starmerge.plan as plan_mod
    from starmerge.api import merge

    tracer = Tracer()
    visits: dict[str, int] = {}
    original_read, original_fit = plan_mod.Plan.read, engine.fit_state

    def read(self, key: str):
        visits[key] = visits.get(key, 0) + 1
        tracer.key = key
        tracer.phase = f"fit pass {visits[key]}" if tracer.stage == "fit" else "merge+write"
        return original_read(self, key)

    def fit_state(*args, **kwargs):
        tracer.stage = tracer.phase = "fit"
        try:
            return original_fit(*args, **kwargs)
        finally:
            tracer.stage = tracer.phase = "merge+write"

    plan_mod.Plan.read = read
    engine.fit_state = fit_state
    with tracer:
        start = rss_anon()
        merge(config, out_dir, overwrite=True)
        tracer.phase = "after merge"
        time.sleep(0.05)
    print(json.dumps({"rss_anon_before_merge_bytes": start, "phases": tracer.peaks,
                      "timeline": tracer.timeline}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
