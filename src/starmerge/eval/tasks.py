r"""Evaluation tasks as versioned YAML data (lm-eval style), loaded into frozen ``TaskSpec``\\ s.

A task file (every key is documented in ``docs/evaluation.md``; see ``tasks/example_sst2.yaml``)
names its data ``source``, seeded ``sampling``, an ``input_template`` over the data's columns, and
either ``label_words`` (scored or matched) or a generation ``metric`` with a ``target_column``.
``include: other.yaml`` (a path relative to the file, or a built-in task name) loads that file
first; this file's keys override it, key by key inside ``metadata``, ``source`` and
``sampling``. Built-in tasks live in ``starmerge/eval/task_files/*.yaml``. Data is read only when
``TaskSpec.examples()`` is called.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from starmerge.errors import ConfigError, StarmergeError, UnknownNameError, did_you_mean
from starmerge.eval import sources
from starmerge.eval.metrics import METRICS
from starmerge.eval.sources import Sampling, Source
from starmerge.schema import at_least, option, parse_section
from starmerge.yaml_io import load_yaml

TASKS_DIR = Path(__file__).parent / "task_files"
_DIR = "__dir__"  # internal source key: the directory of the file that set source.path


@dataclass(frozen=True)
class SourceKeys:
    """A task file's ``source:`` section as written."""

    type: Literal["local", "hub", "python"]
    path: str
    config: str | None = None
    split: str | None = None
    format: str | None = option(None, choices=sources.FORMATS)


@dataclass(frozen=True)
class TaskKeys:
    """A task file's keys as written (``include:`` resolved; null counts as absent)."""

    name: str
    metadata: dict[str, Any]
    source: SourceKeys
    input_template: str
    description: str = ""
    sampling: Sampling = Sampling()
    label_column: str | None = None
    label_words: dict[Any, Any] | None = None
    metric: str = option("accuracy", choices=METRICS.names)
    target_column: str | None = None
    scoring: Literal["loglikelihood", "generate"] = "loglikelihood"
    length_normalized: bool = False
    target_delimiter: str = " "
    max_new_tokens: int = option(10, check=at_least(1))


@dataclass(frozen=True)
class Example:
    """One evaluation item: the rendered prompt, the gold label key (or number) or target."""

    input: str
    label: str | float | None
    target: str | None
    index: int  # row index in the source, for the per-example predictions


@dataclass(frozen=True)
class TaskSpec:
    """A validated task. Build with :func:`load_task` or :func:`task_from_dict`."""

    name: str
    version: int
    source: Source
    input_template: str
    sampling: Sampling = Sampling()
    label_column: str | None = None
    label_words: Mapping[str, tuple[str, ...]] | None = None  # label key -> accepted words
    metric: str = "accuracy"
    target_column: str | None = None
    scoring: str = "loglikelihood"  # label-word tasks: "loglikelihood" or "generate"
    length_normalized: bool = False  # loglikelihood: mean per token instead of sum
    target_delimiter: str = " "  # put between the prompt and a scored label word
    max_new_tokens: int = 10
    description: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def examples(self) -> list[Example]:
        """Load the data, check its columns and labels, and return the seeded sample.

        Raises:
            StarmergeError: Missing data file or package, missing column, unknown label.
        """
        rows = sources.load_rows(self.source, self.name)
        self._check_columns(rows)
        keys = [self._label_key(row) for row in rows] if self.label_column else None
        picked = sources.sample_indices(len(rows), self.sampling, keys)
        out = []
        for i in picked:
            row = rows[i]
            label: str | float | None = None
            if self.label_column:
                label = keys[i] if self.label_words else float(row[self.label_column])  # type: ignore[index]
            target = str(row[self.target_column]) if self.target_column else None
            out.append(Example(self.input_template.format(**row), label, target, i))
        return out

    def _label_key(self, row: Mapping[str, Any]) -> str:
        key = str(row[self.label_column])  # type: ignore[index]
        if self.label_words is not None and key not in self.label_words:
            raise StarmergeError(
                f"task {self.name!r}: label {key!r} in column {self.label_column!r} has no "
                f"entry in label_words (known: {', '.join(self.label_words)}); add it to "
                "label_words or pick a split without it"
            )
        return key

    def _check_columns(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            raise StarmergeError(f"task {self.name!r}: source {self.source.path!r} has no rows")
        fields = [f for _, f, _, _ in string.Formatter().parse(self.input_template) if f]
        needed = {*fields, self.label_column, self.target_column} - {None}
        missing = sorted(c for c in needed if c not in rows[0])
        if missing:
            raise StarmergeError(
                f"task {self.name!r}: column(s) {', '.join(missing)} not in the data "
                f"(columns: {', '.join(rows[0])}); fix input_template/label_column/target_column"
            )


def list_tasks() -> list[str]:
    """Names of the built-in task files."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def _resolve(ref: str, base_dir: Path | None) -> Path:
    path = Path(ref)
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise StarmergeError(f"task file {path} does not exist")
        return path
    builtin = TASKS_DIR / f"{ref}.yaml"
    if not builtin.exists():
        hint = did_you_mean(ref, list_tasks())
        raise UnknownNameError(f"Unknown task {ref!r}.{hint} Available: {', '.join(list_tasks())}")
    return builtin


def _read(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read one task file and its ``include`` chain into one dict."""
    if path.resolve() in seen:
        raise ConfigError([f"{path}: include cycle through {', '.join(map(str, seen))}"])
    data = load_yaml(path, what="task file")
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: a task file must be a mapping, got {type(data).__name__}"])
    return _with_include(data, path.parent, (*seen, path.resolve()))


def _with_include(data: dict[str, Any], base_dir: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    """Merge ``data`` over the file it includes (later files override, sections key by key)."""
    data = dict(data)
    source = data.get("source")
    if isinstance(source, dict) and "path" in source and _DIR not in source:
        data["source"] = {**source, _DIR: base_dir}  # this file's relative paths start here
    ref = data.pop("include", None)
    if ref is None:
        return data
    base = _read(_resolve(str(ref), base_dir), seen)
    for section in ("metadata", "source", "sampling"):
        if isinstance(base.get(section), dict) and isinstance(data.get(section), dict):
            data[section] = {**base[section], **data[section]}
    return {**base, **data}


def load_task(path_or_name: str | Path) -> TaskSpec:
    """Load and validate a task file (a path, or a built-in task name such as ``example_sst2``).

    Raises:
        ConfigError: Every problem in the file at once (unknown keys with a did-you-mean).
        UnknownNameError: Neither a file nor a built-in task.

    Example:
        >>> load_task("example_sst2").metric
        'accuracy'
    """
    path = _resolve(str(path_or_name), None)
    return task_from_dict(_read(path), origin=str(path), base_dir=path.parent)


def _present(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` without null values (and ``source`` without its internal directory key)."""
    out = {k: v for k, v in data.items() if v is not None and k != _DIR}
    for section in ("source", "sampling"):
        if isinstance(out.get(section), Mapping):
            out[section] = _present(out[section])
    return out


def _consistency_problems(data: dict[str, Any]) -> list[str]:
    problems, metric = [], data.get("metric") or "accuracy"
    meta, words = data.get("metadata"), data.get("label_words")
    if isinstance(meta, dict) and (type(meta.get("version")) is not int):
        problems.append(f"metadata.version must be an int, got {meta.get('version')!r}")
    if isinstance(data.get("input_template"), str):
        try:
            list(string.Formatter().parse(data["input_template"]))
        except ValueError as err:
            problems.append(f"input_template is not a valid format string: {err}")
    if isinstance(words, dict):
        bad = [k for k, v in words.items() if not _is_words(v)]
        if bad or not words:
            problems.append(f"label_words values must be a word or a list of words; bad: {bad}")
        if not data.get("label_column"):
            problems.append("label_words needs label_column (the column with the raw labels)")
    if metric in ("accuracy", "macro_f1") and words is None:
        problems.append(f"metric {metric} needs label_words; use exact_match with target_column")
    if metric in ("exact_match", "spearman") and words is not None:
        problems.append(f"metric {metric} does not use label_words; remove them or use accuracy")
    if metric == "exact_match" and not data.get("target_column"):
        problems.append("metric exact_match needs target_column (the gold answer text)")
    if metric == "spearman" and not data.get("label_column"):
        problems.append("metric spearman needs label_column (the gold numbers)")
    sampling = data.get("sampling") or {}
    if isinstance(sampling, dict) and sampling.get("balance") and not data.get("label_column"):
        problems.append("sampling.balance needs label_column")
    if isinstance(sampling, dict) and isinstance(sampling.get("n"), int) and sampling["n"] < 1:
        problems.append(f"sampling.n must be >= 1 (or null for all rows), got {sampling['n']}")
    return problems


def _is_words(value: Any) -> bool:
    if isinstance(value, list):
        return bool(value) and all(isinstance(v, str) and v.strip() for v in value)
    return isinstance(value, str) and bool(value.strip())


def task_from_dict(
    data: Mapping[str, Any], origin: str = "<dict>", base_dir: str | Path = "."
) -> TaskSpec:
    """Validate a task mapping (the YAML content as a dict).

    Args:
        data: The task keys; an ``include`` is resolved against ``base_dir``.
        origin: Where the mapping came from, for error messages.
        base_dir: The directory relative ``include`` and local ``source.path`` start from.

    Raises:
        ConfigError: Every problem at once, each prefixed with ``origin``.

    Example:
        >>> spec = task_from_dict({"name": "t", "metadata": {"version": 1},
        ...     "source": {"type": "local", "path": "t.jsonl"}, "input_template": "{text}",
        ...     "label_column": "label", "label_words": {0: "no", 1: ["yes", "y"]}})
        >>> spec.label_words
        {'0': ('no',), '1': ('yes', 'y')}
    """
    data = _with_include(dict(data), Path(base_dir), ())
    problems: list[str] = []
    keys = parse_section(TaskKeys, _present(data), "", problems)
    problems += _consistency_problems(data)
    if problems or keys is None:
        raise ConfigError([f"task {origin}: {p}" for p in problems])
    opts = {f.name: getattr(keys, f.name) for f in fields(keys)}
    for key in ("metadata", "source", "label_words"):
        del opts[key]
    words = keys.label_words
    return TaskSpec(
        version=keys.metadata["version"],
        metadata=dict(keys.metadata),
        source=Source(**asdict(keys.source), base_dir=data["source"].get(_DIR)),
        label_words=None if words is None else {str(k): _words(v) for k, v in words.items()},
        **opts,
    )


def _words(value: str | list[str]) -> tuple[str, ...]:
    return tuple(value) if isinstance(value, list) else (value,)
