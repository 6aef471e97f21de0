"""The on-disk statistics cache: one directory per (models, task data, settings) hash.

An entry is ``<cache_dir>/<sha256 of the key>/`` with ``index.json`` (``weight_map``: tensor name
-> part file; ``meta``: what was collected and how it was normalised) and
``part-NNNNN.safetensors`` files, one per group the collector streamed. It is written to a
temporary directory and renamed into place, so a half-written entry is never reused. Read it with
:class:`starmerge.io.statistics.StatsFile`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from starmerge.io.statistics import INDEX

FORMAT = "starmerge-stats/1"


def default_cache_dir() -> Path:
    """``$STARMERGE_CACHE/stats``, else ``~/.cache/starmerge/stats``."""
    root = os.environ.get("STARMERGE_CACHE")
    return Path(root) / "stats" if root else Path.home() / ".cache" / "starmerge" / "stats"


def cache_key(fields: Mapping[str, Any]) -> str:
    """The sha256 of ``fields`` as canonical JSON (sorted keys).

    Example:
        >>> cache_key({"n": 8}) == cache_key({"n": 8})
        True
    """
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def entry_path(cache_dir: Path, key: str) -> Path | None:
    """The finished cache entry for ``key``, or None when there is none."""
    path = Path(cache_dir) / key
    return path if (path / INDEX).is_file() else None


class StatsWriter:
    """Write statistics group by group into a new cache entry (a ``collect_statistics`` sink).

    Args:
        cache_dir: The cache root.
        key: The entry's hash (:func:`cache_key`).
        meta: JSON-able description stored in ``index.json``.

    Example:
        >>> with StatsWriter(tmp, "abc", {"kinds": ["gram_in"]}) as w:  # doctest: +SKIP
        ...     w({"fc::gram_in": g})
    """

    def __init__(self, cache_dir: Path, key: str, meta: Mapping[str, Any]):
        self.final = Path(cache_dir) / key
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=cache_dir))
        self.meta = dict(meta)
        self.weight_map: dict[str, str] = {}

    def __call__(self, tensors: Mapping[str, Tensor]) -> None:
        """Write one group as the next part file."""
        if not tensors:
            return
        name = f"part-{len(set(self.weight_map.values())):05d}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, self.tmp / name)
        self.weight_map.update({k: name for k in tensors})

    def close(self) -> Path:
        """Write ``index.json`` and move the entry into place; return its path."""
        index = {"format": FORMAT, "meta": self.meta, "weight_map": self.weight_map}
        (self.tmp / INDEX).write_text(json.dumps(index, indent=1, default=str) + "\n")
        if self.final.exists():  # written meanwhile by another run: keep that one
            shutil.rmtree(self.tmp, ignore_errors=True)
            return self.final
        try:
            os.replace(self.tmp, self.final)
        except OSError:  # another process (a Ray worker) renamed its copy in just before
            if not (self.final / INDEX).is_file():
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)
        return self.final

    def abort(self) -> None:
        """Remove the partial entry."""
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> StatsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
