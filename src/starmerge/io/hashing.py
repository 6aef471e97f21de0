"""Streamed sha256 of input files, for the run manifest."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

_CHUNK = 1 << 20  # 1 MiB


def sha256_file(path: Path | str) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks into one reused buffer (constant memory).

    The merge hashes its inputs in a thread beside its own work: a fresh 1 MiB ``bytes`` per
    chunk would be a fresh mapping under ``memory.bounded_allocator``, faulted in and unmapped
    again, contending with the merge for the process's address space.

    Example:
        >>> sha256_file("/dev/null")
        'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'
    """
    digest = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while got := f.readinto(buf):
            digest.update(view[:got])
    return digest.hexdigest()


def hash_files(paths: Iterable[Path | str]) -> dict[str, str]:
    """Map each path (as given, as a string) to its sha256, in order.

    Example:
        >>> hash_files(["/dev/null"])["/dev/null"][:8]
        'e3b0c442'
    """
    return {str(p): sha256_file(p) for p in paths}
