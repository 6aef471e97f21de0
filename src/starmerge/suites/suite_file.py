"""The keys of a suite file, as dataclasses walked by :func:`starmerge.schema.parse_section`.

:func:`check_suite` validates a suite mapping (its ``include:`` chain already merged) and lists
every problem: unknown keys with a did-you-mean, wrong types, a task without its file or
without exactly one task model, seed tables naming unknown tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from starmerge.schema import count, option, parse_section, section_keys

MODEL_CLASSES = ("seq2seq", "causal")


@dataclass(frozen=True)
class TrainKeys:
    """A ``train:`` mapping: overrides of a task's ``source`` and ``metadata.transform``."""

    path: str | None = None
    config: str | None = None
    split: str | None = None
    revision: str | None = None
    transform: str | None = None


#: What a ``train:`` mapping may override in the task's source (see :attr:`SuiteTask.train`).
TRAIN_KEYS = tuple(section_keys(TrainKeys))


@dataclass(frozen=True)
class TaskKeys:
    """One ``tasks.<name>`` entry as written: its task file and exactly one task model."""

    file: str = option(fix="name its eval task YAML")
    adapter: str | None = None
    model: str | None = None
    data_mb: int | float | None = None
    train: TrainKeys | None = None


@dataclass(frozen=True)
class SuiteKeys:
    """The top level of a suite file (after ``include:``), as written."""

    name: str
    base_model: str
    model_class: Literal["seq2seq", "causal"]
    tasks: dict[str, Any] = option(expect="a non-empty mapping of task name -> {file, adapter}")
    description: str = ""
    version: int = 1
    dtype: str = "float32"
    batch_size: int = count(8, 1)
    chat_template: bool = False
    template_kwargs: dict[str, Any] = option(factory=dict)
    info: dict[str, Any] = option(factory=dict)
    seed_tables: list[dict[str, Any]] = option(factory=list)
    train: TrainKeys | None = None


@dataclass(frozen=True)
class TableKeys:
    """One ``seed_tables`` entry."""

    name: str
    tasks: list[str]
    rows: dict[str, Any] = option(factory=dict)
    note: str = ""


def check_suite(data: dict[str, Any]) -> tuple[SuiteKeys | None, list[str]]:
    """Validate a suite mapping (``include:`` resolved): its keys and every problem found."""
    problems: list[str] = []
    keys = parse_section(SuiteKeys, data, "", problems)
    tasks = data.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        return None, [
            *problems,
            "tasks must be a non-empty mapping of task name -> {file, adapter}",
        ]
    for name, entry in tasks.items():
        where = f"tasks.{name}"
        task = parse_section(TaskKeys, entry or {}, where, problems)
        if task is None:
            continue
        if not Path(task.file).is_file():
            problems.append(f"{where}: task file {task.file} does not exist")
        if bool(task.adapter) == bool(task.model):
            problems.append(f"{where} needs exactly one of 'adapter' or 'model'")
    for i, raw in enumerate(data.get("seed_tables") or []):
        table = parse_section(TableKeys, raw, f"seed_tables[{i}]", problems)
        unknown = [t for t in table.tasks if t not in tasks] if table is not None else []
        if unknown:
            problems.append(f"seed table {table.name!r}: unknown task(s) {unknown}")
    return keys, problems
