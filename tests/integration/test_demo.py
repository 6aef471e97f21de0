"""The embedded benchmark end to end (FAST preset: 3 real tasks, 30 training steps each)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from starmerge.demo import run as demo
from starmerge.demo.encoder import load_backbone, pooled
from starmerge.demo.statistics import entry_meta
from starmerge.demo.train import applied, load_task_adapter
from starmerge.errors import InputError
from starmerge.eval.results import validate_results
from starmerge.methods import METHODS

TRAINED = "localize_stitch mode=trained"


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
    assert set(files) == {"results", "table", "costs", "normalized", "report"}
    assert all(p.parent == root / "out" and p.is_file() for p in files.values())
    stored = json.loads(files["results"].read_text())
    assert validate_results(stored) == []
    assert stored["suite"] == "demo-minilm" and list(stored["tasks"]) == demo.FAST["tasks"]
    table = files["table"].read_text()
    assert table.splitlines()[0].split()[:4] == ["Model", *demo.FAST["tasks"]]
    assert files["normalized"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = files["report"].read_text()
    assert "data:image/png;base64," in html and "simple_average" in html
    assert "<h3>Costs per merge</h3>" in html  # the costs table, beside the scores


def test_every_method_is_a_row(runs):
    _, first, _ = runs
    assert first["failed"] == {} and first["skipped"] == []
    # At their defaults the demo provides every method's data; the methods that merge fewer
    # models than these 3 tasks (SLERP-like: 2, nearswap, arcee_fusion: 1) get rows over
    # cyclic pairs or each task alone, after simple averaging on the same pairs.
    n = len(first["tasks"])
    fewer = [m for m in METHODS.names() if METHODS.get(m).models_problem(n)]
    assert {"slerp", "nuslerp", "nearswap", "arcee_fusion"} <= set(fewer)
    pairs = [f"{m} (pairs)" for m in fewer if METHODS.get(m).n_models[1] == 2]
    alone = [f"{m} (each alone)" for m in fewer if METHODS.get(m).n_models[1] == 1]
    assert len(pairs) + len(alone) == len(fewer)
    names = [row["name"] for row in first["rows"]]
    merged = [m for m in METHODS.names() if m not in fewer]
    spaces = [f"{m} space={s}" for m in ("ties", "tsv_m") for s in ("core", "knots")]
    extra = ["task_arithmetic scaling=0.3", TRAINED, *spaces]
    grouped = ["simple_average (pairs)", *pairs, *alone]
    assert names == ["base", "individual", *merged, *extra, *grouped]
    assert _rows(first)["ties space=core"]["parameters"]["space"] == "core"
    assert _rows(first)[TRAINED]["parameters"]["mode"] == "trained"
    assert _rows(first)["star"]["parameters"] == {"eta": 40.0}


def test_rows_over_pairs_follow_from_their_merges_predictions(runs):
    """Each task's score is the mean over the merges that hold it (cyclic pairs, or alone)."""
    _, first, _ = runs
    stored = json.loads(Path(first["files"]["results"]).read_text())
    tasks = list(stored["tasks"])
    cyclic = [[t, tasks[(i + 1) % len(tasks)]] for i, t in enumerate(tasks)]
    grouped = [row for row in stored["rows"] if "merges" in row]
    assert {row["name"] for row in grouped} >= {"slerp (pairs)", "simple_average (pairs)"}
    for row in grouped:
        pairs = row["name"].endswith("(pairs)")
        assert row["merges"] == (cyclic if pairs else [[t] for t in tasks]), row["name"]
        for task, preds in stored["predictions"][row["name"]].items():
            if pairs:
                keys = ["+".join(g) for g in row["merges"] if task in g]
                assert set(preds[0]["preds"]) == set(keys)
                accs = [sum(p["preds"][k] == p["gold"] for p in preds) / len(preds) for k in keys]
            else:
                accs = [sum(p["pred"] == p["gold"] for p in preds) / len(preds)]
            assert row["scores"][task] == pytest.approx(sum(accs) / len(accs), abs=1e-12)
    assert "merges" not in _rows(stored)["simple_average"]


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
            assert meta["kinds"] == want
            assert first["tasks"][meta["task"]]["adapter"].endswith(meta["adapter"])
        assert "statistics" not in rows[method]["parameters"]
    assert first["data_used"]["localize_stitch"] == {"data": "none"}  # dataless by default
    assert set(first["timing"]["stats_s"]) == {"gram_in", "fisher", "masks"}
    assert second["timing"]["stats_s"] == {}  # the cached statistics are reused
    assert set(first["timing"]["merge_s"]) == {r["name"] for r in first["rows"][2:]}


def test_trained_masks_come_from_training_items_and_lower_the_training_loss(runs):
    """Each task's trained masks beat the dataless top-k mask of as many entries on its loss."""
    from starmerge.demo.assets import load_demo_task
    from starmerge.demo.env import cpu_threads
    from starmerge.demo.train import split_task
    from starmerge.io.statistics import StatsFile

    root, first, _ = runs
    used, n, cache = first["data_used"][TRAINED], demo.FAST["n_stats"], root / "cache/demo/minilm"
    assert used["split"] == "train" and used["n"] == n and used["kinds"] == ["masks"]
    assert used["masks"]["sparsity"] == 0.01 and used["masks"]["steps"] == 10
    assert all(0 < s < 0.1 for s in used["sparsity"]) and 0 <= used["overlap_fraction"] < 1
    fisher = first["data_used"]["fisher_merging"]["entries"]  # the statistics' items
    items = {m["task"]: m["items"] for m in (entry_meta(cache / "stats" / e) for e in fisher)}
    tokenizer, encoder = load_backbone()
    for task, entry in zip(first["tasks"], used["entries"], strict=True):
        meta, masks = entry_meta(cache / "stats" / entry), StatsFile(cache / "stats" / entry)
        assert meta["split"] == "train" and meta["items"] == items[task]  # the statistics' items
        train, _ = split_task(load_demo_task(task), demo.FAST["n_train"], demo.FAST["n_test"], 0)
        batch = tokenizer([train.texts[i] for i in meta["items"]], truncation=True, padding=True,
                          max_length=demo.FAST["max_length"], return_tensors="pt")  # fmt: skip
        labels = torch.tensor([train.labels[i] for i in meta["items"]])
        adapter = load_task_adapter(cache / first["tasks"][task]["adapter"])
        taus = {k: d.to_dense() for k, d in adapter.deltas.items()}
        trained = {k: masks.get(f"{k}::mask") & (t != 0) for k, t in taus.items()}
        kept = sum(int(m.sum()) for m in trained.values())
        cut = torch.cat([t.abs().flatten() for t in taus.values()]).topk(kept).values[-1]
        top_k = {k: (t.abs() >= cut) & (t != 0) for k, t in taus.items()}
        with cpu_threads():  # as the demo runs (two threads on a busy 2-core VM: 20x slower)
            losses = [_loss(encoder, adapter, batch, labels, {k: t * m[k] for k, t in taus.items()})
                      for m in (trained, top_k)]  # fmt: skip
        assert losses[0] < losses[1], (task, losses)
        assert meta["loss"]["trained"] == pytest.approx(losses[0], abs=1e-3)


def _loss(encoder, adapter, batch, labels, deltas) -> float:
    """Mean cross-entropy of ``adapter``'s head on base + ``deltas`` (mean pooling)."""
    from starmerge.tensors.delta import Dense

    with torch.no_grad(), applied(encoder, {k: Dense(d) for k, d in deltas.items()}):
        hidden = pooled(encoder, batch["input_ids"], batch["attention_mask"])
    logits = hidden @ adapter.head_weight.T + adapter.head_bias
    return float(torch.nn.functional.cross_entropy(logits, labels))


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
    return load_task_adapter(root / "cache" / "demo" / "minilm" / first["tasks"]["news"]["adapter"])


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


def test_costs_put_every_merge_side_by_side(runs):
    """Data used, statistics time, merge time and memory per merge (issue 6's benchmark)."""
    _, first, _ = runs
    merges = [row["name"] for row in first["rows"] if row["name"] not in ("base", "individual")]
    timing = first["timing"]
    assert set(timing["merge_s"]) == set(timing["merge_peak_bytes"]) == set(merges)
    lines = Path(first["files"]["costs"]).read_text().splitlines()
    assert lines[0].split()[0] == "Merge" and len(lines) == 2 + len(merges)
    by_name = {m: next(line for line in lines[2:] if line.startswith(m + "  ")) for m in merges}
    n = demo.FAST["n_stats"]
    assert f"{n} train items (gram_in)" in by_name["regmean"]
    assert f"{n} train items (fisher)" in by_name["fisher_merging"]
    assert " none " in by_name["simple_average"]
