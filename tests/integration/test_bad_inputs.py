"""Every bad input: exit code 2, one `error:` line that says what and the fix, OUT_DIR untouched."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
from safetensors.torch import load_file, save_file
from tests.integration.helpers import assert_one_error, run_cli, write_config


def _models(adapters):
    return [{"adapter": str(a)} for a in adapters]


def _assert_refused(capsys, cfg, out_dir, *needles, extra=()):
    before = sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else None
    code, _, err = run_cli(capsys, "merge", cfg, out_dir, "--quiet", *extra)
    assert_one_error(code, err, *needles)
    after = sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else None
    assert after == before
    assert not [p for p in out_dir.parent.iterdir() if ".tmp" in p.name]
    return err


@pytest.fixture
def base(tiny_models):
    return str(tiny_models["llama"])


def test_missing_path(tmp_path, capsys, base, llama_adapters):
    cfg = write_config(
        tmp_path / "c.yaml",
        method="star",
        base_model=base,
        models=_models(llama_adapters[:1]) + [{"adapter": str(tmp_path / "nope")}],
    )
    _assert_refused(capsys, cfg, tmp_path / "out", "nope", "does not exist")


def test_missing_config_file(tmp_path, capsys):
    _assert_refused(capsys, tmp_path / "absent.yaml", tmp_path / "out", "absent.yaml")


@pytest.mark.parametrize(
    "method,params,needle",
    [
        ("tie", {}, "Did you mean: ties?"),
        ("star", {"eta": 0}, "star: eta must be in (0, 100], got 0"),
        ("star", {"eta": 150}, "star: eta must be in (0, 100], got 150"),
        ("ties", {"density": 0}, "ties: density must be in (0, 1], got 0"),
        ("star", {"etta": 40}, "Did you mean: eta?"),
    ],
)
def test_bad_method_or_parameter(tmp_path, capsys, base, llama_adapters, method, params, needle):
    cfg = write_config(
        tmp_path / "c.yaml",
        method=method,
        parameters=params,
        base_model=base,
        models=_models(llama_adapters),
    )
    _assert_refused(capsys, cfg, tmp_path / "out", needle)


def test_unknown_yaml_key_and_every_error_at_once(tmp_path, capsys, base, llama_adapters):
    cfg = write_config(
        tmp_path / "c.yaml",
        method="star",
        parameters={"eta": 0},
        base_model=base,
        models=_models(llama_adapters),
        outptu={"format": "model"},
    )
    err = _assert_refused(capsys, cfg, tmp_path / "out", "outptu", "Did you mean: output?")
    assert "eta must be in" in err  # both problems in the one line
    code, out, err = run_cli(capsys, "validate", cfg)
    assert code == 2 and "outptu" in err and "eta" in err


def test_truncated_safetensors(tmp_path, capsys, base, llama_adapters):
    bad = tmp_path / "bad"
    shutil.copytree(llama_adapters[0], bad)
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    cfg = write_config(
        tmp_path / "c.yaml",
        method="star",
        base_model=base,
        models=_models([llama_adapters[1], bad]),
    )
    _assert_refused(capsys, cfg, tmp_path / "out", "adapter_model.safetensors")


def test_nan_in_adapter(tmp_path, capsys, base, llama_adapters):
    bad = tmp_path / "nan"
    shutil.copytree(llama_adapters[0], bad)
    weights = bad / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, weights)
    cfg = write_config(
        tmp_path / "c.yaml",
        method="star",
        base_model=base,
        models=_models([llama_adapters[1], bad]),
    )
    _assert_refused(capsys, cfg, tmp_path / "out", "NaN")


def test_shapes_disagree_with_base(tmp_path, capsys, tiny_models, llama_adapters):
    from tests.conftest import build_tiny_model, make_adapter

    other = build_tiny_model("t5", tmp_path / "t5")
    adapter = make_adapter(other, tmp_path / "t5_adapter", targets=["q", "v"])
    cfg = write_config(
        tmp_path / "c.yaml",
        method="star",
        base_model=str(tiny_models["llama"]),
        models=_models([llama_adapters[0], adapter]),
    )
    _assert_refused(capsys, cfg, tmp_path / "out", "base model")


def test_adapters_for_different_base_models(tmp_path, capsys, base, llama_adapters):
    other = tmp_path / "other"
    shutil.copytree(llama_adapters[0], other)
    config = json.loads((other / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/another-model"
    (other / "adapter_config.json").write_text(json.dumps(config))
    cfg = write_config(
        tmp_path / "c.yaml",
        method="star",
        base_model=base,
        models=_models([llama_adapters[1], other]),
    )
    _assert_refused(capsys, cfg, tmp_path / "out", "different base models")


def test_unsupported_feature_dora(tmp_path, capsys, tiny_models, llama_adapters):
    from tests.conftest import make_adapter

    dora = make_adapter(tiny_models["llama"], tmp_path / "dora", targets=["q_proj"], use_dora=True)
    cfg = write_config(
        tmp_path / "c.yaml",
        method="star",
        base_model=str(tiny_models["llama"]),
        models=_models([llama_adapters[0], dora]),
    )
    _assert_refused(capsys, cfg, tmp_path / "out", "DoRA")


def test_non_empty_output_needs_overwrite(tmp_path, capsys, base, llama_adapters):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cfg = write_config(
        tmp_path / "c.yaml", method="star", base_model=base, models=_models(llama_adapters)
    )
    _assert_refused(capsys, cfg, out, "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = run_cli(capsys, "merge", cfg, out, "--quiet", "--overwrite")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "starmerge.json").is_file()


def test_disk_full_leaves_nothing(tmp_path, capsys, base, llama_adapters, monkeypatch):
    from starmerge.io import shards

    real_header = shards._header
    calls = {"n": 0}

    def failing_header(tensors):
        calls["n"] += 1
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards, "_header", failing_header)
    cfg = write_config(
        tmp_path / "c.yaml", method="star", base_model=base, models=_models(llama_adapters)
    )
    _assert_refused(capsys, cfg, tmp_path / "out", "disk full")
    assert calls["n"] == 1 and real_header is not failing_header
    assert not (tmp_path / "out").exists()


def test_no_traceback_from_console_script(tmp_path):
    import subprocess
    import sys

    cfg = write_config(tmp_path / "c.yaml", method="tie", models=[{"adapter": "x"}])
    proc = subprocess.run(
        [sys.executable, "-m", "starmerge", "validate", str(cfg)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
