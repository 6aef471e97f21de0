"""Read safetensors files with positioned reads instead of a memory map.

``safe_open`` memory-maps the file: every page of a tensor read through the map stays mapped in
the process (``RssFile``) while the handle is open, and counts in its ``ru_maxrss``. A merge that
reads a 2 GB base model held 2.3 GB of such pages at its peak (``bench_mergekit.py``). Here the
header (an 8-byte little-endian length, then JSON) is parsed and checked as safetensors checks it,
and a tensor is read with ``os.preadv`` into a fresh ``torch.uint8`` buffer, then viewed as its
dtype and shape: the file's pages go through the page cache and never into the process.

Checks at open (each failure raises :class:`CorruptFile` with the reason): the file holds the
8-byte length; the header fits in the file and in 100 MB; it is a UTF-8 JSON object; every entry
has a string ``dtype``, a ``shape`` of non-negative integers and two ``data_offsets``; the
entries, ordered by offset, tile the data section exactly (no gap, no overlap, nothing after the
last one); each entry's size is its shape times its dtype's size.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

MAX_HEADER = 100_000_000  # bytes: safetensors' own limit
METADATA = "__metadata__"

# safetensors dtype tags -> torch dtypes (F8 types only where this torch has them).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _tag, _name in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _name):
        DTYPES[_tag] = getattr(torch, _name)


class CorruptFile(ValueError):
    """The file is not a valid safetensors file (truncated, or a bad header); says why."""


@dataclass(frozen=True)
class Entry:
    """One tensor of the file: its dtype tag, shape and absolute byte range ``[begin, end)``."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsFile:
    """A safetensors file opened for positioned reads (header parsed and checked at open).

    Args:
        path: The file.

    Raises:
        OSError: The file cannot be opened.
        CorruptFile: The header is missing, truncated or inconsistent (see the module docstring).

    Example:
        >>> f = SafetensorsFile("model.safetensors")  # doctest: +SKIP
        >>> f.read("lm_head.weight").shape  # doctest: +SKIP
        torch.Size([128, 32])
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._file: BinaryIO | None = open(self.path, "rb")  # noqa: SIM115 - held until close()
        self._lock = threading.Lock()  # for the seek + readinto fallback without os.preadv
        try:
            self.entries = _parse(self._file, os.fstat(self._file.fileno()).st_size)
        except BaseException:
            self.close()
            raise

    def keys(self) -> list[str]:
        """Tensor names in header order."""
        return list(self.entries)

    def read(self, key: str) -> Tensor:
        """Read tensor ``key`` into a new CPU tensor of its dtype and shape.

        Raises:
            KeyError: No such tensor.
            ValueError: Its dtype tag has no torch dtype here.
            CorruptFile: The file ended before the tensor (it shrank after open).
            OSError: The read failed.
        """
        entry = self.entries[key]
        if entry.dtype not in DTYPES:
            raise ValueError(f"dtype {entry.dtype} has no torch equivalent here")
        dtype = DTYPES[entry.dtype]
        buf = torch.empty(entry.end - entry.begin, dtype=torch.uint8)
        self._read_into(buf, entry.begin)
        if sys.byteorder == "big" and dtype.itemsize > 1:  # the file is little-endian
            buf = buf.view(-1, dtype.itemsize).flip(1).contiguous().view(-1)
        return buf.view(dtype).reshape(entry.shape)

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __del__(self) -> None:
        if getattr(self, "_file", None) is not None:
            self.close()

    def _read_into(self, buf: Tensor, offset: int) -> None:
        if self._file is None:
            raise ValueError(f"{self.path} is closed")
        view = memoryview(buf.numpy()).cast("B")
        done = 0
        while done < len(view):
            if hasattr(os, "preadv"):
                got = os.preadv(self._file.fileno(), [view[done:]], offset + done)
            else:
                with self._lock:
                    self._file.seek(offset + done)
                    got = self._file.readinto(view[done:]) or 0
            if got <= 0:
                raise CorruptFile(f"the file ends at byte {offset + done}, inside a tensor")
            done += got


def _parse(file: BinaryIO, size: int) -> dict[str, Entry]:
    """Read and check the header; the entries with absolute offsets, in header order."""
    head = file.read(8)
    if len(head) < 8:
        raise CorruptFile(f"the file has {size} bytes, fewer than the 8-byte header length")
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER:
        raise CorruptFile(f"header length {n} exceeds safetensors' limit of {MAX_HEADER} bytes")
    if 8 + n > size:
        raise CorruptFile(f"header length {n} runs past the end of the {size}-byte file")
    raw = file.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptFile(f"the header is not UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise CorruptFile("the header is not a JSON object")
    entries = {key: _entry(key, info) for key, info in header.items() if key != METADATA}
    _check_metadata(header.get(METADATA))
    _check_layout(entries, size - 8 - n)
    start = 8 + n
    return {k: Entry(e.dtype, e.shape, start + e.begin, start + e.end) for k, e in entries.items()}


def _entry(key: str, info: Any) -> Entry:
    """One header entry, its types checked (offsets still relative to the data section)."""
    ok = isinstance(info, dict) and isinstance(info.get("dtype"), str)
    shape, offsets = (info.get("shape"), info.get("data_offsets")) if ok else (None, None)
    ok = ok and _naturals(shape) and _naturals(offsets) and len(offsets) == 2
    if not ok:
        raise CorruptFile(
            f"header entry '{key}' is not {{dtype: string, shape: [int], data_offsets: [int, int]}}"
        )
    return Entry(info["dtype"], tuple(shape), offsets[0], offsets[1])


def _naturals(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


def _check_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptFile("the header's __metadata__ is not an object of strings")


def _check_layout(entries: dict[str, Entry], data_bytes: int) -> None:
    """The entries tile ``[0, data_bytes)`` in offset order, each as large as its shape says."""
    end = 0
    for key, e in sorted(entries.items(), key=lambda item: item[1].begin):
        if e.begin != end or e.end < e.begin:
            raise CorruptFile(
                f"tensor '{key}' has data offsets [{e.begin}, {e.end}]; the previous tensor "
                f"ends at {end}"
            )
        if e.dtype in DTYPES:
            numel = 1
            for d in e.shape:
                numel *= d
            if numel * DTYPES[e.dtype].itemsize != e.end - e.begin:
                raise CorruptFile(
                    f"tensor '{key}' of shape {list(e.shape)} and dtype {e.dtype} has "
                    f"{e.end - e.begin} bytes of data"
                )
        end = e.end
    if end != data_bytes:
        raise CorruptFile(
            f"the tensors' data ends at byte {end} of a {data_bytes}-byte data section"
        )
