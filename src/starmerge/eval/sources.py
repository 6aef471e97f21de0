"""A task's rows: read from a local file, a hub dataset or a function, then sampled (seeded).

Heavy readers are imported only when used: ``datasets`` for hub sources, ``pyarrow`` for
parquet files. A missing file or package raises :class:`~starmerge.errors.StarmergeError`
naming it and the command that installs it.
"""

from __future__ import annotations

import csv
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from starmerge.errors import StarmergeError

FORMATS = ("json", "jsonl", "csv", "parquet")


@dataclass(frozen=True)
class Source:
    """Where a task's rows come from (``path``: file, hub id, or ``module:function``)."""

    type: str
    path: str
    config: str | None = None
    split: str | None = None
    format: str | None = None
    base_dir: Path | None = None  # the directory a relative local path is resolved against


@dataclass(frozen=True)
class Sampling:
    """Seeded subset: at most ``n`` rows; ``balance``: equally many rows per label."""

    n: int | None = None
    seed: int = 0
    balance: bool = False


def _missing(task: str, what: str, fix: str) -> StarmergeError:
    return StarmergeError(f"task {task!r}: {what}; {fix}")


def _read_local(path: Path, fmt: str, task: str) -> list[dict[str, Any]]:
    if fmt == "csv":
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    if fmt == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise _missing(task, f"reading {path} needs pyarrow", "pip install pyarrow") from None
        return pq.read_table(path).to_pylist()
    text = path.read_text()
    try:  # a .json file may hold JSON lines (what datasets' to_json writes)
        data = json.loads(text) if fmt == "json" else None
    except json.JSONDecodeError:
        data = None
    if data is None:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):  # columns
        rows = zip(*data.values(), strict=True)
        return [dict(zip(data, values, strict=True)) for values in rows]
    if not isinstance(data, list):
        raise _missing(task, f"{path} holds a {type(data).__name__}", "store a list of records")
    return data


def _read_hub(source: Source, task: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise _missing(
            task,
            f"loading {source.path!r} from the Hugging Face hub needs the datasets package",
            "pip install 'starmerge[eval]' (or pip install datasets)",
        ) from None
    if source.split is None:
        raise _missing(task, f"hub source {source.path!r} has no split", "set source.split")
    args = (source.path, source.config) if source.config else (source.path,)
    ds = datasets.load_dataset(*args, split=source.split)
    return ds.to_list() if hasattr(ds, "to_list") else [dict(r) for r in ds]


def _read_python(source: Source, task: str) -> list[dict[str, Any]]:
    module, _, attr = source.path.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise _missing(
            task,
            f"cannot import source.path {source.path!r} ({err})",
            "install the package that provides it or fix 'module:function'",
        ) from None
    kwargs = {k: v for k, v in (("split", source.split), ("config", source.config)) if v}
    return [dict(r) for r in fn(**kwargs)]


def load_rows(source: Source, task: str = "?") -> list[dict[str, Any]]:
    """All rows of a task's source as dicts (local file, hub dataset, or python function).

    A python source is ``module:function``, called with ``split=`` and ``config=`` when set.

    Raises:
        StarmergeError: The file, the package or the function is missing, or the file cannot
            be read in its format.
    """
    if source.type == "hub":
        return _read_hub(source, task)
    if source.type == "python":
        return _read_python(source, task)
    path = Path(source.path)
    if not path.is_absolute() and source.base_dir is not None:
        path = Path(source.base_dir) / path
    if not path.exists():
        raise _missing(
            task,
            f"data file {path} does not exist (source.path {source.path!r})",
            "create it, or fix source.path (relative paths start at the task file)",
        )
    fmt = source.format or path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise _missing(task, f"cannot tell the format of {path}", "set source.format")
    try:
        return _read_local(path, fmt, task)
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as exc:  # JSONDecodeError too
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise _missing(
            task, f"cannot read data file {path} as {fmt} ({first})", "save it as UTF-8 " + fmt
        ) from None


def sample_indices(n_rows: int, sampling: Sampling, labels: list[str] | None) -> list[int]:
    """Seeded row indices, in source order.

    Uniform: at most ``n`` rows. Balanced: ``k = min(n // n_labels, smallest label count)``
    rows of every label (so fewer than ``n`` when a label is rare, as the seed code's "capped").

    Example:
        >>> len(sample_indices(6, Sampling(n=4, seed=0, balance=True), list("abbbbb")))
        2
    """
    rng = np.random.default_rng(sampling.seed)
    if not sampling.balance:
        n = n_rows if sampling.n is None else min(sampling.n, n_rows)
        return sorted(rng.permutation(n_rows)[:n].tolist())
    if labels is None:
        raise StarmergeError("sampling.balance needs label_column")
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(labels):
        groups.setdefault(key, []).append(i)
    k = min(len(g) for g in groups.values())
    if sampling.n is not None:
        k = min(k, sampling.n // len(groups))
    if k == 0:
        raise StarmergeError(f"balanced sampling: n={sampling.n} is below the {len(groups)} labels")
    picked = [i for key in sorted(groups) for i in rng.choice(groups[key], k, replace=False)]
    return sorted(int(i) for i in picked)
