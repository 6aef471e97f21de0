import json

import pytest

from starmerge.errors import InputError
from starmerge.eval.metrics import normalized_score
from starmerge.eval.results import Results, load_results, validate_results
from starmerge.eval.runner import TaskResult

TASKS = {"news": {"metric": "accuracy", "n": 4}, "sent": {"metric": "accuracy", "n": 4}}


def make_results(config=None, seed=0):
    res = Results("demo", "tiny-model", seed=seed, config=config or {"lr": 1e-3}, n_boot=200)
    for name, metric in (("news", "accuracy"), ("sent", "accuracy")):
        res.add_task(name, metric, 4)
    res.add_row("base", {"news": 0.5, "sent": 0.25},
                correct={"news": [1, 0, 1, 0], "sent": [0, 0, 1, 0]})  # fmt: skip
    res.add_row("individual", {"news": 1.0, "sent": 0.75},
                correct={"news": [1, 1, 1, 1], "sent": [1, 1, 1, 0]})  # fmt: skip
    res.add_row("star", {"news": 0.75, "sent": 0.75}, method="star", parameters={"eta": 40},
                predictions={"news": [{"index": 0, "pred": "1", "gold": "1", "correct": 1.0}]},
                correct={"news": [1, 1, 0, 1], "sent": [1, 0, 1, 1]})  # fmt: skip
    return res


def test_summary_matches_the_contract():
    data = make_results().to_json()
    assert set(data) == {"suite", "model", "seed", "versions", "config", "tasks", "rows",
                         "predictions", "created", "git"}  # fmt: skip
    assert set(data["versions"]) == {"python", "torch", "transformers", "peft", "starmerge"}
    assert data["tasks"] == TASKS
    base, individual, star = data["rows"]
    assert individual == {"name": "individual", "scores": {"news": 1.0, "sent": 0.75}}
    assert star["method"] == "star" and star["parameters"] == {"eta": 40}
    assert star["normalized"] == pytest.approx(
        normalized_score(star["scores"], individual["scores"])
    )
    assert star["normalized"] == pytest.approx(87.5)
    assert base["normalized"] == pytest.approx(100 * (0.5 + 1 / 3) / 2)
    for row in (base, star):
        lo, hi = row["ci"]
        assert lo <= row["normalized"] <= hi
    assert "method" not in base
    assert data["predictions"] == {"star": {"news": [{"index": 0, "pred": "1", "gold": "1",
                                                      "correct": 1.0}]}}  # fmt: skip
    assert validate_results(data) == []


def test_rows_without_reference_or_samples():
    res = Results("s", "m", tasks={"a": {"metric": "accuracy", "n": 2}})
    res.add_row("base", {"a": 0.5})
    assert res.to_json()["rows"][0] == {"name": "base", "scores": {"a": 0.5}}  # no individual yet
    res.add_row("individual", {"a": 0.0})
    row = res.to_json()["rows"][0]
    assert row["normalized"] is None and "is 0" in row["note"]
    res2 = Results("s", "m", tasks={"a": {"metric": "accuracy", "n": 2}})
    res2.add_row("individual", {"a": 1.0})
    res2.add_row("x", {"a": 0.5})  # no per-example data: normalized but no CI
    assert res2.to_json()["rows"][1] == {"name": "x", "scores": {"a": 0.5}, "normalized": 50.0,
                                         "ci": None}  # fmt: skip


def test_add_row_errors():
    res = make_results()
    with pytest.raises(ValueError, match="row 'star' is already in the results"):
        res.add_row("star", {"news": 0.1})
    with pytest.raises(ValueError, match=r"task\(s\) qa not declared; call add_task"):
        res.add_row("ties", {"qa": 0.1})


def test_add_eval_from_task_results():
    res = Results("s", "m", n_boot=100)
    preds = [{"pred": "1", "gold": "1", "correct": 1.0}, {"pred": "0", "gold": "1", "correct": 0.0}]
    res.add_eval("individual", {"a": TaskResult("accuracy", 1.0, 2, preds[:1] * 2)})
    res.add_eval("star", {"a": TaskResult("accuracy", 0.5, 2, preds)}, method="star",
                 parameters={"eta": 40})  # fmt: skip
    data = res.to_json()
    assert data["tasks"] == {"a": {"metric": "accuracy", "n": 2}}
    assert data["rows"][1]["normalized"] == 50.0 and data["rows"][1]["ci"][0] <= 50.0
    assert data["predictions"]["star"]["a"] == preds


def test_write_round_trip_and_file_names(tmp_path):
    first = make_results({"lr": 1e-3})
    path = first.write(tmp_path)
    assert path.name.startswith("demo-") and path.suffix == ".json"
    assert load_results(path) == json.loads(json.dumps(first.to_json()))
    # same run definition -> same file; a different config -> a different file
    assert make_results({"lr": 1e-3}).write(tmp_path) == path
    other = make_results({"lr": 2e-3}).write(tmp_path)
    assert other != path and path.exists() and other.exists()
    assert make_results(seed=1).write(tmp_path) not in (path, other)
    named = first.write(tmp_path / "sub", name="my run/1")
    assert named.parent.name == "sub" and named.name.startswith("my-run-1-")
    assert sorted(p.name for p in tmp_path.glob("*.tmp*")) == []


def test_load_results_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="is not valid JSON"):
        load_results(bad)
    with pytest.raises(InputError, match="does not exist"):
        load_results(tmp_path / "missing.json")
    data = make_results().to_json()
    data["seed"] = "zero"
    data["rows"][2]["ci"] = [1.0]
    data["rows"][1]["scores"]["qa"] = 0.5
    del data["tasks"]["sent"]["n"]
    bad.write_text(json.dumps(data))
    with pytest.raises(InputError) as err:
        load_results(bad)
    message = str(err.value)
    assert "is not a starmerge results file" in message
    for part in ("'seed' must be int", "'ci' must be [lo, hi]", "undeclared task(s) qa",
                 "tasks['sent'] must be"):  # fmt: skip
        assert part in message
    assert validate_results([]) == ["the top level must be an object, got list"]
