"""Streamed sha256 of input files, for the run manifest."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

_CHUNK = 1 << 20  # 1 MiB


def sha256_file(path: Path | str) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks (constant memory).

    Example:
        >>> sha256_file("/dev/null")
        'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(paths: Iterable[Path | str]) -> dict[str, str]:
    """Map each path (as given, as a string) to its sha256, in order.

    Example:
        >>> hash_files(["/dev/null"])["/dev/null"][:8]
        'e3b0c442'
    """
    return {str(p): sha256_file(p) for p in paths}
