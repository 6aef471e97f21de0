"""A local sweep on a tiny Mistral-shaped suite: one model load, interrupt, resume."""

from __future__ import annotations

import pytest
from tests.fixtures.tiny_suites import make_tiny_suite

from starmerge.sweep import ResultsStore, Runtime, run_sweep, sweep_from_dict

pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")
TASKS = ["wino", "qasc", "ncbi"]


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory):
    return make_tiny_suite("mistral-7b-instruct", tmp_path_factory.mktemp("mistral"), TASKS, rows=6)


def _sweep(suite_file):
    return sweep_from_dict({
        "suite": str(suite_file),
        "methods": {"star": {"eta": [20, 40]}, "ties": {}},
        "tasks": {"pool": TASKS, "sets": [TASKS], "sizes": [2], "combinations": 1, "seed": 0},
    })  # fmt: skip


class Killed(Exception):
    pass


def test_interrupted_sweep_resumes_with_only_the_missing_jobs(tiny_mistral, tmp_path):
    suite_file, data = tiny_mistral
    sweep = _sweep(suite_file)
    runtime = Runtime(device="cpu", data_dir=str(data))
    assert len(sweep.jobs) == 6 + 6

    def kill_after_five(line: str) -> None:
        if line.startswith("[4/"):
            raise Killed(line)

    with pytest.raises(Killed):
        run_sweep(sweep, tmp_path, runtime, echo=kill_after_five)
    store = ResultsStore(tmp_path)
    done = {k: store.path(k).stat().st_mtime_ns for k in store.keys()}
    assert len(done) == 4

    lines: list[str] = []
    outcome = run_sweep(sweep, tmp_path, runtime, echo=lines.append)
    assert lines[0] == "12 jobs, 4 already done, 8 to run"
    assert len(outcome.ran) == 8 and not set(outcome.ran) & set(done)
    assert outcome.model_loads == 1  # one base model for the eight jobs
    # Each task's vector is read once, its STAR factors computed once per eta, whatever the
    # number of task sets that contain it (the seed recomputed everything per merge).
    assert outcome.cache["task_vectors"] <= 3
    assert outcome.cache["task_transforms"] <= 3 * 2
    assert all(store.path(k).stat().st_mtime_ns == t for k, t in done.items())  # untouched
    assert len(store.keys()) == 12

    again = run_sweep(sweep, tmp_path, runtime, echo=lines.append)
    assert again.ran == [] and again.model_loads == 0
    assert sorted(n.split("-")[0] for n in outcome.results) == ["2", "3"]
    assert len(list((tmp_path / "results").glob("*.json"))) == 2
    summary = (tmp_path / "summary.md").read_text()
    assert '| star | {"eta": 20.0} | 2 | 1 |' in summary
    record = next(r for r in store.records() if r["job"]["kind"] == "merge")
    assert record["results"]["qasc"]["metric"] == "token_f1"
    assert record["results"]["ncbi"]["metric"] == "contains_gold"
    assert "kept_ranks" in record["merge_stats"] or "state" in record["merge_stats"]
