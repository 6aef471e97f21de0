"""The results store: one JSON file per finished job, named by its key, written atomically.

``<root>/jobs/<key>.json`` holds the job, the options, per-task scores and per-example
predictions. A file is written to a temporary name and renamed, so a killed sweep leaves either
a complete result or none; a restarted sweep skips every key that has a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from starmerge.errors import InputError


class ResultsStore:
    """Job records under ``root/jobs``.

    Example:
        >>> store = ResultsStore("results/sweep")  # doctest: +SKIP
        >>> store.has("3f2a...")  # doctest: +SKIP
        False
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.dir = self.root / "jobs"

    def path(self, key: str) -> Path:
        """Where the record of ``key`` lives."""
        return self.dir / f"{key}.json"

    def has(self, key: str) -> bool:
        """Whether job ``key`` has finished."""
        return self.path(key).is_file()

    def get(self, key: str) -> dict[str, Any]:
        """The record of ``key``.

        Raises:
            InputError: It is missing or not valid JSON.
        """
        path = self.path(key)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"no result for job {key} in {self.dir}") from None
        except ValueError as err:  # not UTF-8, or not JSON
            raise InputError(
                f"{path} is not valid JSON ({err}); delete it to re-run the job"
            ) from None

    def put(self, record: dict[str, Any]) -> Path:
        """Write ``record`` (it carries its ``key``) atomically; return its path."""
        path = self.path(record["key"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
        os.replace(tmp, path)
        return path

    def keys(self) -> list[str]:
        """Keys of every finished job."""
        return sorted(p.stem for p in self.dir.glob("*.json")) if self.dir.is_dir() else []

    def records(self) -> Iterator[dict[str, Any]]:
        """Every finished job's record."""
        for key in self.keys():
            yield self.get(key)
