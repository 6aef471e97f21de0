"""Output writing: atomic output directory, shards (read back by transformers), disk full."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from io_fixtures import tiny_llama

from starmerge.errors import InputError, OutputError
from starmerge.io import staging
from starmerge.io.checkpoint import TensorIndex
from starmerge.io.output_dir import (
    atomic_output_dir,
    check_output_dir,
    check_outside_inputs,
    copy_model_files,
    parse_size,
)
from starmerge.io.shards import StreamingShardWriter, TensorPlan


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(out)
    (out / "tokenizer_config.json").write_text("{}")
    return out


def write_all(directory, tensors, max_shard_size):
    plans = [TensorPlan(k, tuple(t.shape), t.dtype) for k, t in tensors.items()]
    writer = StreamingShardWriter(directory, plans, max_shard_size)
    for key, t in tensors.items():
        writer.write(key, t)
    files = writer.close()
    index = directory / "model.safetensors.index.json"
    return files + [index] if index.exists() else files


def test_sharded_round_trip_through_transformers(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    idx = TensorIndex.open(llama_dir)
    original = {k: idx.get(k) for k in idx.keys()}
    largest = max(t.numel() * t.element_size() for t in original.values())
    files = write_all(tmp_path, original, max_shard_size=largest * 2)
    n = len(files) - 1
    assert n > 2 and files[-1].name == "model.safetensors.index.json"
    assert [f.name for f in files[:-1]] == [
        f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)
    ]
    assert all(f.stat().st_size <= largest * 2 + 10_000 for f in files[:-1])  # + header
    index = json.loads(files[-1].read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in original.values())
    assert set(index["weight_map"]) == set(original)
    assert sorted(os.listdir(tmp_path)) == sorted(f.name for f in files)
    copy_model_files(llama_dir, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    for key, t in original.items():
        assert torch.equal(loaded[key], t), key


def test_single_shard(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "view": torch.randn(10, 10)[2:4]}
    files = write_all(tmp_path, tensors, parse_size("1GB"))
    assert files == [tmp_path / "model.safetensors"] and os.listdir(tmp_path) == [
        "model.safetensors"
    ]
    loaded = safetensors.torch.load_file(files[0])
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    from safetensors import safe_open

    assert safe_open(files[0], "pt").metadata() == {"format": "pt"}


def test_tensor_larger_than_a_shard_gets_its_own(tmp_path):
    files = write_all(
        tmp_path, {"a": torch.zeros(2), "big": torch.zeros(100), "c": torch.zeros(2)}, 16
    )
    weight_map = json.loads(files[-1].read_text())["weight_map"]
    assert len(set(weight_map.values())) == 3


def test_copy_model_files(llama_dir, tmp_path):
    copied = copy_model_files(llama_dir, tmp_path)
    assert [p.name for p in copied] == [
        "config.json",
        "generation_config.json",
        "tokenizer_config.json",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5GB", 5 * 10**9),
        ("500MB", 5 * 10**8),
        ("2KiB", 2048),
        ("1.5GiB", 3 * 2**29),
        ("10 kb", 10_000),
        ("123", 123),
        (1024, 1024),
        ("3B", 3),
        ("4MiB", 4 * 2**20),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["5XB", "GB", "-1GB", "0", "", "five", 0, True])
def test_parse_size_bad(bad):
    with pytest.raises(
        InputError, match=f"size must be a positive number .*got {bad!r}; write e.g. 5GB"
    ):
        parse_size(bad)


def test_atomic_success_creates_dir_and_parents(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with atomic_output_dir(out, overwrite=False) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".out.tmp-")
        (tmp / "model.safetensors").write_text("x")
    assert os.listdir(out) == ["model.safetensors"]
    assert os.listdir(out.parent) == ["out"]


@pytest.mark.parametrize("existing", [None, "empty", "full"])
def test_atomic_failure_leaves_no_trace(tmp_path, existing):
    out = tmp_path / "deep" / "out"
    if existing:
        out.mkdir(parents=True)
    if existing == "full":
        (out / "old.txt").write_text("old")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise RuntimeError("boom")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    if existing == "full":
        assert (out / "old.txt").read_text() == "old"


def test_non_empty_refused_before_anything(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("1")
    (out / "b").write_text("2")
    with pytest.raises(OutputError) as e:
        with atomic_output_dir(out, overwrite=False):
            pytest.fail("must not yield")
    assert str(e.value) == (
        f"output directory {out} is not empty (2 entries); pass --overwrite or choose another "
        "directory"
    )
    with pytest.raises(OutputError, match="is not empty"):
        check_output_dir(out, overwrite=False)
    check_output_dir(out, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_overwrite_replaces(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert os.listdir(out) == ["new.txt"]
    assert os.listdir(tmp_path) == ["out"]


def test_existing_empty_dir_is_used(tmp_path):
    with atomic_output_dir(tmp_path / "out", overwrite=False) as tmp:
        (tmp_path / "out").mkdir()  # created meanwhile, empty
        (tmp / "x").write_text("x")
    assert os.listdir(tmp_path / "out") == ["x"]


def test_output_path_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="is a file; choose a directory"):
        check_output_dir(tmp_path / "f", overwrite=True)


def test_disk_full_leaves_nothing(tmp_path, monkeypatch):
    from starmerge.io import shards

    calls = []
    real = shards._header

    def full_disk(tensors):
        calls.append(len(tensors))
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors)

    monkeypatch.setattr(shards, "_header", full_disk)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="disk full while writing"):
        with atomic_output_dir(out, overwrite=False) as tmp:
            write_all(tmp, {f"t{i}": torch.zeros(4) for i in range(4)}, max_shard_size=32)
    assert os.listdir(tmp_path) == []


def test_outside_inputs(tmp_path):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "a")
    inputs = [("adapter models[0]", tmp_path / "a")]
    check_outside_inputs(tmp_path / "b", inputs)
    check_outside_inputs(tmp_path / "ab", inputs)  # a shared name prefix is not containment
    for out, relation in [
        (tmp_path / "a", "is"),
        (tmp_path / "link", "is"),
        (tmp_path, "contains"),
        (tmp_path / "a" / "sub" / "new", "lies inside"),
        (tmp_path / "link" / "new", "lies inside"),
    ]:
        with pytest.raises(OutputError) as e:
            check_outside_inputs(out, inputs)
        assert str(e.value) == (
            f"output directory {out} {relation} the input adapter models[0] ({tmp_path / 'a'}); "
            "choose an output directory outside every input"
        )


def test_staging_names_are_short_and_owned(tmp_path):
    for name in ["out", "m" * 250, "é" * 120]:
        path = staging.staging_dir(tmp_path / name, "tmp")
        assert len(path.name.encode()) <= 110 and path.parent == tmp_path
        assert f"-{os.getpid()}-" in path.name
    assert staging.staging_dir(tmp_path / "out", "tmp").name.startswith(".out.tmp-")
    long_a, long_b = (staging.staging_dir(tmp_path / (c * 250), "tmp").name for c in "ab")
    assert long_a.split(".tmp-")[0] != long_b.split(".tmp-")[0]


def test_clean_stale_only_dead_owners(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    host, out = staging._host(), tmp_path / "out"
    dead_tmp = tmp_path / f".out.tmp-{host}-{proc.pid}-00000000"
    dead_old = tmp_path / f".out.old-{host}-{proc.pid}-00000000"
    live = tmp_path / f".out.tmp-{host}-{os.getpid()}-00000000"
    for d in (dead_tmp, dead_old, live):
        d.mkdir()
    assert staging.clean_stale(out) == [dead_tmp]  # .old- is the only copy while out is absent
    out.mkdir()
    assert staging.clean_stale(out) == [dead_old]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name])


def test_rename_noreplace(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    with pytest.raises(FileExistsError):
        staging.rename_noreplace(tmp_path / "src", tmp_path / "dst")  # even onto an empty directory
    staging.rename_noreplace(tmp_path / "src", tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == ["dst", "new"]


def test_filled_meanwhile_is_refused(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="appeared while the merge ran and is not empty"):
        with atomic_output_dir(out, overwrite=False) as tmp:
            out.mkdir()
            (out / "theirs").write_text("theirs")
            (tmp / "x").write_text("x")
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["theirs"]
