"""Paths and outputs: OUT_DIR never overlaps an input, races, leftovers, shard indexes, the
relative-path rule and a full disk while the manifest is written (issue 10, items 1, 4 and 6).

Every refusal: exit code 2, one `error:` line, no traceback, every input and OUT_DIR
byte-identical afterwards (``tree_hash``), and no staging directory left next to OUT_DIR.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys

import huggingface_hub
import pytest
import torch
from safetensors import safe_open
from tests.integration.helpers import (
    refused,
    run_cli,
    write_config,
)

from starmerge import engine
from starmerge.config import parse_config
from starmerge.io import checkpoint, staging
from starmerge.io.checkpoint import TensorIndex
from starmerge.paths import with_absolute_paths
from starmerge.sweep.config import load_sweep

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def inputs(tmp_path, tiny_models, llama_adapters):
    """Private copies of the tiny llama and two adapters (a failing test cannot hurt others)."""
    root = tmp_path / "inputs"
    base = shutil.copytree(tiny_models["llama"], root / "base")
    a = shutil.copytree(llama_adapters[0], root / "a")
    b = shutil.copytree(llama_adapters[1], root / "b")
    return {"root": root, "base": base, "a": a, "b": b}


def _config(path, base, *adapters, **extra):
    models = [{"adapter": str(a)} for a in adapters]
    return write_config(
        path, method="task_arithmetic", base_model=str(base), models=models, **extra
    )


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# --- 1. OUT_DIR is never an input, never contains one, never lies inside one ------------------


@pytest.mark.parametrize(
    "flags", [(), ("--overwrite",), ("--dry-run",), ("--overwrite", "--dry-run")]
)
@pytest.mark.parametrize(
    ("where", "relation", "label", "which"),
    [
        ("a", "is", "adapter models[0]", "a"),
        ("b", "is", "adapter models[1]", "b"),
        ("base", "is", "base model", "base"),
        ("", "contains", "base model", "base"),  # the folder that holds every input
        ("a/sub", "lies inside", "adapter models[0]", "a"),
        ("base/x/y", "lies inside", "base model", "base"),
    ],
)
def test_output_overlapping_an_input_isrefused(
    tmp_path, capsys, inputs, flags, where, relation, label, which
):
    cfg = _config(tmp_path / "c.yaml", inputs["base"], inputs["a"], inputs["b"])
    out = inputs["root"] / where
    err = refused(capsys, ["merge", cfg, out, "--quiet", *flags], [inputs["root"], cfg])
    assert err == (
        f"error: output directory {out} {relation} the input {label} ({inputs[which]}); "
        "choose an output directory outside every input"
    )


def test_output_symlinked_to_an_input_isrefused(tmp_path, capsys, inputs):
    cfg = _config(tmp_path / "c.yaml", inputs["base"], inputs["a"], inputs["b"])
    link = tmp_path / "out"
    link.symlink_to(inputs["b"], target_is_directory=True)
    refused(
        capsys,
        ["merge", cfg, link, "--quiet", "--overwrite"],
        [inputs["root"], cfg],
        f"output directory {link} is the input adapter models[1] ({inputs['b']})",
    )
    assert link.is_symlink() and os.readlink(link) == str(inputs["b"])


def test_output_holding_a_file_an_input_links_to_isrefused(tmp_path, capsys, inputs):
    """An input's weight file may be a symlink (as in the Hugging Face cache): its target counts."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    weights = inputs["a"] / "adapter_model.safetensors"
    shutil.move(weights, blobs / "abc123")
    weights.symlink_to(blobs / "abc123")
    cfg = _config(tmp_path / "c.yaml", inputs["base"], inputs["a"], inputs["b"])
    refused(
        capsys,
        ["merge", cfg, blobs, "--quiet", "--overwrite"],
        [inputs["root"], blobs, cfg],
        f"output directory {blobs} contains the input adapter models[0] ({blobs / 'abc123'})",
    )


def test_output_in_the_hub_cache_of_an_input_isrefused(tmp_path, capsys, inputs, monkeypatch):
    snapshot = tmp_path / "hub" / "models--org--b" / "snapshots" / "rev"
    shutil.copytree(inputs["b"], snapshot)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: str(snapshot))
    cfg = _config(tmp_path / "c.yaml", inputs["base"], inputs["a"], "org/b")
    refused(
        capsys,
        ["merge", cfg, snapshot.parent.parent, "--quiet", "--overwrite"],
        [inputs["root"], tmp_path / "hub", cfg],
        "contains the input adapter models[1]",
    )


# --- 2. an OUT_DIR that appears during the merge is never replaced without --overwrite --------


@pytest.mark.parametrize("existing", [None, "empty"])
def test_output_that_appears_meanwhile_is_left_alone(
    tmp_path, capsys, inputs, monkeypatch, existing
):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    real = engine.write_manifest

    def racing(tmp, manifest):  # another merge finishes into OUT_DIR while this one runs
        out.mkdir(exist_ok=True)
        (out / "theirs.txt").write_text("theirs")
        return real(tmp, manifest)

    monkeypatch.setattr(engine, "write_manifest", racing)
    cfg = _config(tmp_path / "c.yaml", inputs["base"], inputs["a"], inputs["b"])
    refused(
        capsys,
        ["merge", cfg, out, "--quiet"],
        [inputs["root"], cfg],
        f"output directory {out} appeared while the merge ran and is not empty",
        "--overwrite",
    )
    assert os.listdir(out) == ["theirs.txt"] and (out / "theirs.txt").read_text() == "theirs"
    assert _leftovers(tmp_path) == []


# --- 6. leftovers: stale staging directories, symlinked OUT_DIR, long names -------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_staging_dirs_of_dead_runs_are_cleaned(tmp_path, capsys, inputs):
    out = tmp_path / "out"
    host = staging._host()
    dead = tmp_path / f".out.tmp-{host}-{_dead_pid()}-0123abcd"
    live = tmp_path / f".out.tmp-{host}-{os.getpid()}-0123abcd"
    other_host = (
        tmp_path / f".out.tmp-{'0' * 6 if host != '0' * 6 else '1' * 6}-{_dead_pid()}-0123abcd"
    )
    other_out = tmp_path / f".other.tmp-{host}-{_dead_pid()}-0123abcd"
    not_ours = tmp_path / ".out.tmp-0123abcd"  # no owner in the name: never touched
    for d in (dead, live, other_host, other_out, not_ours):
        d.mkdir()
        (d / "model.safetensors").write_text("half")
    cfg = _config(tmp_path / "c.yaml", inputs["base"], inputs["a"], inputs["b"])
    code, _, err = run_cli(capsys, "merge", cfg, out, "--quiet")
    assert code == 0, err
    assert not dead.exists()
    assert all((d / "model.safetensors").exists() for d in (live, other_host, other_out, not_ours))
    assert (out / "starmerge.json").is_file()


def test_killed_merge_leftover_is_cleaned_by_the_next_run(tmp_path, capsys, inputs):
    """A merge SIGKILLed while writing: its staging directory goes at the next run."""
    out = tmp_path / "out"
    cfg = _config(tmp_path / "c.yaml", inputs["base"], inputs["a"], inputs["b"])
    script = (
        "import os, signal, sys\n"
        "from starmerge import engine\n"
        "def die(tmp, manifest): os.kill(os.getpid(), signal.SIGKILL)\n"
        "engine.write_manifest = die\n"
        "from starmerge.cli import main\n"
        f"main(['merge', {str(cfg)!r}, {str(out)!r}, '--quiet'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert len(_leftovers(tmp_path)) == 1 and not out.exists()
    code, _, err = run_cli(capsys, "merge", cfg, out, "--quiet")
    assert code == 0, err
    assert _leftovers(tmp_path) == [] and (out / "starmerge.json").is_file()


def test_symlinked_output_with_overwrite_leaves_nothing_behind(tmp_path, capsys, inputs):
    target = tmp_path / "target"
    target.mkdir()
    (target / "old.txt").write_text("old")
    link = tmp_path / "out"
    link.symlink_to(target, target_is_directory=True)
    cfg = _config(tmp_path / "c.yaml", inputs["base"], inputs["a"], inputs["b"])
    code, _, err = run_cli(capsys, "merge", cfg, link, "--quiet", "--overwrite")
    assert code == 0, err
    assert not link.is_symlink() and (link / "starmerge.json").is_file()
    assert os.listdir(target) == ["old.txt"]  # the link was replaced, not what it pointed to
    assert _leftovers(tmp_path) == []


def test_long_output_name(tmp_path, capsys, inputs):
    out = tmp_path / ("m" * 250)
    cfg = _config(tmp_path / "c.yaml", inputs["base"], inputs["a"], inputs["b"])
    code, _, err = run_cli(capsys, "merge", cfg, out, "--quiet")
    assert code == 0, err
    assert (out / "starmerge.json").is_file() and _leftovers(tmp_path) == []


# --- 4. a shard index may only name shards in the model directory -----------------------------


def _sharded_base(tmp_path, base, entry, *, bin_index=False):
    """A copy of ``base`` whose shard index maps every tensor to ``entry``."""
    model = shutil.copytree(base, tmp_path / "sharded")
    weights = model / "model.safetensors"
    with safe_open(weights, "pt") as f:
        keys = list(f.keys())
    shutil.move(weights, tmp_path / "outside.safetensors")
    name = "pytorch_model.bin.index.json" if bin_index else "model.safetensors.index.json"
    (model / name).write_text(
        json.dumps({"metadata": {}, "weight_map": dict.fromkeys(keys, entry)})
    )
    return model


@pytest.fixture
def opened(monkeypatch):
    """Every weight file opened (safetensors) or unpickled (torch.load), in order."""
    files: list[str] = []
    real_open, real_load = checkpoint.safe_open, torch.load

    def spy_open(file, *args, **kwargs):
        files.append(str(file))
        return real_open(file, *args, **kwargs)

    def spy_load(file, *args, **kwargs):
        files.append(str(file))
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "safe_open", spy_open)
    monkeypatch.setattr(torch, "load", spy_load)
    return files


@pytest.mark.parametrize(
    ("entry", "bin_index"),
    [
        ("../outside.safetensors", False),
        ("ABS", False),
        ("sub/../../outside.safetensors", False),
        ("../outside.bin", True),
    ],
)
def test_shard_index_pointing_outside_is_refused_before_opening(
    tmp_path, capsys, inputs, opened, entry, bin_index
):
    if entry == "ABS":
        entry = str(tmp_path / "outside.safetensors")
    if bin_index:
        shutil.copy(inputs["base"] / "model.safetensors", tmp_path / "outside.bin")
    model = _sharded_base(tmp_path, inputs["base"], entry, bin_index=bin_index)
    cfg = _config(tmp_path / "c.yaml", model, inputs["a"], inputs["b"])
    refused(
        capsys,
        ["merge", cfg, tmp_path / "out", "--quiet"],
        [inputs["root"], model, cfg, tmp_path / "outside.safetensors"],
        f"lists shard '{entry}', which is not a file name in the model directory",
    )
    assert not [f for f in opened if "outside" in f or str(model) in f]


def test_symlinked_shard_escaping_the_model_directory_isrefused(tmp_path, capsys, inputs, opened):
    model = _sharded_base(tmp_path, inputs["base"], "model-00001-of-00001.safetensors")
    (model / "model-00001-of-00001.safetensors").symlink_to(tmp_path / "outside.safetensors")
    cfg = _config(tmp_path / "c.yaml", model, inputs["a"], inputs["b"])
    refused(
        capsys,
        ["merge", cfg, tmp_path / "out", "--quiet"],
        [inputs["root"], model, cfg],
        f"is a symlink to {tmp_path / 'outside.safetensors'}, outside the model directory",
    )
    assert not [f for f in opened if "outside" in f or str(model) in f]


def test_hub_cache_shards_linking_to_blobs_are_read(tmp_path, inputs):
    """The Hugging Face cache layout (snapshot files linking to ../../blobs) stays readable."""
    repo = tmp_path / "models--org--m"
    snapshot = repo / "snapshots" / "rev"
    model = _sharded_base(tmp_path, inputs["base"], "model-00001-of-00001.safetensors")
    (repo / "blobs").mkdir(parents=True)
    shutil.move(tmp_path / "outside.safetensors", repo / "blobs" / "f00d")
    shutil.copytree(model, snapshot)
    (snapshot / "model-00001-of-00001.safetensors").symlink_to("../../blobs/f00d")
    index = TensorIndex.open(snapshot)
    assert len(index) > 0 and index.files == [snapshot / "model-00001-of-00001.safetensors"]


# --- 5. relative paths start at the config file's directory -----------------------------------


def test_relative_paths_start_at_the_config_file(tmp_path, capsys, inputs, monkeypatch):
    cfg_dir = inputs["root"] / "configs"
    cfg_dir.mkdir()
    cfg = write_config(
        cfg_dir / "c.yaml",
        method="task_arithmetic",
        base_model="../base",
        models=[{"adapter": "../a"}, {"adapter": "../a"}],
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "merge", cfg, out, "--quiet", "models.1.adapter=../b")
    assert code == 0, err
    manifest = json.loads((out / "starmerge.json").read_text())
    assert manifest["config"]["base_model"] == str(inputs["base"])
    assert [m["adapter"] for m in manifest["config"]["models"]] == [
        str(inputs["a"]),
        str(inputs["b"]),
    ]
    assert [i["path"] for i in manifest["inputs"]] == [str(inputs["a"]), str(inputs["b"])]


def test_every_config_path_starts_at_the_config_file(tmp_path, monkeypatch):
    cfg_dir = tmp_path / "configs"
    for name in ("base", "a", "tasks"):
        (cfg_dir / name).mkdir(parents=True)
    (cfg_dir / "tasks" / "t1.yaml").write_text("x")
    (cfg_dir / "stats.safetensors").write_text("x")
    raw = {
        "method": "mats",
        "parameters": {"statistics": ["stats.safetensors", "org/missing"]},
        "base_model": "base",
        "models": [{"adapter": "a"}, {"adapter": "org/hub-adapter"}],
        "data": {"tasks": ["tasks/t1.yaml", "news"], "cache_dir": "cache"},
    }
    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_paths(parse_config(raw), cfg_dir)
    assert cfg.base_model == str(cfg_dir / "base")
    assert [m.source for m in cfg.models] == [str(cfg_dir / "a"), "org/hub-adapter"]
    assert cfg.data.tasks == (str(cfg_dir / "tasks" / "t1.yaml"), "news")  # news: a built-in
    assert cfg.data.cache_dir == str(cfg_dir / "cache")  # an output: need not exist yet
    assert cfg.parameters["statistics"] == [str(cfg_dir / "stats.safetensors"), "org/missing"]


def test_relative_path_from_the_working_directory_isrefused(tmp_path, capsys, inputs, monkeypatch):
    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    cfg = write_config(
        cfg_dir / "c.yaml",
        method="task_arithmetic",
        base_model=str(inputs["base"]),
        models=[{"adapter": "inputs/a/"}, {"adapter": str(inputs["b"])}],
    )
    monkeypatch.chdir(tmp_path)  # inputs/a exists from here, but not from the config's directory
    refused(
        capsys,
        ["merge", cfg, tmp_path / "out", "--quiet"],
        [inputs["root"], cfg],
        f"adapter 'inputs/a/' does not exist (looked in {cfg_dir}: relative paths start at the "
        "config file's directory)",
    )


# --- 4 (manifest part). a full disk while the manifest or model card is written --------------


@pytest.mark.parametrize("name", ["starmerge.json", "README.md"])
def test_disk_full_while_writing_the_manifest(tmp_path, capsys, inputs, monkeypatch, name):
    real = pathlib.Path.write_text

    def full(self, data, *args, **kwargs):
        if self.name != name:
            return real(self, data, *args, **kwargs)
        real(self, data[: len(data) // 2])  # a partial file, as a full disk leaves it
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    cfg = _config(tmp_path / "c.yaml", inputs["base"], inputs["a"], inputs["b"])
    out = tmp_path / "out"
    refused(
        capsys,
        ["merge", cfg, out, "--quiet"],
        [inputs["root"], cfg, out],
        f"disk full while writing {name} to",
        "free space or choose another output directory",
    )
    assert not out.exists() and _leftovers(tmp_path) == []


def test_output_holding_the_config_file_isrefused(tmp_path, capsys, inputs):
    work = tmp_path / "work"
    work.mkdir()
    cfg = _config(work / "c.yaml", inputs["base"], inputs["a"], inputs["b"])
    refused(
        capsys,
        ["merge", cfg, work, "--quiet", "--overwrite"],
        [inputs["root"], work],
        f"output directory {work} contains the input config file ({cfg})",
    )


def test_sweep_and_suite_paths_start_at_their_files(tmp_path, monkeypatch):
    exp = tmp_path / "exp"
    (exp / "adapters" / "mnli").mkdir(parents=True)
    (exp / "base").mkdir()
    (exp / "parent.yaml").write_text("include: flan-t5-large\nbatch_size: 2\n")
    (exp / "suite.yaml").write_text(
        "include: parent.yaml\nbase_model: base\n"
        "tasks:\n  mnli: {adapter: adapters/mnli}\n  piqa: {adapter: org/piqa-lora}\n"
    )
    (exp / "sweep.yaml").write_text(
        "suite: suite.yaml\nmethods: {simple_average: {}}\ntasks: {sets: [[mnli, piqa]]}\n"
    )
    monkeypatch.chdir(tmp_path)  # none of these paths exists from here
    suite = load_sweep(exp / "sweep.yaml").suite
    assert suite.base_model == str(exp / "base") and suite.batch_size == 2
    assert suite.tasks["mnli"].adapter == str(exp / "adapters" / "mnli")
    assert suite.tasks["piqa"].adapter == "org/piqa-lora"  # no such path: a Hub id
