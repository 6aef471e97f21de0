"""TensorIndex reads safetensors with positioned reads: same tensors, no mapping, bad files refused.

The expected tensors come from ``safetensors.torch.save_file`` / ``load_file`` (the library's own
reader); corrupt files are written byte by byte here.
"""

from __future__ import annotations

import json
import struct
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from starmerge.errors import InputError
from starmerge.io.checkpoint import TensorIndex
from starmerge.io.safetensors_reader import DTYPES


def every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g)
    out = {f"t_{tag}": x.to(dtype) for tag, dtype in DTYPES.items() if dtype.is_floating_point}
    out |= {
        "i64": torch.arange(-7, 8, dtype=torch.int64).reshape(3, 5),
        "i32": torch.arange(6, dtype=torch.int32),
        "i16": torch.tensor([-3, 4], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "odd": torch.randn(7, generator=g).to(torch.bfloat16),  # 14 bytes
    }
    return out


def write_raw(
    path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None
) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def test_reads_what_safetensors_wrote(tmp_path):
    tensors = every_dtype()
    file = tmp_path / "model.safetensors"
    save_file(tensors, file, metadata={"format": "pt"})
    want = load_file(file)
    with TensorIndex.open(file) as idx:
        assert sorted(idx.keys()) == sorted(tensors)
        for key, t in want.items():
            got = idx.get(key)
            assert got.dtype == t.dtype and got.shape == t.shape, key
            as_bytes = [x.reshape(-1).view(torch.uint8) for x in (got, t)]
            assert torch.equal(*as_bytes), key  # bit for bit (float8 has no torch.equal)


def test_tensors_are_own_memory_not_a_mapping(tmp_path):
    file = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(256, 256)}, file)
    idx = TensorIndex.open(file)
    t = idx.get("w")
    t.add_(1.0)  # writable, private memory
    assert not torch.equal(t, idx.get("w"))  # the file is unchanged
    if sys.platform == "linux":
        maps = Path("/proc/self/maps").read_text()
        assert str(file) not in maps  # nothing of the file is mapped into the process
    idx.close()


def test_concurrent_reads(tmp_path):
    file = tmp_path / "model.safetensors"
    tensors = {f"w{i}": torch.full((64, 64), float(i)) for i in range(16)}
    save_file(tensors, file)
    idx = TensorIndex.open(file)
    bad: list[str] = []

    def read(keys):
        bad.extend(k for k in keys for _ in range(20) if not torch.equal(idx.get(k), tensors[k]))

    threads = [threading.Thread(target=read, args=(list(tensors)[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


CORRUPT = {
    "header past the end": ({"w": entry()}, 10_000, b"", "runs past the end"),
    "header too large": ({"w": entry()}, 200_000_000, b"", "exceeds safetensors' limit"),
    "not json": (b"{nope", None, b"", "not UTF-8 JSON"),
    "not utf-8": (b'{"\xff": 1}', None, b"", "not UTF-8 JSON"),
    "a json list": (b"[1, 2]", None, b"", "not a JSON object"),
    "no dtype": ({"w": {"shape": [2], "data_offsets": [0, 8]}}, None, b"\0" * 8, "is not {dtype"),
    "dtype not a string": ({"w": entry(dtype=5)}, None, b"\0" * 8, "is not {dtype"),
    "negative shape": ({"w": entry(shape=(-2,))}, None, b"\0" * 8, "is not {dtype"),
    "bool in shape": ({"w": entry(shape=(True,))}, None, b"\0" * 4, "is not {dtype"),
    "three offsets": ({"w": {**entry(), "data_offsets": [0, 4, 8]}}, None, b"\0" * 8, "is not"),
    "gap": ({"w": entry(offsets=(4, 12))}, None, b"\0" * 12, "the previous tensor ends at 0"),
    "overlap": (
        {"a": entry(), "b": entry(offsets=(4, 12))},
        None,
        b"\0" * 12,
        "'b' has data offsets [4, 12]",
    ),
    "end before begin": ({"w": entry(offsets=(8, 0))}, None, b"\0" * 8, "offsets [8, 0]"),
    "size of shape": ({"w": entry(shape=(3,))}, None, b"\0" * 8, "has 8 bytes of data"),
    "trailing bytes": ({"w": entry()}, None, b"\0" * 9, "ends at byte 8 of a 9-byte data"),
    "truncated data": ({"w": entry()}, None, b"\0" * 5, "ends at byte 8 of a 5-byte data"),
    "bad metadata": ({"__metadata__": {"a": 1}, "w": entry()}, None, b"\0" * 8, "__metadata__"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_files_are_refused(tmp_path, case):
    header, length, data, reason = CORRUPT[case]
    file = write_raw(tmp_path / "model.safetensors", header, data, length)
    with pytest.raises(InputError) as err:
        TensorIndex.open(file)
    message = str(err.value)
    assert message.startswith(f"cannot read {file}: the safetensors file is truncated or corrupt")
    assert reason in message and message.endswith("; re-download or re-save it")


def test_shorter_than_the_header_length(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"\x01\x02\x03")
    with pytest.raises(InputError, match="the file has 3 bytes, fewer than the 8-byte header"):
        TensorIndex.open(file)


def test_unknown_dtype_is_named(tmp_path):
    file = write_raw(tmp_path / "model.safetensors", {"w": entry(dtype="C64")}, b"\0" * 8)
    with pytest.raises(InputError, match="tensor 'w' in .* has dtype C64, which starmerge cannot"):
        TensorIndex.open(file)


def test_a_valid_hand_written_file(tmp_path):
    """The layout read back from raw bytes: offsets relative to the data, metadata ignored."""
    data = struct.pack("<2f", 1.5, -2.0) + struct.pack("<3h", 1, -2, 3)
    header = {
        "__metadata__": {"format": "pt"},
        "b": entry("I16", (3,), (8, 14)),
        "a": entry("F32", (1, 2), (0, 8)),
    }
    with TensorIndex.open(write_raw(tmp_path / "m.safetensors", header, data)) as idx:
        assert idx.keys() == ["b", "a"]  # header order
        assert torch.equal(idx.get("a"), torch.tensor([[1.5, -2.0]]))
        assert torch.equal(idx.get("b"), torch.tensor([1, -2, 3], dtype=torch.int16))


def test_file_truncated_after_open(tmp_path):
    file = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(4), "b": torch.ones(1000)}, file)
    idx = TensorIndex.open(file)
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(InputError, match=r"cannot read tensor 'b' from .*: the file is truncated"):
        idx.get("b")
    assert torch.equal(idx.get("a"), torch.ones(4))
