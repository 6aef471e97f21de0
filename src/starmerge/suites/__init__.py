"""Benchmark suites: a base model, one task file and one task model per task, the seed numbers.

A suite is data: ``suites/<dir>/suite.yaml`` names the base model (hub id or path), how to load it
(``model_class``: ``seq2seq`` or ``causal``; chat template and its pinned variables), and per task
the eval task file (harness YAML next to it) and the task model: a PEFT ``adapter`` or a full
fine-tuned ``model`` (task vector = model - base). ``train`` (per task, over a suite-wide default)
says where the data-driven methods draw training examples (``starmerge.suites.training``).
``seed_tables`` hold the STAR seed README's published numbers for a task set, so a reproduction
can print them beside its own.

A suite file may ``include:`` another suite (a built-in name or a path) and override keys: that is
how a run points a built-in suite at local copies of the models::

    include: flan-t5-large
    base_model: /models/flan-t5-large
    tasks:
      mnli: {adapter: /adapters/mnli}

Example:
    >>> suite = load_suite("flan-t5-large")
    >>> suite.tasks["mnli"].adapter
    'tanganke/flan-t5-large_glue-mnli_lora-16'
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from starmerge.errors import ConfigError, UnknownNameError, did_you_mean
from starmerge.eval.tasks import load_task
from starmerge.suites.suite_file import TRAIN_KEYS, check_suite
from starmerge.yaml_io import load_yaml

SUITES_DIR = Path(__file__).parent


@dataclass(frozen=True)
class SuiteTask:
    """One task of a suite: its eval task file and its fine-tuned task model.

    Args:
        name: The task's name in the suite (the results' task key).
        file: The harness task YAML.
        adapter: A PEFT LoRA adapter (hub id or path), or None.
        model: A full fine-tuned checkpoint (hub id or path), or None.
        data_mb: Approximate download size of its dataset in MB (for ``--dry-run``).
        train: Where the data-driven methods draw this task's training examples: overrides of
            the task file's ``source`` (``path``, ``config``, ``split``), ``revision`` and
            ``metadata.transform`` (the suite's ``train:`` merged with the task's); None when
            the suite declares none. Rows the evaluation uses are never drawn.
    """

    name: str
    file: Path
    adapter: str | None = None
    model: str | None = None
    data_mb: float | None = None
    train: dict[str, Any] | None = None

    @property
    def source(self) -> str:
        """The task model's hub id or path."""
        return self.adapter or self.model or ""

    def spec(self) -> Any:
        """The validated harness ``TaskSpec`` (named after the suite task; cached per file)."""
        return _load_spec(self.file, self.name, self.file.stat().st_mtime_ns)


@dataclass(frozen=True)
class SeedTable:
    """Published numbers for one task set: row name -> ``{"normalized", "scores"}`` (x100)."""

    name: str
    tasks: tuple[str, ...]
    rows: dict[str, dict[str, Any]]
    note: str = ""


@dataclass(frozen=True)
class Suite:
    """A validated suite; build with :func:`load_suite`."""

    name: str
    base_model: str
    model_class: str
    tasks: dict[str, SuiteTask]
    path: Path
    version: int = 1
    description: str = ""
    dtype: str = "float32"
    batch_size: int = 8
    chat_template: bool = False
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    seed_tables: tuple[SeedTable, ...] = ()

    def task(self, name: str) -> SuiteTask:
        """The task ``name``, with a did-you-mean error when it is not in the suite."""
        if name not in self.tasks:
            hint = did_you_mean(name, self.tasks)
            raise UnknownNameError(
                f"suite {self.name!r} has no task {name!r}.{hint} Tasks: {', '.join(self.tasks)}"
            )
        return self.tasks[name]

    def fingerprint(self, tasks: list[str] | tuple[str, ...]) -> dict[str, Any]:
        """What defines results on ``tasks``: model, loading, task models and task files."""
        per_task = {
            t: {
                "adapter": self.task(t).adapter,
                "model": self.task(t).model,
                "spec": spec_hash(self.task(t).spec()),
            }
            for t in sorted(tasks)
        }
        return {
            "suite": self.name,
            "version": self.version,
            "base_model": self.base_model,
            "model_class": self.model_class,
            "chat_template": self.chat_template,
            "template_kwargs": self.template_kwargs,
            "tasks": per_task,
        }


@functools.lru_cache(maxsize=512)
def _load_spec(file: Path, name: str, mtime_ns: int) -> Any:
    return replace(load_task(file), name=name)


def spec_hash(spec: Any) -> str:
    """16 hex digits hashing a ``TaskSpec``'s content (not where its files lie)."""
    data = asdict(spec)
    data["source"].pop("base_dir", None)
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def list_suites() -> dict[str, Path]:
    """Built-in suite names -> their ``suite.yaml``."""
    out = {}
    for path in sorted(SUITES_DIR.glob("*/suite.yaml")):
        data = load_yaml(path, what="suite file") or {}
        out[str(data.get("name", path.parent.name))] = path
    return out


def _find(ref: str | Path) -> Path:
    path = Path(ref)
    if path.is_dir() and (path / "suite.yaml").exists():
        return path / "suite.yaml"
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError([f"suite file {path} does not exist"])
        return path
    builtin = list_suites()
    if str(ref) not in builtin:
        hint = did_you_mean(str(ref), builtin)
        raise UnknownNameError(f"Unknown suite {ref!r}.{hint} Available: {', '.join(builtin)}")
    return builtin[str(ref)]


def _local(value: Any, base: Path) -> Any:
    """A relative path made absolute against the suite file's dir (docs/paths.md).

    ``./x`` and ``../x`` always; any other string only when it exists there, so that Hub ids
    (``org/name``) stay ids.
    """
    if isinstance(value, str) and (value.startswith(("./", "../")) or (base / value).exists()):
        return str((base / value).resolve())
    return value


def _read(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path.resolve() in seen:
        raise ConfigError([f"{path}: include cycle"])
    data = load_yaml(path, what="suite file") or {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: a suite file must be a mapping"])
    base = path.parent
    if "base_model" in data:
        data["base_model"] = _local(data["base_model"], base)
    tasks = data.get("tasks") or {}
    if isinstance(tasks, dict):
        for name, entry in tasks.items():
            if isinstance(entry, dict):
                entry = {k: _local(v, base) for k, v in entry.items()}
                if isinstance(entry.get("file"), str):
                    entry["file"] = str((base / entry["file"]).resolve())
                tasks[name] = entry
    ref = data.pop("include", None)
    if ref is None:
        return data
    parent = _read(_find(_local(ref, base)), (*seen, path.resolve()))
    merged_tasks = dict(parent.get("tasks") or {})
    for name, entry in tasks.items():
        merged_tasks[name] = {**(merged_tasks.get(name) or {}), **(entry or {})}
        if entry and ("adapter" in entry) != ("model" in entry):  # one replaces the other
            merged_tasks[name].pop("model" if "adapter" in entry else "adapter", None)
    return {**parent, **data, "tasks": merged_tasks}


def _train(default: dict[str, Any] | None, entry: dict[str, Any] | None) -> dict | None:
    """The suite's ``train:`` with the task's own keys over it (None when neither has one)."""
    if default is None and entry is None:
        return None
    return {**(default or {}), **(entry or {})}


def load_suite(ref: str | Path) -> Suite:
    """Load a built-in suite by name, or a suite file (or its directory).

    Raises:
        UnknownNameError: Not a built-in name and not a file.
        ConfigError: Every problem in the suite file at once.
    """
    path = _find(ref)
    data = _read(path)
    keys, problems = check_suite(data)
    if problems or keys is None:
        raise ConfigError([f"suite {path}: {p}" for p in problems])
    tasks = {
        str(name): SuiteTask(
            str(name),
            Path(e["file"]),
            e.get("adapter"),
            e.get("model"),
            e.get("data_mb"),
            _train(data.get("train"), e.get("train")),
        )
        for name, e in data["tasks"].items()
    }
    tables = tuple(
        SeedTable(t["name"], tuple(t["tasks"]), dict(t.get("rows") or {}), t.get("note", ""))
        for t in keys.seed_tables
    )
    opts = {k: v for k, v in asdict(keys).items() if k not in ("tasks", "seed_tables", "train")}
    return Suite(**opts, tasks=tasks, path=path.resolve(), seed_tables=tables)


__all__ = [
    "TRAIN_KEYS",
    "SeedTable",
    "Suite",
    "SuiteTask",
    "list_suites",
    "load_suite",
    "spec_hash",
]
