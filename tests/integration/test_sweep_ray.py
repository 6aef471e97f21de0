"""The same sweep on the local executor and on a local Ray instance gives identical results.

The sweep includes a data-driven method (RegMean): each executor collects the statistics into its
own cache directory (the Ray workers, not the driver), and the results still agree.

About 20 s (Ray start-up included), so not marked ``slow``; skipped when ray is not installed.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tests.fixtures.tiny_suites import make_tiny_suite

from starmerge.sweep import ResultsStore, Runtime, run_sweep, sweep_from_dict

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'starmerge[ray]')")
pytest.importorskip("peft")
TASKS = ["sst2", "cola", "stsb"]


def _quiet(_: str) -> None:
    return None


def test_ray_executor_gives_the_local_results(tmp_path):
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Ray workers (one CPU each)
    try:
        suite_file, data = make_tiny_suite("llama-3.2-3b-instruct", tmp_path / "tiny", TASKS, 6)
        sweep = sweep_from_dict({
            "suite": str(suite_file),
            "methods": {"star": {"eta": [20, 40]}, "ties": {}, "regmean": {}},
            "tasks": {"pool": TASKS, "sets": [TASKS], "sizes": [2], "combinations": 1},
            "data": {"n_examples": 3},
        })  # fmt: skip
        runtime = Runtime(device="cpu", data_dir=str(data), stats_dir=str(tmp_path / "s-local"))
        local = run_sweep(sweep, tmp_path / "local", runtime, echo=_quiet)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            runtime = replace(runtime, stats_dir=str(tmp_path / "s-ray"))
            remote = run_sweep(sweep, tmp_path / "ray", runtime, executor="ray", echo=_quiet)
        finally:
            ray.shutdown()
    finally:
        torch.set_num_threads(saved)
    assert sorted(local.ran) == sorted(remote.ran) and len(local.ran) == 14
    entries = sorted(p.name for p in (tmp_path / "s-local").iterdir())
    assert len(entries) == 3 and sorted(p.name for p in (tmp_path / "s-ray").iterdir()) == entries
    a, b = ResultsStore(tmp_path / "local"), ResultsStore(tmp_path / "ray")
    assert a.keys() == b.keys()
    for key in a.keys():
        ra, rb = a.get(key), b.get(key)
        assert ra["job"] == rb["job"] and ra["merge_stats"] == rb["merge_stats"]
        assert ra["results"] == rb["results"], ra["job"]
    for name in local.data:  # the same results files: scores, normalized, CIs
        assert local.data[name]["rows"] == remote.data[name]["rows"]
