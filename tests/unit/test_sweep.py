"""Sweep files, job keys, the results store, cached STAR, collation and the dry run (no models)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from starmerge.api import merge_deltas
from starmerge.cli_sweep import reproduce as reproduce_cmd
from starmerge.cli_sweep import sweep as sweep_cmd
from starmerge.errors import ConfigError
from starmerge.reproduce import reproduce, reproduce_jobs, task_sets
from starmerge.suites import load_suite
from starmerge.suites.training import train_spec
from starmerge.sweep import (
    DataOptions,
    Job,
    ResultsStore,
    RunOptions,
    Runtime,
    job_key,
    merge_job,
    random_subsets,
    sweep_from_dict,
)
from starmerge.sweep.collate import build_results, seed_markdown
from starmerge.sweep.workbench import Workbench
from starmerge.tensors.delta import Dense, LowRank


@pytest.fixture(scope="module")
def flan():
    return load_suite("flan-t5-large")


def test_job_key_covers_the_full_config_and_nothing_else(flan):
    a = merge_job("star", {"eta": 40}, ["qqp", "qnli", "mnli"])
    b = merge_job("star", {}, ["mnli", "qnli", "qqp"])  # defaults filled, order irrelevant
    assert a == b and job_key(flan, a, RunOptions()) == job_key(flan, b, RunOptions())
    # The seed sorted by first letter only: "qnli qqp" and "qqp qnli" gave two directories.
    assert job_key(flan, merge_job("star", {}, ["qqp", "qnli"]), RunOptions()) == job_key(
        flan, merge_job("star", {}, ["qnli", "qqp"]), RunOptions()
    )
    keys = {
        job_key(flan, a, RunOptions()),
        job_key(flan, merge_job("star", {"eta": 20}, a.tasks), RunOptions()),
        job_key(flan, merge_job("ties", {}, a.tasks), RunOptions()),
        job_key(flan, a, RunOptions(dtype="bfloat16")),
        job_key(flan, a, RunOptions(limit=5)),
        job_key(flan, Job("base", ("mnli",)), RunOptions()),
        job_key(flan, Job("individual", ("mnli",)), RunOptions()),
    }
    assert len(keys) == 7
    assert job_key(flan, a, RunOptions(dtype="float32")) == job_key(flan, a, RunOptions())


def test_job_key_changes_with_a_task_model(flan, tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("include: flan-t5-large\ntasks:\n  mnli: {adapter: /elsewhere/mnli}\n")
    job = Job("individual", ("mnli",))
    assert job_key(flan, job, RunOptions()) != job_key(load_suite(f), job, RunOptions())
    other = Job("individual", ("qqp",))
    assert job_key(flan, other, RunOptions()) == job_key(load_suite(f), other, RunOptions())


def test_random_subsets_are_deterministic_and_distinct():
    pool = [f"t{i}" for i in range(13)]
    subsets = random_subsets(pool, [6, 9, 10, 12], 5, seed=0)
    assert len(subsets) == 20 and len(set(subsets)) == 20
    assert subsets == random_subsets(pool, [6, 9, 10, 12], 5, seed=0)
    assert subsets != random_subsets(pool, [6, 9, 10, 12], 5, seed=1)
    assert [len(s) for s in subsets] == [6] * 5 + [9] * 5 + [10] * 5 + [12] * 5
    assert len(random_subsets(pool, [12], 20, seed=0)) == 13  # only 13 exist


def test_sweep_grid_random_and_bounds():
    sweep = sweep_from_dict(
        {
            "suite": "flan-t5-large",
            "methods": {"star": {"eta": [20, 40]}, "ties": {"density": 0.1}},
            "tasks": {"sizes": [6], "combinations": 3, "seed": 0},
        }
    )
    merges = [j for j in sweep.jobs if j.kind == "merge"]
    assert len(merges) == 9 and len(sweep.task_sets) == 3
    used = {t for j in merges for t in j.tasks}
    assert {j.tasks[0] for j in sweep.jobs if j.kind == "base"} == used
    rnd = sweep_from_dict(
        {
            "suite": "flan-t5-large",
            "methods": {"star": {"eta": [10, 20, 30, 40]}},
            "tasks": {"all": True, "sets": [["mnli", "qqp"]]},
            "search": {"mode": "random", "samples": 3, "seed": 1},
            "bounds": False,
        }
    )
    assert len(rnd.jobs) == 3 and all(j.kind == "merge" for j in rnd.jobs)


def test_sweep_errors_are_listed_at_once():
    with pytest.raises(ConfigError) as err:
        sweep_from_dict(
            {
                "suite": "flan-t5-large",
                "method": {},
                "methods": {"star": {"etta": 3}, "tiess": {}},
                "tasks": {"sets": [["mnli", "nope"]], "sizes": [40]},
                "options": {"dtyp": "x"},
            }
        )
    text = str(err.value)
    for fragment in (
        "unknown key method. Did you mean: methods?",
        "etta",
        "tiess",
        "nope",
        "tasks.sizes",
        "dtyp",
    ):
        assert fragment in text


def test_store_writes_atomically_and_lists_keys(tmp_path):
    store = ResultsStore(tmp_path)
    assert store.keys() == [] and not store.has("k1")
    store.put({"key": "k1", "results": {}})
    assert store.has("k1") and store.get("k1")["key"] == "k1"
    (store.dir / ".k2.json.tmp123").write_text("{half")  # a killed writer's leftover
    assert store.keys() == ["k1"]


def _vectors(tasks):
    gen = torch.Generator().manual_seed(0)
    out = {}
    for i, task in enumerate(tasks):
        out[task] = {
            "a.weight": LowRank(
                torch.randn(12, 4, generator=gen), torch.randn(4, 10, generator=gen), 2.0
            ),
            "b.weight": Dense(torch.randn(8, 6, generator=gen)),
            "c.bias": Dense(torch.randn(8, generator=gen)),
        }
        if i == 1:
            del out[task]["b.weight"]  # a task without the parameter: a zero delta
    return out


@pytest.mark.parametrize(
    ("method", "params"),
    [("star", {"eta": 40}), ("simple_average", {}), ("task_arithmetic", {"scaling": 0.7})],
)
def test_cached_separable_merges_equal_the_method(flan, method, params):
    bench = Workbench(flan, RunOptions(), Runtime(device="cpu"))
    bench._vectors = _vectors(["mnli", "qnli", "qqp"])  # no checkpoints: vectors in memory
    for tasks in (["mnli", "qnli", "qqp"], ["mnli", "qqp"]):
        job = merge_job(method, params, tasks)
        cached, stats = bench.deltas(job)
        direct = merge_deltas(method, [bench._vectors[t] for t in job.tasks], params)
        for key in direct.deltas:
            torch.testing.assert_close(
                cached[key].to_dense(), direct.deltas[key].to_dense(), rtol=1e-5, atol=1e-5
            )
        assert stats["per_parameter"] == direct.stats["per_parameter"]
    assert bench.transforms == 3  # each task transformed once, reused by the second task set


def _record(scores: dict[str, float]) -> dict:
    return {
        "results": {
            t: {
                "metric": "accuracy",
                "score": s,
                "n": 2,
                "version": 1,
                "predictions": [
                    {"index": 0, "gold": "1", "pred": "1", "correct": 1.0},
                    {"index": 1, "gold": "0", "pred": "1", "correct": float(s == 1.0)},
                ],
            }
            for t, s in scores.items()
        }
    }


def test_collated_results_have_bounds_normalized_scores_and_seed_numbers(flan):
    tasks = ["mnli", "qqp"]
    pairs = [(Job("base", (t,)), _record({t: 0.5})) for t in tasks]
    pairs += [(Job("individual", (t,)), _record({t: 1.0})) for t in tasks]
    pairs += [(merge_job("star", {}, tasks), _record({"mnli": 0.5, "qqp": 1.0}))]
    pairs += [(merge_job("star", {"eta": 20}, tasks), _record({"mnli": 1.0, "qqp": 1.0}))]
    data = build_results(flan, tasks, pairs, RunOptions()).to_json()
    rows = {r["name"]: r for r in data["rows"]}
    assert list(rows) == ["base", "individual", "star (eta=40.0)", "star (eta=20.0)"]
    assert rows["base"]["normalized"] == 50.0 and rows["star (eta=40.0)"]["normalized"] == 75.0
    table = seed_markdown(data, flan.seed_tables[1])
    assert "| star (eta=40.0) | 75.00 (94.55) | 50.00 (80.08) | 100.00 (85.30) |" in table
    assert "| individual | 100.00 (100.00) |" in table


def test_reproduce_jobs_default_to_the_seed_tables(flan):
    sets = task_sets(flan, None)
    assert [len(s) for s in sets] == [10, 13]
    jobs = reproduce_jobs(flan, sets)
    assert sum(j.kind == "merge" for j in jobs) == 10 and len(jobs) == 36
    assert task_sets(flan, ["qqp", "mnli", "qqp"]) == [["mnli", "qqp"]]
    with pytest.raises(ConfigError, match="not run"):
        reproduce_jobs(flan, sets, ["star"], {"ties": {"density": 0.1}})


def test_dry_run_lists_jobs_models_datasets_memory_and_downloads(tmp_path, monkeypatch):
    lines: list[str] = []
    out = reproduce("mistral-7b-instruct", tmp_path / "out", dry_run=True, echo=lines.append)
    text = "\n".join(lines)
    assert len(out.jobs) == 24 + 5 and not (tmp_path / "out").exists()
    assert "Lots-of-LoRAs/Mistral-7B-Instruct-v0.2-4b-r16-task1605" in text
    assert "Lots-of-LoRAs/task846_pubmedqa_classification [test], n=100" in text
    assert "predicted memory (estimate), device: 29." in text  # 7.24 B float32 weights + cache
    assert "predicted download (estimate): 14.98 GB" in text
    assert "nothing was downloaded" in text


def test_cli_dry_runs(tmp_path):
    runner = CliRunner()
    res = runner.invoke(
        reproduce_cmd,
        [
            "llama-3.2-3b-instruct",
            "--tasks",
            "sst2,cola",
            "--methods",
            "star",
            "--param",
            "star.eta=20",
            "--dtype",
            "bfloat16",
            "--out",
            str(tmp_path / "r"),
            "--dry-run",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "star(eta=20.0) on 2 tasks" in res.output and "(causal, bfloat16)" in res.output
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(
        json.dumps(
            {
                "suite": "flan-t5-large",
                "methods": {"ties": {}},
                "tasks": {"sizes": [3], "combinations": 2},
            }
        )
    )
    res = runner.invoke(sweep_cmd, [str(sweep_file), "--out", str(tmp_path / "s"), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert (
        "ties(densities=None, density=0.2, normalize=True, rescale=False, scaling=1.0, trim=global"
        in res.output
    )
    res = runner.invoke(reproduce_cmd, ["flan-t5-large", "--param", "star", "--dry-run"])
    assert isinstance(res.exception, ConfigError)


def test_text_scorers_get_confidence_intervals():
    suite = load_suite("mistral-7b-instruct")

    def rec(task, metric, key, values):
        preds = [{"index": i, "gold": "g", "pred": "o", key: v} for i, v in enumerate(values)]
        score = sum(values) / len(values)
        return {
            "results": {
                task: {"metric": metric, "score": score, "n": len(values), "predictions": preds}
            }
        }

    pairs = []
    for kind, vals in (("individual", [1.0, 1.0, 0.5, 1.0]), ("base", [0.0, 1.0, 0.5, 0.0])):
        pairs += [
            (Job(kind, ("ncbi",)), rec("ncbi", "contains_gold", "correct", vals[:2] * 2)),
            (Job(kind, ("qasc",)), rec("qasc", "token_f1", "f1", vals)),
        ]
    data = build_results(suite, ["ncbi", "qasc"], pairs, RunOptions()).to_json()
    base = data["rows"][0]
    assert data["tasks"]["qasc"]["metric"] == "token_f1" and base["ci"] is not None
    assert base["normalized"] == pytest.approx(100 * (0.5 + 0.375 / 0.875) / 2)


def test_only_data_driven_merges_carry_data_and_their_keys_depend_on_it(flan):
    tasks = ["mnli", "qqp"]
    star = merge_job("star", {}, tasks)
    assert star.data is None and "data" not in star.to_dict()  # data-free keys are unchanged
    assert merge_job("star", {}, tasks, DataOptions(n_examples=5)) == star
    assert merge_job("mats", {"objective": "average"}, tasks).data is None
    assert merge_job("localize_stitch", {}, tasks).data is None  # dataless
    trained = merge_job("localize_stitch", {"mode": "trained"}, tasks)
    assert trained.data == {"n_examples": 32, "seed": 0, "batch_size": 8, "max_length": 512}
    regmean = merge_job("regmean", {}, tasks)
    assert "statistics" not in regmean.params and Job.from_dict(regmean.to_dict()) == regmean
    assert regmean.label == "regmean(shrinkage=0.9) on 2 tasks, 32 examples per task"
    keys = {
        job_key(flan, merge_job("regmean", {}, tasks, DataOptions(**kw)), RunOptions())
        for kw in ({}, {"n_examples": 64}, {"seed": 1}, {"max_length": 128})
    }
    assert len(keys) == 4
    with pytest.raises(ConfigError, match="statistics are collected from the suite's training"):
        merge_job("regmean", {"statistics": ["a", "b"]}, tasks)


def test_data_options_and_sweep_data_errors_are_listed_at_once():
    with pytest.raises(ConfigError) as err:
        DataOptions.from_mapping({"n_exampels": 3, "seed": -1, "batch_size": 0})
    assert err.value.problems == [
        "unknown key data.n_exampels. Did you mean: n_examples? Allowed: n_examples, seed, "
        "batch_size, max_length",
        "data.seed must be an integer >= 0, got -1",
        "data.batch_size must be an integer >= 1, got 0",
    ]
    with pytest.raises(ConfigError) as err:
        sweep_from_dict(
            {
                "suite": "flan-t5-large",
                "methods": {"regmean": {}, "stars": {}},
                "tasks": {"sets": [["mnli", "qqp"]]},
                "data": {"n_examples": 0},
            }
        )
    assert "data.n_examples must be an integer >= 1, got 0" in str(err.value)
    assert "stars" in str(err.value)
    sweep = sweep_from_dict(
        {
            "suite": "flan-t5-large",
            "methods": {"regmean": {}, "star": {}},
            "tasks": {"sets": [["mnli", "qqp"]]},
            "data": {"n_examples": 16},
        }
    )
    data = {job.method: job.data for job in sweep.jobs if job.kind == "merge"}
    assert data["regmean"]["n_examples"] == 16 and data["star"] is None


def test_suites_declare_training_splits_apart_from_the_evaluated_rows():
    for name in ("flan-t5-large", "llama-3.2-3b-instruct", "mistral-7b-instruct"):
        suite = load_suite(name)
        for task in suite.tasks.values():
            spec = train_spec(task.spec(), task.train)
            evaluated = task.spec().source
            same = (spec.source.path, spec.source.config, spec.source.split) == (
                evaluated.path,
                evaluated.config,
                evaluated.split,
            )
            assert not same or spec.metadata["transform"] == "seed_train_split", task.name
    flan = load_suite("flan-t5-large")
    mnli = train_spec(flan.task("mnli").spec(), flan.task("mnli").train).source
    assert (mnli.config, mnli.split) == ("mnli", "train")  # mnli_matched has no train split


def test_dry_run_lists_the_training_data_of_data_driven_merges(tmp_path):
    lines: list[str] = []
    reproduce(
        "flan-t5-large",
        tmp_path / "out",
        tasks=["mnli", "finance"],
        methods=["regmean", "star"],
        dry_run=True,
        echo=lines.append,
    )
    text = "\n".join(lines)
    assert "regmean(shrinkage=0.9) on 2 tasks, 32 examples per task" in text
    assert "training data of the data-driven merges (2 tasks, 32 examples per task" in text
    assert "  mnli: nyu-mll/glue (mnli) [train]" in text
    assert (
        "  finance: takala/financial_phrasebank (sentences_allagree) [train], transform "
        "seed_train_split" in text
    )
