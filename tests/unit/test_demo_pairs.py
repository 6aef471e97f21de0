"""Demo rows of the methods that merge one or two models (issue 13): plan and aggregation.

The end-to-end checks run :class:`DemoBench` on a fake tier: a one-weight "model" whose
predictions are a hand-made function of that weight, so every score below is worked by hand.
"""

from __future__ import annotations

import copy
import itertools
import types
from pathlib import Path

import pytest
import torch

from starmerge.demo import bench as bench_module
from starmerge.demo.assets import TaskData
from starmerge.demo.bench import DemoBench
from starmerge.demo.pairs import (
    COMPARATOR,
    PlannedRow,
    aggregate,
    groups_name,
    task_groups,
    with_comparators,
)
from starmerge.demo.train import Recipe, TaskAdapter
from starmerge.eval.metrics import bootstrap_ci
from starmerge.methods.base import Merged
from starmerge.report.html import write_html
from starmerge.report.plots import GROUPS_COLOR, MERGED_COLOR, _merged_bars
from starmerge.tensors.delta import Dense

TASKS = ["a", "b", "c"]
VALUES = {"a": 1.0, "b": 2.0, "c": 4.0}  # each task's delta of the one weight (base: 0)
TOLS = (0.6, 1.6, 2.0, 0.2)  # item i is right when |w - VALUES[task]| < TOLS[i]


@pytest.mark.parametrize(
    ("n_models", "n", "want"),
    [
        ((1, 2), 3, ["ab", "bc", "ca"]),
        ((2, 2), 4, ["ab", "bc", "cd", "da"]),
        ((1, 1), 2, ["a", "b"]),
        ((1, 3), 4, ["abc", "bcd", "cda", "dab"]),
        ((1, None), 5, None),  # fits: its normal row
        ((1, 2), 2, None),
        ((2, None), 1, []),  # needs more models than tasks: skipped
    ],
)
def test_task_groups_are_cyclic_windows_of_the_largest_count(n_models, n, want):
    tasks = list("abcde"[:n])
    got = task_groups(n_models, tasks)
    assert got == (None if want is None else tuple(tuple(w) for w in want))
    if got:  # every task lies in exactly `most` groups
        assert all(sum(t in g for g in got) == n_models[1] for t in tasks)
        assert groups_name(got) == {1: "each alone", 2: "pairs"}.get(n_models[1], "groups of 3")


def test_blocks_by_group_size_each_opened_by_its_comparator():
    three = task_groups((1, 3), list("abcd"))
    two, one = task_groups((1, 2), list("abcd")), task_groups((1, 1), list("abcd"))
    rows = [
        PlannedRow("x (pairs)", "x", {}, two),
        PlannedRow("y (each alone)", "y", {}, one),
        PlannedRow("z (groups of 3)", "z", {}, three),
        PlannedRow("w (pairs)", "w", {}, two),
    ]
    out = with_comparators(rows)
    assert [(r.label, r.method, r.groups) for r in out] == [
        (f"{COMPARATOR} (groups of 3)", COMPARATOR, three),
        ("z (groups of 3)", "z", three),
        (f"{COMPARATOR} (pairs)", COMPARATOR, two),
        ("x (pairs)", "x", two),
        ("w (pairs)", "w", two),
        ("y (each alone)", "y", one),
    ]
    assert with_comparators([]) == []


def test_the_report_marks_the_rows_over_task_groups(tmp_path):
    scores = {"a": 1.0, "b": 1.0}
    rows = [
        {"name": "individual", "scores": scores},
        {"name": "ties", "scores": scores, "normalized": 90.0},
        {"name": "slerp (pairs)", "scores": scores, "merges": [["a", "b"], ["b", "a"]]},
        {"name": "nearswap (each alone)", "scores": scores, "merges": [["a"], ["b"]]},
    ]
    tasks = {t: {"metric": "accuracy", "n": 1} for t in scores}
    results = {"suite": "s", "model": "m", "tasks": tasks, "rows": rows}
    page = write_html([results], tmp_path / "r.html").read_text()
    assert "slerp (pairs) merge a+b, b+a; nearswap (each alone) merge a, b." in page
    plain = write_html([{**results, "rows": rows[:2]}], tmp_path / "p.html").read_text()
    assert "Rows over task groups" not in plain
    for row in rows[2:]:
        row["normalized"] = 50.0
    assert [b[3] for b in _merged_bars([results])] == [MERGED_COLOR, GROUPS_COLOR, GROUPS_COLOR]


def _scored(score, correct, preds):
    entries = [{"index": i, "pred": p, "gold": "yes"} for i, p in enumerate(preds)]
    return {"score": score, "correct": correct, "predictions": entries}


def test_aggregate_means_each_task_over_its_pairs_by_hand():
    groups = (("a", "b"), ("b", "c"), ("c", "a"))
    scored = [
        {"a": _scored(0.75, [1, 1, 1, 0], "yyyn"), "b": _scored(0.5, [0, 1, 0, 1], "nyny")},
        {"b": _scored(1.0, [1, 1, 1, 1], "yyyy"), "c": _scored(0.0, [0, 0, 0, 0], "nnnn")},
        {"c": _scored(0.25, [0, 0, 1, 0], "nnyn"), "a": _scored(0.25, [0, 0, 0, 1], "nnny")},
    ]
    before = copy.deepcopy(scored)
    out = aggregate(TASKS, groups, scored)
    assert scored == before  # inputs untouched
    assert {t: out[t]["score"] for t in TASKS} == {"a": 0.5, "b": 0.75, "c": 0.125}
    assert out["a"]["correct"] == [0.5, 0.5, 0.5, 0.5]
    assert out["b"]["correct"] == [0.5, 1.0, 0.5, 1.0]
    assert out["c"]["correct"] == [0.0, 0.0, 0.5, 0.0]
    first = out["a"]["predictions"][3]
    assert first == {"index": 3, "gold": "yes", "preds": {"a+b": "n", "c+a": "y"}}


def test_aggregate_keeps_a_single_group_entry_and_refuses_mismatches():
    one = _scored(0.5, [1, 0], "yn")
    assert aggregate(["a"], (("a",),), [{"a": one}]) == {"a": one}
    with pytest.raises(ValueError, match="exactly its own tasks"):
        aggregate(["a", "b"], (("a", "b"),), [{"a": one}])
    with pytest.raises(ValueError, match="lies in no group"):
        aggregate(["a", "b"], (("a",),), [{"a": one}])


class FakeTier:
    """One weight ``w`` (base 0); item i of a task is right when w is within TOLS[i] of it."""

    suite, model_label = "demo-fake", "one weight"

    def __init__(self):
        self.module = torch.nn.Module()
        self.module.w = torch.nn.Parameter(torch.zeros(1, 1))
        self.calls = 0

    def statistics(self, *args):
        return types.SimpleNamespace(
            unavailable=lambda name, params: None,
            complete=lambda method, tasks, params: dict(params),
            used=lambda method, params: {"data": "none"},
            seconds={},
            peak_bytes={},
        )

    def order(self, test):
        return test

    def metric(self, test):
        return "accuracy"

    def predict(self, task, test):
        self.calls += 1
        w = float(self.module.w.detach())
        return [1 if abs(w - VALUES[task]) < tol else 0 for tol in TOLS]

    @staticmethod
    def correct(test, index, pred):
        return int(pred == test.labels[index]), test.label_names[pred]


def _bench(monkeypatch, cache: Path, tasks=TASKS) -> tuple[DemoBench, FakeTier]:
    tier = FakeTier()
    fake = types.SimpleNamespace(make_tier=lambda recipe, adapters, cache: tier)
    monkeypatch.setattr(bench_module, "tier_module", lambda model: fake)
    recipe = Recipe(
        rank=1,
        alpha=1,
        targets=("w",),
        lr=0.1,
        steps=1,
        batch_size=1,
        max_length=8,
        n_train=4,
        model="fake",
    )
    adapters = {
        t: TaskAdapter(t, {"w": Dense(torch.full((1, 1), VALUES[t]))}, None, None, Path(t), {})
        for t in tasks
    }
    tests = {
        t: TaskData(t, ("x0", "x1", "x2", "x3"), (1, 1, 1, 1), ("no", "yes"), "hand") for t in tasks
    }
    return DemoBench(recipe, adapters, tests, cache, 0, False, tests, 4), tier


@pytest.fixture
def counted_time(monkeypatch):
    """bench's clock advances by exactly 1 s per reading: each merge takes 1 s."""
    ticks = itertools.count()
    monkeypatch.setattr(
        bench_module, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks))
    )


METHODS_RUN = ["simple_average", "slerp", "nuslerp", "nearswap", "arcee_fusion", "pair_mean"]


@pytest.fixture
def pair_mean(register_test_method):
    """A method of exactly two models under a name no code knows: chosen by its n_models."""

    @register_test_method("pair_mean", accepts=("dense",), n_models=(2, 2))
    def pair_mean(deltas):
        return Merged(Dense((deltas[0].tensor + deltas[1].tensor) / 2))


@pytest.fixture
def evaluated(monkeypatch, tmp_path, counted_time, pair_mean):
    """The fake bench evaluated with every method of one or two models (and pair_mean)."""
    bench, tier = _bench(monkeypatch, tmp_path)
    saved = {t: a.deltas["w"].tensor.clone() for t, a in bench.adapters.items()}
    data = bench.evaluate(METHODS_RUN, False, {t: 4 for t in TASKS}).to_json()
    return bench, tier, data, saved


COMPARED = f"{COMPARATOR} (pairs)"
PAIRS = [["a", "b"], ["b", "c"], ["c", "a"]]
GROUPED = [  # the rows over task groups, in their order
    COMPARED,
    *(f"{m} (pairs)" for m in ("slerp", "nuslerp", "pair_mean")),
    *(f"{m} (each alone)" for m in ("nearswap", "arcee_fusion")),
]


def test_rows_and_scores_by_hand(evaluated):
    bench, _, data, _ = evaluated
    rows = {r["name"]: r for r in data["rows"]}
    assert [r["name"] for r in data["rows"]] == ["base", "individual", "simple_average", *GROUPED]
    assert bench.skipped == [] and bench.failed == {}
    assert rows["slerp (pairs)"]["parameters"] == {"t": 0.5}
    # Pairs: w = 1.5 (a+b), 3 (b+c), 2.5 (c+a). Task a: |1.5-1| = .5 -> [1,1,1,0] (.75) and
    # |2.5-1| = 1.5 -> [0,1,1,0] (.5): mean .625; b: .75 (a+b) and .5 (b+c); c: .5 and .5.
    want = {"a": 0.625, "b": 0.625, "c": 0.5}
    individual = {"a": 1.0, "b": 1.0, "c": 1.0}
    assert rows["individual"]["scores"] == individual
    for name in (COMPARED, "pair_mean (pairs)", "slerp (pairs)", "nuslerp (pairs)"):
        # SLERP and NuSLERP of colinear 1x1 vectors take their linear branch: the average.
        assert rows[name]["scores"] == pytest.approx(want, abs=1e-12), name
        assert rows[name]["normalized"] == pytest.approx(100 * 1.75 / 3, abs=1e-9)
    samples = {"a": [0.5, 1, 1, 0], "b": [0.5, 1, 1, 0], "c": [0, 1, 1, 0]}
    assert rows[COMPARED]["ci"] == list(bootstrap_ci(samples, individual, seed=0))
    # Alone: nearswap (t = 1e-4) leaves w = 1e-4: a: |w - 1| < 1.6, 2.0 -> [0,1,1,0];
    # b: |w - 2| = 1.9999 < 2.0 only -> [0,0,1,0]; c: |w - 4| > 2 -> none.
    # arcee_fusion keeps a 1x1 delta whole (its importance, KL of a 1-way softmax, is 0).
    assert rows["nearswap (each alone)"]["scores"] == {"a": 0.5, "b": 0.25, "c": 0.0}
    assert rows["arcee_fusion (each alone)"]["scores"] == individual


def test_costs_are_summed_over_a_rows_merges(evaluated):
    bench, _, _, _ = evaluated
    # One second per merge here: the rows over groups merge 3 times.
    assert bench.merge_s == {"simple_average": 1, **{name: 3 for name in GROUPED}}
    assert set(bench.merge_peak_bytes) == set(bench.merge_s)


def test_merges_and_predictions_are_recorded(evaluated):
    bench, _, data, _ = evaluated
    assert bench.merges[COMPARED] == bench.merges["slerp (pairs)"] == PAIRS
    assert bench.merges["nearswap (each alone)"] == [["a"], ["b"], ["c"]]
    assert "simple_average" not in bench.merges
    preds = data["predictions"]["slerp (pairs)"]["a"]  # a+b: |1.5 - 1| < .6; c+a: 1.5 is not
    assert len(preds) == 4
    assert preds[0] == {"index": 0, "gold": "yes", "preds": {"a+b": "yes", "c+a": "no"}}
    alone = data["predictions"]["nearswap (each alone)"]["a"][0]
    assert alone == {"index": 0, "pred": "no", "gold": "yes"}


def test_inputs_untouched_and_a_rerun_reads_the_cache(evaluated, monkeypatch, tmp_path):
    bench, tier, data, saved = evaluated
    assert all(torch.equal(a.deltas["w"].tensor, saved[t]) for t, a in bench.adapters.items())
    assert float(tier.module.w.detach()) == 0.0
    again, tier2 = _bench(monkeypatch, tmp_path)
    rerun = again.evaluate(METHODS_RUN, False, {t: 4 for t in TASKS}).to_json()
    assert tier.calls > 0 and tier2.calls == 0
    assert [r["scores"] for r in rerun["rows"]] == [r["scores"] for r in data["rows"]]


def test_a_method_that_fits_the_tasks_keeps_its_normal_row(monkeypatch, tmp_path, pair_mean):
    bench, _ = _bench(monkeypatch, tmp_path, tasks=["a", "b"])
    plan = bench.plan(["slerp", "nuslerp", "pair_mean", "nearswap", "model_stock"])
    assert [(r.label, r.groups) for r in plan] == [
        ("slerp", None),
        ("nuslerp", None),
        ("pair_mean", None),
        ("model_stock", None),
        ("nearswap (each alone)", (("a",), ("b",))),
    ]
    one, _ = _bench(monkeypatch, tmp_path, tasks=["a"])
    assert [r.label for r in one.plan(["model_stock", "slerp"])] == ["slerp"]
    assert one.skipped == ["model_stock"]  # two models at least, one task
