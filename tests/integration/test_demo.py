"""The embedded benchmark end to end (FAST preset: 3 real tasks, 30 training steps each)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from starmerge.errors import InputError
from starmerge.eval import demo
from starmerge.eval.demo_data import entry_meta
from starmerge.eval.demo_train import applied, load_adapter, load_backbone, pooled
from starmerge.eval.results import validate_results
from starmerge.methods import METHODS


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The FAST demo twice on one fresh cache: the second run must reuse it."""
    root = tmp_path_factory.mktemp("demo")
    kwargs = dict(demo.FAST, full=False, cache_dir=root / "cache", progress=False)
    first = demo.run_demo(**kwargs, out_dir=root / "out")
    second = demo.run_demo(**kwargs, out_dir=root / "again")
    return root, first, second


def _rows(data):
    return {row["name"]: row for row in data["rows"]}


def test_files_appear_and_the_json_is_valid(runs):
    root, first, _ = runs
    files = {k: Path(v) for k, v in first["files"].items()}
    assert set(files) == {"results", "table", "normalized", "report"}
    assert all(p.parent == root / "out" and p.is_file() for p in files.values())
    stored = json.loads(files["results"].read_text())
    assert validate_results(stored) == []
    assert stored["suite"] == "demo-minilm" and list(stored["tasks"]) == demo.FAST["tasks"]
    table = files["table"].read_text()
    assert table.splitlines()[0].split()[:4] == ["Model", *demo.FAST["tasks"]]
    assert files["normalized"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = files["report"].read_text()
    assert "data:image/png;base64," in html and "simple_average" in html


def test_every_method_is_a_row(runs):
    _, first, _ = runs
    assert first["failed"] == {}
    assert first["skipped"] == []  # at their defaults the demo provides every method's data
    names = [row["name"] for row in first["rows"]]
    assert names == ["base", "individual", *METHODS.names(), "task_arithmetic scaling=0.3"]
    assert _rows(first)["star"]["parameters"] == {"eta": 40.0}


def test_data_methods_use_training_statistics(runs):
    root, first, second = runs
    rows, n = _rows(first), demo.FAST["n_stats"]
    kinds = {"mats": ["gram_in"], "regmean": ["gram_in"], "fisher_merging": ["fisher"]}
    for method, want in kinds.items():
        assert all(0 <= s <= 1 for s in rows[method]["scores"].values()), method
        assert rows[method]["normalized"] > 0
        used = first["data_used"][method]
        assert used["kinds"] == want and used["n"] == n and used["split"] == "train"
        assert len(used["entries"]) == len(first["tasks"])
        for entry in used["entries"]:
            meta = entry_meta(root / "cache" / "demo" / "minilm" / "stats" / entry)
            assert meta["split"] == "train" and meta["n"] == n == len(meta["items"])
            assert meta["kinds"] == want and entry.startswith(meta["adapter"])
        assert "statistics" not in rows[method]["parameters"]
    assert first["data_used"]["localize_stitch"] == {"data": "none"}  # dataless by default
    assert set(first["timing"]["stats_s"]) == {"gram_in", "fisher"}
    assert second["timing"]["stats_s"] == {}  # the cached statistics are reused
    assert set(first["timing"]["merge_s"]) == {r["name"] for r in first["rows"][2:]}


def test_each_adapter_beats_the_base_on_its_task(runs):
    _, first, _ = runs
    rows = _rows(first)
    for task in first["tasks"]:
        assert rows["individual"]["scores"][task] > rows["base"]["scores"][task] + 0.05, task


def test_normalized_scores_follow_from_the_stored_scores(runs):
    _, first, _ = runs
    stored = json.loads(Path(first["files"]["results"]).read_text())
    individual = _rows(stored)["individual"]["scores"]
    for row in stored["rows"][2:] + stored["rows"][:1]:
        ratios = [row["scores"][t] / individual[t] for t in stored["tasks"]]
        assert row["normalized"] == pytest.approx(100 * sum(ratios) / len(ratios), abs=1e-9)
        assert row["ci"][0] <= row["ci"][1]
        n = {t: len(stored["predictions"][row["name"]][t]) for t in stored["tasks"]}
        assert n == {t: spec["n"] for t, spec in stored["tasks"].items()}


def test_second_run_uses_the_cache(runs):
    _, first, second = runs
    assert first["timing"]["trained"] == demo.FAST["tasks"]
    assert second["timing"]["trained"] == []
    assert second["tasks"] == first["tasks"]  # same adapters (cache keys) and test sets
    assert [r["scores"] for r in second["rows"]] == [r["scores"] for r in first["rows"]]


def test_a_merge_changes_the_predictions(runs):
    _, first, _ = runs
    preds = first["predictions"]
    for task in first["tasks"]:
        base = [p["pred"] for p in preds["base"][task]]
        merged = [p["pred"] for p in preds["simple_average"][task]]
        assert base != merged, task


@pytest.fixture(scope="module")
def news_adapter(runs):
    root, first, _ = runs
    return load_adapter(root / "cache" / "demo" / "minilm" / first["tasks"]["news"]["adapter"])


def test_in_memory_delta_matches_the_peft_adapter(news_adapter):
    from peft import PeftModel

    tokenizer, encoder = load_backbone()
    _, peft_base = load_backbone()
    peft_model = PeftModel.from_pretrained(peft_base, str(news_adapter.path / "adapter")).eval()
    batch = tokenizer(["Shares fell sharply.", "The striker scored twice."], padding=True,
                      return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        before = pooled(encoder, batch["input_ids"], batch["attention_mask"])
        with applied(encoder, news_adapter.deltas):
            merged = pooled(encoder, batch["input_ids"], batch["attention_mask"])
        want = pooled(peft_model, batch["input_ids"], batch["attention_mask"])
        after = pooled(encoder, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(merged, want, rtol=1e-4, atol=1e-5)
    assert (merged - before).abs().max() > 1e-3  # the delta does change the encoder
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # and is undone on exit
    assert len(news_adapter.deltas) == 6 * 6  # 6 layers x (q, k, v, 3 dense)


def test_a_wrong_key_is_refused(news_adapter):
    _, encoder = load_backbone()
    key = next(iter(news_adapter.deltas))
    wrong = {key.replace(".weight", ".base_layer.weight"): news_adapter.deltas[key]}
    with pytest.raises(InputError, match="not a parameter of the encoder"):
        with applied(encoder, wrong):
            pass


def test_full_mode_writes_the_sweep_and_curve(runs, monkeypatch, capsys):
    root, _, _ = runs
    monkeypatch.setattr(demo, "ETAS", (20, 80))
    monkeypatch.setattr(demo, "CURVE_METHODS", ("simple_average",))
    monkeypatch.setattr(demo, "CURVE_SUBSETS", 1)
    kwargs = dict(demo.FAST, cache_dir=root / "cache", out_dir=root / "full", progress=True)
    data = demo.run_demo(**kwargs, full=True)
    assert [p["eta"] for p in data["eta_sweep"]] == [20.0, 80.0]
    assert [p["n_tasks"] for p in data["curve"]] == [2, 3]
    assert (root / "full" / "eta_sweep.png").is_file() and (root / "full" / "curve.png").is_file()
    out = capsys.readouterr().out
    assert "individual" in out and "Normalized" in out and "report.html" in out
