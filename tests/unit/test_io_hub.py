"""resolve() (local paths, Hub ids with a fake snapshot_download) and file hashing."""

from __future__ import annotations

import hashlib

import huggingface_hub
import pytest

from starmerge.errors import InputError
from starmerge.io.hashing import hash_files, sha256_file
from starmerge.io.hub import looks_like_hub_id, resolve


def test_local_path_is_returned(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: pytest.fail("download"))
    assert resolve(str(tmp_path), what="adapter") == tmp_path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    assert resolve("org/name", what="adapter").resolve() == (tmp_path / "org" / "name")


def test_hub_id_is_downloaded(tmp_path, monkeypatch):
    calls = []

    def fake(**kwargs):
        calls.append(kwargs)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    got = resolve("my-org/my.adapter_1", what="adapter", allow_patterns=["adapter_*"])
    assert got == tmp_path
    assert calls == [{"repo_id": "my-org/my.adapter_1", "allow_patterns": ["adapter_*"]}]


def test_download_failure_is_an_input_error(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(**kwargs):
        raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache\nmore")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(InputError) as e:
        resolve("org/name", what="adapter")
    assert str(e.value) == (
        "adapter 'org/name' is not a local path and could not be downloaded from the Hugging Face "
        "Hub (LocalEntryNotFoundError: Cannot find the requested files in the disk cache); give "
        "a local directory or check the id and your network"
    )


@pytest.mark.parametrize("bad", ["./missing", "/abs/missing", "a/b/c", "missing", "../x/y", "a/.."])
def test_not_a_path_nor_a_hub_id(monkeypatch, tmp_path, bad):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: pytest.fail("download"))
    with pytest.raises(InputError, match=f"base model '{bad}' does not exist and is not a Hugging"):
        resolve(bad, what="base model")


def test_looks_like_hub_id():
    assert looks_like_hub_id("meta-llama/Llama-3.2-3B-Instruct")
    assert looks_like_hub_id("Lots-of-LoRAs/Mistral-7B-Instruct-v0.2-4b-r16-task1")
    assert not looks_like_hub_id("a/b/c") and not looks_like_hub_id(".a/b")


def test_hashing(tmp_path):
    data = bytes(range(256)) * 10_000  # > 1 MiB, so several chunks
    (tmp_path / "w.bin").write_bytes(data)
    (tmp_path / "e").write_bytes(b"")
    assert sha256_file(tmp_path / "w.bin") == hashlib.sha256(data).hexdigest()
    got = hash_files([tmp_path / "w.bin", tmp_path / "e"])
    assert got == {
        str(tmp_path / "w.bin"): hashlib.sha256(data).hexdigest(),
        str(tmp_path / "e"): hashlib.sha256(b"").hexdigest(),
    }
