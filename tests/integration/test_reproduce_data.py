"""Data-driven methods in ``starmerge reproduce`` and ``starmerge sweep`` on tiny suites (offline).

Statistics and trained masks come from each task's training rows (never the evaluated ones),
through the same collector as ``starmerge merge``, into the statistics cache; a second sweep
point, another method reading the same statistics, and a re-run reuse the entries.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from tests.fixtures.tiny_suites import make_tiny_suite

from starmerge.cli import main
from starmerge.errors import StarmergeError
from starmerge.eval.results import load_results
from starmerge.reproduce import reproduce
from starmerge.suites import load_suite
from starmerge.suites.data import build_examples, load_task_rows
from starmerge.suites.training import training_examples
from starmerge.sweep import (
    DataOptions,
    ResultsStore,
    RunOptions,
    Runtime,
    run_sweep,
    sweep_from_dict,
)
from starmerge.sweep.workbench import Workbench

pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = ["mnli", "qqp", "finance", "hella"]  # two adapters, two full checkpoints
DATA = DataOptions(n_examples=4, batch_size=2)
TRAINED = {"mode": "trained", "steps": 2}


@pytest.fixture(scope="module")
def tiny_flan(tmp_path_factory):
    return make_tiny_suite(
        "flan-t5-large", tmp_path_factory.mktemp("flan"), TASKS, rows=8, train_rows=10
    )


def _quiet(_: str) -> None:
    return None


def _runtime(data, stats):
    return Runtime(device="cpu", data_dir=str(data), stats_dir=str(stats), progress=False)


def test_data_methods_reproduce_end_to_end_from_training_rows(tiny_flan, tmp_path):
    suite_file, data = tiny_flan
    methods = ["regmean", "fisher_merging", "mats", "localize_stitch", "star"]
    kw = {
        "tasks": TASKS,
        "methods": methods,
        "params": {"localize_stitch": TRAINED},
        "data": DATA,
        "runtime": _runtime(data, tmp_path / "stats"),
        "echo": _quiet,
    }
    out = reproduce(suite_file, tmp_path / "out", **kw)
    assert len(out.ran) == 8 + 5 and out.model_loads == 1
    # Per task: Fisher, Gram (regmean; mats' regmean objective reuses it) and masks.
    assert out.cache["statistics_computed"] == 3 * 4 and out.cache["statistics_reused"] == 4
    assert len(list((tmp_path / "stats").iterdir())) == 12
    (name,) = out.results
    results = load_results(out.results[name])
    assert [r["name"] for r in results["rows"]] == ["base", "individual", *methods]
    used = results["config"]["data"]
    assert set(used) == {"regmean", "fisher_merging", "mats", "localize_stitch"}  # not star
    assert used["regmean"]["options"] == {
        "n_examples": 4,
        "seed": 0,
        "batch_size": 2,
        "max_length": 512,
    }
    mnli, finance = used["regmean"]["tasks"]["mnli"], used["regmean"]["tasks"]["finance"]
    assert mnli["source"] == {
        "path": "nyu-mll/glue",
        "config": "mnli",
        "split": "train",
        "revision": None,
    }
    assert len(mnli["rows"]) == 4 and mnli["held_out"] == 0 and mnli["rows_available"] == 10
    assert finance["transform"] == "seed_train_split" and finance["held_out"] == 1
    assert used["mats"]["tasks"]["mnli"]["statistics"] == mnli["statistics"]  # one entry
    store = ResultsStore(tmp_path / "out")
    star = next(r for r in store.records() if r["job"]["method"] == "star")
    assert "data" not in star["job"] and "data" not in star["merge_stats"]
    ls = next(r for r in store.records() if r["job"]["method"] == "localize_stitch")
    assert ls["merge_stats"]["state"]["mode"] == "trained"
    assert 0 < sum(ls["merge_stats"]["state"]["kept"])

    again = reproduce(suite_file, tmp_path / "out", **kw)
    assert again.ran == [] and len(list((tmp_path / "stats").iterdir())) == 12


def test_training_rows_never_include_the_evaluated_rows(tiny_flan, tmp_path):
    suite_file, data = tiny_flan
    suite = load_suite(suite_file)
    # financial_phrasebank: one split, cut 90/10 by the seed; statistics use the other 90 %.
    lines = (data / "takala/financial_phrasebank/sentences_allagree/train.jsonl").read_text()
    n = len(lines.splitlines())
    test = {int(i) for i in np.random.default_rng(42).permutation(n)[: math.ceil(0.1 * n)]}
    _, examples, notes = training_examples(suite.task("finance"), n - len(test), 0, data)
    assert sorted(notes["rows"]) == sorted(set(range(n)) - test)
    assert [e.index for e in examples] == notes["rows"]
    with pytest.raises(StarmergeError) as err:
        training_examples(suite.task("finance"), n - len(test) + 1, 0, data)
    assert str(err.value) == (
        f"task 'finance': data.n_examples is {n - len(test) + 1} but its training data "
        f"takala/financial_phrasebank (sentences_allagree) [train] has only {n - len(test)} "
        f"usable rows after holding out the {len(test)} evaluated rows; lower data.n_examples "
        "or point the task's `train:` at a larger split"
    )
    # Training rows declared on the evaluated split itself: the evaluation sample is held out.
    own = tmp_path / "own.yaml"
    own.write_text(
        json.dumps(
            {
                "include": str(suite_file),
                "tasks": {"mnli": {"train": {"config": "mnli_matched", "split": "validation"}}},
            }
        )
    )
    task = load_suite(own).task("mnli")
    _, evaluated, _ = build_examples(task.spec(), load_task_rows(task.spec(), data))
    free = 8 - len(evaluated)
    assert 0 < free < 8
    _, examples, notes = training_examples(task, free, 0, data)
    assert notes["held_out"] == len(evaluated)
    assert not {e.index for e in examples} & {e.index for e in evaluated}


def test_sweep_collects_each_tasks_statistics_once_and_reuses_them(tiny_flan, tmp_path):
    suite_file, data = tiny_flan
    pool = ["mnli", "qqp", "hella"]
    sweep = sweep_from_dict(
        {
            "suite": str(suite_file),
            "methods": {"regmean": {"shrinkage": [0.5, 0.9]}, "localize_stitch": TRAINED},
            "tasks": {"pool": pool, "sizes": [2], "combinations": 3},
            "bounds": False,
            "data": {"n_examples": 4, "batch_size": 2},
        }
    )
    stats = tmp_path / "stats"
    out = run_sweep(sweep, tmp_path / "a", _runtime(data, stats), echo=_quiet)
    assert len(out.ran) == 3 * 3  # (2 shrinkages + masks) x 3 task pairs
    # Each task's Gram and masks once; every other sweep point that contains it reuses them.
    assert out.cache["statistics_computed"] == 2 * 3
    assert out.cache["statistics_reused"] == 3 * 3 * 2 - 2 * 3
    entries = sorted(p.name for p in stats.iterdir())
    assert len(entries) == 6
    records = [r for r in ResultsStore(tmp_path / "a").records()]
    keys = {
        r["merge_stats"]["data"]["mnli"]["statistics"]
        for r in records
        if "mnli" in r["job"]["tasks"] and r["job"]["method"] == "regmean"
    }
    assert len(keys) == 1 and keys <= set(entries)
    summary = (tmp_path / "a" / "summary.md").read_text()
    assert '| regmean | {"shrinkage": 0.5} | 2 | 3 |' in summary

    # Another sweep point in a new process state (new workbench, new results dir): all reused.
    more = sweep_from_dict({**sweep.source, "methods": {"regmean": {"shrinkage": 0.7}}})
    again = run_sweep(more, tmp_path / "b", _runtime(data, stats), echo=_quiet)
    assert len(again.ran) == 3 and again.cache["statistics_computed"] == 0
    assert sorted(p.name for p in stats.iterdir()) == entries


def test_bad_data_input_is_one_error_line_before_any_job(tiny_flan, tmp_path, capsys):
    suite_file, data = tiny_flan
    common = [
        str(suite_file),
        "--tasks",
        "mnli,qqp",
        "--methods",
        "regmean",
        "--device",
        "cpu",
        "--data-dir",
        str(data),
        "--stats-dir",
        str(tmp_path / "stats"),
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(["reproduce", *common, "--data", "n_examples=11"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: task 'mnli': data.n_examples is 11 but its training data nyu-mll/glue (mnli) "
        "[train] has only 10 usable rows; lower data.n_examples or point the task's `train:` at "
        "a larger split\n"
    )
    assert not (tmp_path / "out" / "jobs").exists()  # not even the bounds ran
    assert main(["reproduce", *common, "--data", "n_exampels=3"]) == 2
    assert "unknown key data.n_exampels. Did you mean: n_examples?" in capsys.readouterr().err
    bare = tmp_path / "bare.yaml"  # a suite that declares no training data
    bare.write_text(json.dumps({"include": str(suite_file), "train": None}))
    missing = "suite 'flan-t5-large' task 'hella' declares no training data"
    with pytest.raises(StarmergeError, match=missing):
        reproduce(
            bare,
            tmp_path / "bare",
            tasks=["qqp", "hella"],
            methods=["regmean"],
            runtime=_runtime(data, tmp_path / "stats"),
            echo=_quiet,
        )
    assert not (tmp_path / "bare" / "jobs").exists()


def test_a_stats_memory_below_one_module_names_the_option(tiny_flan, tmp_path, capsys):
    suite_file, data = tiny_flan
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        json.dumps(
            {
                "suite": str(suite_file),
                "methods": {"regmean": {}},
                "tasks": {"sets": [["mnli", "qqp"]]},
                "bounds": False,
                "data": {"n_examples": 2, "batch_size": 2},
            }
        )
    )
    code = main(
        [
            "sweep",
            str(sweep),
            "--device",
            "cpu",
            "--data-dir",
            str(data),
            "--quiet",
            "--stats-dir",
            str(tmp_path / "stats"),
            "--stats-memory",
            "1KB",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "error: statistics of encoder." in err  # after progress bars
    assert err.rstrip().endswith("but --stats-memory is 1000; raise --stats-memory")


def test_causal_chat_suite_statistics_use_the_evaluated_prompts(tmp_path):
    tasks = ["sst2", "stsb"]  # stsb: a numeric answer ("3.8")
    suite_file, data = make_tiny_suite("llama-3.2-3b-instruct", tmp_path / "tiny", tasks, rows=6)
    runtime = _runtime(data, tmp_path / "stats")
    options = DataOptions(n_examples=3, batch_size=3)
    out = reproduce(
        suite_file,
        tmp_path / "out",
        tasks=tasks,
        methods=["fisher_merging"],
        data=options,
        runtime=runtime,
        echo=_quiet,
    )
    assert out.cache["statistics_computed"] == 2
    bench = Workbench(load_suite(suite_file), RunOptions(), runtime)
    backend = bench.backend
    (batch,), _ = bench.data.batches(backend, "stsb", options)
    _, examples, _ = bench.data.examples("stsb", options)
    bos = backend.tokenizer.bos_token_id
    for row, ex in enumerate(examples):
        mask = batch["attention_mask"][row].bool()
        ids = batch["input_ids"][row][mask].tolist()
        prompt = backend.encode(backend.render(ex.input))  # the chat template, as evaluated
        answer = backend.tokenizer(f"{ex.label:g}", add_special_tokens=False)["input_ids"]
        assert ids == prompt + answer and ids.count(bos) == 1
        assert [t for t in batch["labels"][row].tolist() if t != -100] == answer
