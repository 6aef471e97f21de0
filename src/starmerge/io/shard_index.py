"""Shard indexes (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``).

The ``weight_map`` names the shard of every tensor. Its names are checked before any shard is
opened: each must be a plain file name next to the index, and a symlinked shard must stay in
the model directory (or, in a Hugging Face cache snapshot, in that repo's ``blobs/``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from starmerge.errors import InputError, short_repr

_FIX = "re-download or re-save it"


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
        if not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("a weight_map value is not a file name")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(
            f"shard index {index} is not a valid index (no readable weight_map: {e}); {_FIX}"
        ) from None
    return weight_map


def shard_files(index: Path) -> list[Path]:
    """The shard files a shard index lists, each checked to lie in the model directory and exist.

    Raises:
        InputError: The index is unreadable, names a path outside the model directory (checked
            before any shard is opened), or a shard is missing.
    """
    names = list(dict.fromkeys(_read_index(index).values()))
    for name in names:  # every name is checked before any shard is opened
        _check_shard_name(index, name)
    shards = [index.parent / name for name in names]
    for shard in shards:
        if not shard.is_file():
            raise InputError(
                f"shard {shard.name} listed in {index} is missing; re-download the checkpoint "
                "with all its shards"
            )
    return shards


def _check_shard_name(index: Path, name: str) -> None:
    """A weight_map entry must name a file next to the index that stays in the model directory."""
    if name in ("", ".", "..") or "/" in name or "\\" in name or os.path.isabs(name):
        raise InputError(
            f"shard index {index} lists shard {short_repr(name, 300)}, which is not a file name in "
            "the model directory; a weight_map may only name shard files next to its index, "
            f"{_FIX}"
        )
    path = index.parent / name
    if path.is_symlink():
        target = path.resolve()
        if not any(root in target.parents for root in _roots(index)):
            raise InputError(
                f"shard {name} listed in {index} is a symlink to {target}, outside the model "
                f"directory; copy the shard into the model directory or {_FIX}"
            )


def _roots(index: Path) -> list[Path]:
    """Where shards may lie: the model directory; in a Hugging Face cache snapshot, its blobs."""
    model_dir = index.parent.resolve()
    roots = [model_dir]
    if index.parent.parent.name == "snapshots":  # <repo>/snapshots/<rev>/ -> <repo>/blobs/
        roots.append((index.parent.parent.parent / "blobs").resolve())
    return roots


def check_weight_map(index: Path, meta: Mapping[str, tuple[Any, Any, Path]]) -> None:
    """Every key a shard index lists must be in the shard it names.

    ``meta`` maps each tensor key to (shape, dtype, file), as ``TensorIndex`` indexes it.

    Raises:
        InputError: A listed key is missing or lies in another shard.
    """
    for key, shard in _read_index(index).items():
        if key not in meta or meta[key][2].name != shard:
            raise InputError(
                f"tensor '{key}' listed in {index} is not in shard {shard}; the shards do not "
                f"match their index, {_FIX}"
            )
