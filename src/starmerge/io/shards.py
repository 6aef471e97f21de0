"""Write safetensors shards tensor by tensor, with the layout planned from shapes up front.

A safetensors file is an 8-byte little-endian header length, a JSON header of
``{name: {dtype, shape, data_offsets}}`` and the raw data. Since every output shape and dtype is
known before the merge (from the base's headers), the header of each shard can be written first
and each tensor streamed into place as soon as it is merged: no shard-sized buffer, peak memory
one tensor.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from starmerge.errors import InputError
from starmerge.io.output_dir import write_guard

_DTYPE_CODES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: name, shape and dtype, known before any data is produced."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(tensors: Sequence[TensorPlan], max_shard_size: int) -> list[list[TensorPlan]]:
    """Split tensors, in order, into shards of at most ``max_shard_size`` bytes.

    A tensor bigger than ``max_shard_size`` gets a shard of its own.
    """
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


class StreamingShardWriter:
    """Writes planned tensors in order into one or several safetensors files.

    Args:
        directory: Where to write (a temporary directory that the caller renames into place).
        tensors: Every tensor to be written, in the order ``write`` will receive them.
        max_shard_size: Bytes per shard.

    Example:
        >>> plans = [TensorPlan("w", (2, 2), torch.float32)]
        >>> w = StreamingShardWriter(tmp, plans, 5 << 30)  # doctest: +SKIP
        >>> w.write("w", torch.zeros(2, 2)); files = w.close()  # doctest: +SKIP
    """

    def __init__(
        self,
        directory: Path,
        tensors: Sequence[TensorPlan],
        max_shard_size: int,
        *,
        prefix: str = "model",
    ):
        self.directory = Path(directory)
        self.prefix = prefix
        self.shards = plan_shards(tensors, max_shard_size)
        n = len(self.shards)
        self.names = (
            [f"{prefix}.safetensors"]
            if n == 1
            else [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._queue = [(i, t) for i, shard in enumerate(self.shards) for t in shard]
        self._pos = 0
        self._file: BinaryIO | None = None
        self._shard = -1

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor (cast to its planned dtype)."""
        if self._pos >= len(self._queue):
            raise RuntimeError(f"unplanned tensor {key!r}: every planned tensor was written")
        shard, plan = self._queue[self._pos]
        if key != plan.key or tuple(tensor.shape) != plan.shape:
            raise RuntimeError(f"expected {plan.key} {plan.shape}, got {key} {tuple(tensor.shape)}")
        if shard != self._shard:
            self._open(shard)
        data = tensor.detach().to("cpu", plan.dtype).contiguous().reshape(-1)
        self._guarded(lambda: self._file.write(memoryview(data.view(torch.uint8).numpy())))
        self._pos += 1

    def close(self) -> list[Path]:
        """Finish the last shard, write the index when sharded; return the files."""
        if self._pos != len(self._queue):
            missing = self._queue[self._pos][1].key
            raise RuntimeError(f"writer closed before {missing} was written")
        if self._file is None and self._queue == []:
            self._open(0)
        if self._file is not None:
            self._guarded(self._file.close)
            self._file = None
        if len(self.shards) > 1:
            self._write_index()
        return [self.directory / n for n in self.names]

    def _open(self, shard: int) -> None:
        if self._file is not None:
            self._guarded(self._file.close)
        self._shard = shard
        with write_guard(self.directory / self.names[shard]):
            self._file = open(self.directory / self.names[shard], "wb")  # noqa: SIM115  closed in close
            self._file.write(_header(self.shards[shard]))

    def _write_index(self) -> None:
        weight_map = {t.key: self.names[i] for i, s in enumerate(self.shards) for t in s}
        total = sum(t.nbytes for s in self.shards for t in s)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        path = self.directory / f"{self.prefix}.safetensors.index.json"
        with write_guard(path):
            path.write_text(json.dumps(index, indent=2) + "\n")

    def _guarded(self, action) -> None:
        """Run a write to the current file; disk full and other write errors -> OutputError."""
        with write_guard(self.directory / self.names[max(self._shard, 0)]):
            action()


def _header(tensors: Sequence[TensorPlan]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        if t.dtype not in _DTYPE_CODES:
            raise InputError(f"cannot write {t.key}: dtype {t.dtype} has no safetensors code")
        header[t.key] = {
            "dtype": _DTYPE_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw
