"""One results JSON per evaluation run; its summary part is a contract (DESIGN.md).

::

    {"suite": "demo-minilm", "model": "...", "seed": 0, "versions": {...}, "config": {...},
     "tasks": {"news": {"metric": "accuracy", "n": 300}},
     "rows": [{"name": "base", "scores": {"news": 0.93}, "normalized": 96.9, "ci": [...]},
              {"name": "individual", "scores": {"news": 0.96}},
              {"name": "star", "method": "star", "parameters": {"eta": 40},
               "scores": {"news": 0.95}, "normalized": 98.9, "ci": [97.1, 100.4]}],
     "predictions": {"star": {"news": [{"index": 0, "pred": "1", "gold": "1", ...}]}},
     "created": "2025-01-01T00:00:00+00:00", "git": "abc123..." | null}

``normalized`` and ``ci`` are computed for every row except ``individual``, relative to the
``individual`` row (see :mod:`starmerge.eval.metrics`); they are ``null`` when a row has no
individual reference or no per-example data. Scores are fractions (0..1), normalized and CI are
percentages.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from starmerge.errors import InputError, StarmergeError, short_repr
from starmerge.eval.metrics import TaskSample, bootstrap_ci, normalized_score

INDIVIDUAL = "individual"


def library_versions() -> dict[str, str | None]:
    """Versions of python, torch, transformers, peft and starmerge (None: not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "starmerge"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@functools.lru_cache(maxsize=1)
def git_hash() -> str | None:
    """The commit of the starmerge checkout, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


@dataclass
class Results:
    """Builder of one run's results file.

    Args:
        suite: Suite name (``demo-minilm``, ``flan-t5-glue``).
        model: The base model's name or path.
        seed: The run's seed (also seeds the bootstrap).
        config: The resolved run configuration (hashed into the file name).
        tasks: Task name -> ``{"metric": str, "n": int, ...}``; or use :meth:`add_task`.
        n_boot: Bootstrap resamples for each CI.

    Example:
        >>> res = Results("demo", "tiny", tasks={"a": {"metric": "accuracy", "n": 2}})
        >>> res.add_row("individual", {"a": 1.0})
        >>> res.add_row("base", {"a": 0.5}, correct={"a": [1, 0]})
        >>> res.to_json()["rows"][1]["normalized"]
        50.0
    """

    suite: str
    model: str
    seed: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    n_boot: int = 1000
    versions: dict[str, str | None] = field(default_factory=library_versions)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    _rows: list[dict[str, Any]] = field(default_factory=list, init=False, repr=False)

    def add_task(self, name: str, metric: str, n: int, **extra: Any) -> None:
        """Declare a task (its metric, number of examples, optional ``version``...)."""
        self.tasks[name] = {"metric": metric, "n": int(n), **extra}

    def add_row(
        self,
        name: str,
        scores: Mapping[str, float],
        method: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        predictions: Mapping[str, list[dict[str, Any]]] | None = None,
        correct: Mapping[str, TaskSample] | None = None,
    ) -> None:
        """Add one evaluated model.

        Args:
            name: Unique row name: ``base``, ``individual``, or a merge (``star``).
            scores: Task -> metric value (fraction).
            method: The merge method's registry name, for merged rows.
            parameters: The method's hyperparameters.
            predictions: Task -> per-example dicts, stored under ``predictions[name]``.
            correct: Task -> per-example 0/1, or ``(metric, preds, golds)``, for the CI.

        Raises:
            ValueError: A duplicate row name, or a task that was not declared.
        """
        if any(r["name"] == name for r in self._rows):
            raise ValueError(f"row {name!r} is already in the results")
        unknown = [t for t in scores if t not in self.tasks]
        if unknown:
            raise ValueError(
                f"row {name!r}: task(s) {', '.join(unknown)} not declared; call "
                f"add_task(name, metric, n) first (declared: {', '.join(self.tasks) or 'none'})"
            )
        row = {"name": name, "method": method, "parameters": dict(parameters or {})}
        row.update(scores={t: float(s) for t, s in scores.items()}, correct=correct)
        self._rows.append({**row, "predictions": dict(predictions or {})})

    def add_eval(self, name: str, results: Mapping[str, Any], **kwargs: Any) -> None:
        """Add a row from :func:`~starmerge.eval.runner.evaluate` output (declares its tasks).

        ``kwargs`` are ``method`` and ``parameters`` as in :meth:`add_row`.
        """
        for task, res in results.items():
            if task not in self.tasks:
                self.add_task(task, res.metric, res.n)
        scores = {t: r.score for t, r in results.items()}
        predictions = {t: r.predictions for t, r in results.items()}
        correct = {t: r.samples() for t, r in results.items()}
        self.add_row(name, scores, predictions=predictions, correct=correct, **kwargs)

    def _summary_row(self, row: dict[str, Any], individual: Mapping[str, float] | None):
        out: dict[str, Any] = {"name": row["name"]}
        if row["method"] is not None:
            out.update(method=row["method"], parameters=row["parameters"])
        out["scores"] = row["scores"]
        if row["name"] == INDIVIDUAL or individual is None:
            return out
        try:
            out["normalized"] = normalized_score(row["scores"], individual)
        except StarmergeError as err:  # keep the run; say why the column is empty
            return {**out, "normalized": None, "ci": None, "note": str(err)}
        samples = row["correct"] or {}
        if row["scores"] and all(t in samples for t in row["scores"]):
            picked = {t: samples[t] for t in row["scores"]}
            lo, hi = bootstrap_ci(picked, individual, n_boot=self.n_boot, seed=self.seed)
            out["ci"] = [lo, hi]
        else:
            out["ci"] = None
        return out

    def to_json(self) -> dict[str, Any]:
        """The results file's content (summary, predictions and provenance)."""
        ref = next((r["scores"] for r in self._rows if r["name"] == INDIVIDUAL), None)
        return {
            "suite": self.suite,
            "model": self.model,
            "seed": self.seed,
            "versions": dict(self.versions),
            "config": self.config,
            "tasks": self.tasks,
            "rows": [self._summary_row(r, ref) for r in self._rows],
            "predictions": {r["name"]: r["predictions"] for r in self._rows if r["predictions"]},
            "created": self.created,
            "git": git_hash(),
        }

    def run_id(self) -> str:
        """12 hex digits hashing what defines the run (not its scores).

        That is: suite, model, seed, config, tasks, and each row's name, method and parameters.
        """
        rows = [[r["name"], r["method"], r["parameters"]] for r in self._rows]
        key = [self.suite, self.model, self.seed, self.config, self.tasks, rows]
        blob = json.dumps(key, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def write(self, results_dir: str | Path, name: str | None = None) -> Path:
        """Write ``<name or suite>-<run_id>.json`` atomically and return its path.

        The same run definition gives the same file (a re-run replaces itself); a different
        one gives a different file, so runs never overwrite each other.
        """
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", name or self.suite).strip("-") or "results"
        path = Path(results_dir) / f"{stem}-{self.run_id()}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_json(), indent=1, default=str) + "\n")
        os.replace(tmp, path)
        return path


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _row_problems(i: int, row: Any, tasks: Mapping[str, Any]) -> list[str]:
    if not isinstance(row, dict) or not isinstance(row.get("name"), str):
        return [f"rows[{i}] must be an object with a string 'name'"]
    where, problems = f"row {short_repr(row['name'])}", []
    scores = row.get("scores")
    if not isinstance(scores, dict) or not all(_is_num(v) for v in scores.values()):
        problems.append(f"{where}: 'scores' must map task names to numbers")
    elif isinstance(tasks, dict) and (extra := [t for t in scores if t not in tasks]):
        problems.append(f"{where}: scores for undeclared task(s) {', '.join(extra)}")
    if row.get("normalized") is not None and not _is_num(row["normalized"]):
        problems.append(f"{where}: 'normalized' must be a number or null")
    ci = row.get("ci")
    if ci is not None and not (isinstance(ci, list) and len(ci) == 2 and all(map(_is_num, ci))):
        problems.append(f"{where}: 'ci' must be [lo, hi] or null, got {short_repr(ci)}")
    if row.get("parameters") is not None and not isinstance(row["parameters"], dict):
        problems.append(f"{where}: 'parameters' must be an object")
    return problems


def validate_results(data: Any) -> list[str]:
    """Every problem with a results dict's summary part (empty when valid)."""
    if not isinstance(data, dict):
        return [f"the top level must be an object, got {type(data).__name__}"]
    kinds = {"suite": str, "model": str, "seed": int, "versions": dict, "config": dict}
    problems = [
        f"'{key}' must be {kind.__name__}, got {short_repr(data.get(key))}"
        for key, kind in {**kinds, "tasks": dict, "rows": list}.items()
        if not isinstance(data.get(key), kind)
    ]
    tasks = data.get("tasks")
    for name, spec in (tasks or {}).items() if isinstance(tasks, dict) else ():
        if not (
            isinstance(spec, dict)
            and isinstance(spec.get("metric"), str)
            and isinstance(spec.get("n"), int)
        ):
            got = short_repr(spec)
            problems.append(f"tasks[{name!r}] must be {{'metric': str, 'n': int}}, got {got}")
    rows = data.get("rows") if isinstance(data.get("rows"), list) else []
    for i, row in enumerate(rows):
        problems += _row_problems(i, row, tasks or {})
    names = [r["name"] for r in rows if isinstance(r, dict) and isinstance(r.get("name"), str)]
    if len(set(names)) != len(names):
        problems.append(f"row names must be unique, got {short_repr(names)}")
    return problems


def load_results(path: str | Path) -> dict[str, Any]:
    """Read and validate a results file.

    Raises:
        InputError: The file is missing, not JSON, or its summary breaks the schema (every
            problem listed).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise InputError(f"results file {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise InputError(
            f"results file {path} is a directory; give the JSON files in it ({path}/*.json)"
        ) from None
    except OSError as err:
        raise InputError(f"cannot read results file {path} ({err.strerror}); check it") from None
    except UnicodeDecodeError as err:
        raise InputError(
            f"results file {path} is not UTF-8 text (byte offset {err.start}), so not a "
            "results JSON; give a file written by starmerge eval, sweep or demo"
        ) from None
    except json.JSONDecodeError as err:
        raise InputError(
            f"results file {path} is not valid JSON ({err}); give a file written by starmerge"
        ) from None
    except RecursionError:
        raise InputError(
            f"results file {path} nests JSON too deeply to be a results file; give a file "
            "written by starmerge"
        ) from None
    problems = validate_results(data)
    if problems:
        raise InputError(f"{path} is not a starmerge results file: {'; '.join(problems)}")
    return data
