"""``starmerge reproduce`` end to end on tiny T5-, Llama- and Mistral-shaped suites (offline).

Each tiny suite includes the built-in suite (its task files, prompts and label words) and points
it at tiny random models, PEFT adapters made on them, and local dataset files in the hub schema.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from tests.fixtures.tiny_suites import make_tiny_suite

from starmerge.cli_sweep import reproduce as reproduce_cmd
from starmerge.eval.results import load_results
from starmerge.reproduce import reproduce
from starmerge.sweep import ResultsStore, Runtime

pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

FLAN = ["mnli", "qqp", "hella", "boolq"]  # two FusionBench-style adapters, two full checkpoints


@pytest.fixture(scope="module")
def tiny_flan(tmp_path_factory):
    return make_tiny_suite("flan-t5-large", tmp_path_factory.mktemp("flan"), FLAN, rows=8)


def _quiet(_: str) -> None:
    return None


def test_flan_reproduce_end_to_end_resumes_and_never_overwrites(tiny_flan, tmp_path):
    suite_file, data = tiny_flan
    runtime = Runtime(device="cpu", data_dir=str(data))
    out = reproduce(suite_file, tmp_path, tasks=FLAN, runtime=runtime, echo=_quiet)
    assert len(out.jobs) == 8 + 5 and len(out.ran) == 13 and out.model_loads == 1
    (name,) = out.results
    results = load_results(out.results[name])
    assert list(results["tasks"]) == FLAN  # the suite's (seed table) column order
    names = ["base", "individual", "simple_average", "ties", "tall_masks", "metagpt", "star"]
    assert [r["name"] for r in results["rows"]] == names
    assert results["tasks"]["hella"]["metric"] == "accuracy"
    preds = results["predictions"]["star"]["boolq"]
    assert {p["gold"] for p in preds} <= {"True", "False"} and "output" in preds[0]
    table = out.tables[name].read_text()
    assert table.count("\n| ") == 1 + 7 and "| Model | Avg. Normalized | mnli | qqp |" in table

    # A second run finds everything done; a different task set reuses the bounds and writes
    # its own file (the seed overwrote pretrained.json / lora.json on every run).
    first = load_results(out.results[name])["rows"]
    again = reproduce(suite_file, tmp_path, tasks=FLAN, runtime=runtime, echo=_quiet)
    assert again.ran == []
    other = reproduce(suite_file, tmp_path, tasks=["mnli", "qqp"], methods=["star"],
                      runtime=runtime, echo=_quiet)  # fmt: skip
    assert len(other.ran) == 1  # only the new merge; bounds came from the store
    assert len(list((tmp_path / "results").glob("*.json"))) == 2
    assert load_results(out.results[name])["rows"] == first  # same run: same file, same rows


def test_flan_full_keys_changed_is_its_own_set_of_results(tiny_flan, tmp_path):
    from starmerge.sweep import RunOptions

    suite_file, data = tiny_flan
    runtime = Runtime(device="cpu", data_dir=str(data))
    kw = {"tasks": ["hella", "boolq"], "methods": ["star"], "runtime": runtime, "echo": _quiet}
    qv = reproduce(suite_file, tmp_path, **kw)
    changed = reproduce(suite_file, tmp_path, options=RunOptions(full_keys="changed"), **kw)
    assert len(changed.ran) == 5 and not set(changed.ran) & set(qv.ran)
    store = ResultsStore(tmp_path)
    a, b = (store.get(out.ran[-1])["results"] for out in (qv, changed))
    assert a == b  # tiny checkpoints only changed q/v: the same task vectors


@pytest.mark.parametrize(
    ("suite", "tasks"),
    [("llama-3.2-3b-instruct", ["sst2", "stsb", "copa"]),
     ("mistral-7b-instruct", ["wino", "dream", "gap"])],
)  # fmt: skip
def test_causal_suites_reproduce_end_to_end_from_the_cli(suite, tasks, tmp_path):
    suite_file, data = make_tiny_suite(suite, tmp_path / "tiny", tasks, rows=6)
    res = CliRunner().invoke(reproduce_cmd, [
        str(suite_file), "--tasks", ",".join(tasks), "--methods", "star,ties,metagpt",
        "--data-dir", str(data), "--device", "cpu", "--out", str(tmp_path / "out")])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "9 jobs, 0 already done, 9 to run" in res.output
    (results_file,) = (tmp_path / "out" / "results").glob("*.json")
    results = load_results(results_file)
    assert [r["name"] for r in results["rows"]] == ["base", "individual", "star", "ties", "metagpt"]
    if suite.startswith("llama"):
        assert results["tasks"]["stsb"]["metric"] == "spearman"
        preds = results["predictions"]["star"]["stsb"]
        assert all(0 <= p["pred"] <= 5 for p in preds)  # clipped as the seed does
    else:
        assert results["tasks"]["gap"]["metric"] == "contains_gold"
    (table,) = (tmp_path / "out").glob("*.md")
    assert f"| Model | Avg. Normalized | {' | '.join(tasks)} | 95% CI |" in table.read_text()


@pytest.mark.slow
def test_flan_default_reproduction_prints_the_seed_numbers(tmp_path):
    suite_file, data = make_tiny_suite("flan-t5-large", tmp_path / "tiny", rows=6)
    runtime = Runtime(device="cpu", data_dir=str(data))
    out = reproduce(suite_file, tmp_path / "out", options=None, runtime=runtime, echo=_quiet)
    assert set(out.tables) == {"random-10", "all-13"} and len(out.jobs) == 36
    table = out.tables["random-10"].read_text()
    assert "| base | " in table and "(89.62)" in table and "(95.20)" in table
    assert "| simple_average | " in table and "(92.42)" in table
    assert "ours (seed README)" in table


@pytest.mark.slow
def test_killed_sweep_process_restarts_with_only_the_missing_jobs(tiny_flan, tmp_path):
    suite_file, data = tiny_flan
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(json.dumps({
        "suite": str(suite_file), "methods": {"star": {"eta": [10, 20, 30, 40, 60, 80]}},
        "tasks": {"sets": [FLAN]}}))  # fmt: skip
    out = tmp_path / "out"
    code = ("import sys; from starmerge.cli_sweep import sweep; "
            "sweep(sys.argv[1:], standalone_mode=True)")  # fmt: skip
    args = [sys.executable, "-c", code, str(sweep_file), "--out", str(out), "--device", "cpu",
            "--data-dir", str(data)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = ResultsStore(out)
    deadline = time.time() + 240
    while len(store.keys()) < 9 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = set(store.keys())
    assert 9 <= len(done) < 14, "the sweep finished (or never started) before the kill"
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"14 jobs, {len(done)} already done, {14 - len(done)} to run" in res.stdout
    assert len(store.keys()) == 14
