"""Data-driven methods end to end: tiny llama, two PEFT adapters, two local JSONL task files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tests.conftest import make_adapter
from tests.integration.helpers import load_state, run_cli, write_config
from tests.unit.data_fixtures import make_tokenizer, write_copy_task, write_sentiment_task

from starmerge.api import merge_deltas
from starmerge.io.adapter import load_adapter

TARGETS = ["q_proj", "v_proj", "up_proj"]


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("data_methods")
    base = root / "base"
    shutil.copytree(tiny_models["llama"], base)
    make_tokenizer().save_pretrained(base)  # statistics need the base's tokenizer
    adapters = [
        make_adapter(base, root / f"adapter{i}", targets=TARGETS, seed=i + 1) for i in (0, 1)
    ]
    tasks = [write_sentiment_task(root / "tasks"), write_copy_task(root / "tasks")]
    return {"base": base, "adapters": adapters, "tasks": tasks, "cache": root / "cache"}


def _merge(capsys, tmp_path, setup, method, parameters, *, data=True, out="out"):
    cfg = dict(
        method=method,
        parameters=parameters,
        base_model=str(setup["base"]),
        models=[{"adapter": str(a)} for a in setup["adapters"]],
        output={"format": "model", "dtype": "float32"},
    )
    if data:
        cfg["data"] = {
            "tasks": [str(t) for t in setup["tasks"]],
            "n_examples": 4,
            "batch_size": 2,
            "max_length": 32,
            "cache_dir": str(setup["cache"]),
        }
    path = write_config(tmp_path / f"{method}.yaml", **cfg)
    code, _, err = run_cli(capsys, "merge", path, tmp_path / out, "--quiet")
    assert code == 0, err
    return json.loads((tmp_path / out / "starmerge.json").read_text())


def _task_deltas(setup):
    adapters = [load_adapter(a) for a in setup["adapters"]]
    return [{k: ad.get(k) for k in ad.keys()} for ad in adapters]


def _check_model(tmp_path, setup, expected, out="out"):
    base, merged = load_state(setup["base"]), load_file(tmp_path / out / "model.safetensors")
    assert set(merged) == set(base)
    for key, tensor in merged.items():
        want = base[key] + (expected[key].to_dense() if key in expected else 0)
        torch.testing.assert_close(tensor, want, rtol=1e-5, atol=1e-6, msg=key)


def test_mats_kfac_cli_matches_the_api_and_reuses_the_cache(tmp_path, capsys, setup):
    params = {"objective": "kfac", "iterations": 30}
    manifest = _merge(capsys, tmp_path, setup, "mats", params)
    assert manifest["method"]["parameters"]["statistics"] is None  # never rewritten
    files = manifest["statistics"]["state"]["statistics"]  # the entries the fit step read
    assert len(files) == 2
    with safe_open(f"{files[0]}/part-00000.safetensors", "pt") as f:
        assert "model.layers.0.self_attn.q_proj::gram_out" in f.keys()
    meta = json.loads(open(f"{files[0]}/index.json").read())["meta"]
    assert meta["kinds"] == ["gram_in", "gram_out"] and "non-pad" in meta["normalisation"]
    per_param = manifest["statistics"]["per_parameter"]
    assert per_param["model.layers.1.mlp.up_proj.weight"]["solved"] is True
    expected = merge_deltas("mats", _task_deltas(setup), {**params, "statistics": files}).deltas
    _check_model(tmp_path, setup, expected)
    entries = sorted(p.name for p in setup["cache"].iterdir())
    again = _merge(capsys, tmp_path, setup, "mats", params, out="again")  # cached: no new entries
    assert again["statistics"]["state"]["statistics"] == files
    assert sorted(p.name for p in setup["cache"].iterdir()) == entries


@pytest.mark.parametrize(
    ("method", "params"), [("regmean", {}), ("fisher_merging", {"fisher": "true"})]
)
def test_closed_forms_through_the_cli(tmp_path, capsys, setup, method, params):
    manifest = _merge(capsys, tmp_path, setup, method, params)
    files = manifest["statistics"]["state"]["statistics"]
    expected = merge_deltas(method, _task_deltas(setup), {**params, "statistics": files}).deltas
    _check_model(tmp_path, setup, expected)


@pytest.mark.parametrize("mode", ["dataless", "trained"])
def test_localize_stitch_writes_masks_and_reports_sparsity(tmp_path, capsys, setup, mode):
    params = {"mode": mode} if mode == "dataless" else {"mode": mode, "steps": 3, "lr": 1e5}
    manifest = _merge(capsys, tmp_path, setup, "localize_stitch", params, data=mode == "trained")
    state = manifest["statistics"]["state"]
    assert len(state["sparsity"]) == 2 and 0 <= state["overlap_fraction"] <= 1
    if mode == "dataless":
        assert all(abs(s - 0.05) < 1e-3 for s in state["sparsity"])
    deltas = _task_deltas(setup)
    expected = {}
    with safe_open(tmp_path / "out" / "artifacts.safetensors", "pt") as f:
        for key in deltas[0]:
            masks = f.get_tensor(f"{key}::masks")  # (T, out, in)
            assert masks.dtype == torch.bool and masks.shape == (2, *deltas[0][key].shape)
            taus = torch.stack([d[key].to_dense() for d in deltas])
            stitched = (masks * taus).sum(0) / masks.sum(0).clamp(min=1)
            expected[key] = type("D", (), {"to_dense": lambda self, s=stitched: s})()
    _check_model(tmp_path, setup, expected)


def test_data_method_without_data_section_is_a_config_error(tmp_path, capsys, setup):
    cfg = write_config(
        tmp_path / "c.yaml",
        method="mats",
        base_model=str(setup["base"]),
        models=[{"adapter": str(a)} for a in setup["adapters"]],
    )
    code, _, err = run_cli(capsys, "merge", cfg, tmp_path / "out", "--quiet")
    assert code == 2 and err.startswith("error:") and "add a `data:` section" in err
    assert not (tmp_path / "out").exists()


def test_a_budget_below_one_module_names_data_memory_budget(tmp_path, capsys, setup):
    cfg = write_config(
        tmp_path / "c.yaml",
        method="regmean",
        base_model=str(setup["base"]),
        models=[{"adapter": str(a)} for a in setup["adapters"]],
        data={
            "tasks": [str(t) for t in setup["tasks"]],
            "n_examples": 2,
            "memory_budget": "1KB",
            "cache_dir": str(tmp_path / "cache"),
        },
    )
    code, _, err = run_cli(capsys, "merge", cfg, tmp_path / "out", "--quiet")
    assert code == 2 and "error: statistics of model.layers.0." in err  # after progress bars
    assert err.rstrip().endswith("but data.memory_budget is 1000; raise data.memory_budget")


def test_precomputed_statistics_are_an_input_validated_like_the_others(tmp_path, capsys, setup):
    manifest = _merge(capsys, tmp_path, setup, "regmean", {}, out="collected")
    files = manifest["statistics"]["state"]["statistics"]
    given = _merge(capsys, tmp_path, setup, "regmean", {"statistics": files}, data=False)
    assert given["method"]["parameters"]["statistics"] == files
    assert given["statistics"]["state"]["statistics"] == files
    base = load_file(tmp_path / "collected" / "model.safetensors")
    for key, tensor in load_file(tmp_path / "out" / "model.safetensors").items():
        assert torch.equal(tensor, base[key]), key
    for statistics, message in (
        ([files[0]], "parameters.statistics must list one statistics file per model (2), got 1"),
        ([files[0], str(tmp_path / "nope")], f"statistics {tmp_path / 'nope'} does not exist"),
    ):
        cfg = write_config(
            tmp_path / "bad.yaml",
            method="regmean",
            parameters={"statistics": statistics},
            base_model=str(setup["base"]),
            models=[{"adapter": str(a)} for a in setup["adapters"]],
        )
        code, _, err = run_cli(capsys, "validate", cfg)
        assert code == 2 and err.startswith("error:") and message in err, err
