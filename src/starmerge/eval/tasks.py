r"""Evaluation tasks as versioned YAML data (lm-eval style), loaded into frozen ``TaskSpec``\\ s.

A task file (every key is documented in ``docs/evaluation.md``; see ``tasks/example_sst2.yaml``)
names its data ``source``, seeded ``sampling``, an ``input_template`` over the data's columns, and
either ``label_words`` (scored or matched) or a generation ``metric`` with a ``target_column``.
``include: other.yaml`` (a path relative to the file, or a built-in task name) loads that file
first; this file's keys override it, key by key inside ``metadata``, ``source`` and
``sampling``. Built-in tasks live in ``starmerge/eval/tasks/*.yaml``. Data is read only when
``TaskSpec.examples()`` is called.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starmerge.errors import ConfigError, StarmergeError, UnknownNameError, did_you_mean
from starmerge.eval import sources
from starmerge.eval.metrics import METRICS
from starmerge.eval.sources import Sampling, Source
from starmerge.yaml_io import load_yaml

TASKS_DIR = Path(__file__).parent / "tasks"
_DIR = "__dir__"  # internal source key: the directory of the file that set source.path

# key -> (type, required). None values count as absent.
_TOP: dict[str, tuple[type, bool]] = {
    "name": (str, True), "description": (str, False), "metadata": (dict, True),
    "source": (dict, True), "sampling": (dict, False), "input_template": (str, True),
    "label_column": (str, False), "label_words": (dict, False), "metric": (str, False),
    "target_column": (str, False), "scoring": (str, False), "length_normalized": (bool, False),
    "target_delimiter": (str, False), "max_new_tokens": (int, False), "include": (str, False),
}  # fmt: skip
_SECTIONS: dict[str, dict[str, tuple[type, bool]]] = {
    "source": {"type": (str, True), "path": (str, True), "config": (str, False),
               "split": (str, False), "format": (str, False)},
    "sampling": {"n": (int, False), "seed": (int, False), "balance": (bool, False)},
}  # fmt: skip
_ENUMS = {
    "source.type": ("local", "hub", "python"),
    "source.format": sources.FORMATS,
    "scoring": ("loglikelihood", "generate"),
}


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


def _type_problems(data: Mapping[str, Any], spec: dict[str, tuple[type, bool]], where: str):
    problems = []
    for key in data:
        if key not in spec and key != _DIR:
            hint = did_you_mean(str(key), spec)
            problems.append(f"unknown key {where}{key!r}.{hint} Allowed: {', '.join(spec)}")
    for key, (typ, required) in spec.items():
        value = data.get(key)
        if value is None:
            if required:
                problems.append(f"missing required key {where}{key!r}")
        elif not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            problems.append(f"{where}{key} must be {typ.__name__}, got {value!r}")
    return problems


def _lookup(data: Mapping[str, Any], dotted: str) -> Any:
    """``data["a"]["b"]`` for ``"a.b"``, or None where a level is missing or not a mapping."""
    for part in dotted.split("."):
        if not isinstance(data, Mapping):
            return None
        data = data.get(part)  # type: ignore[assignment]
    return data


def _problems(data: dict[str, Any]) -> list[str]:
    problems = _type_problems(data, _TOP, "")
    for section, spec in _SECTIONS.items():
        if isinstance(data.get(section), dict):
            problems += _type_problems(data[section], spec, f"{section}.")
    enums = {**_ENUMS, "metric": tuple(METRICS.names())}
    for dotted, allowed in enums.items():
        value = _lookup(data, dotted)
        if value is not None and value not in allowed:
            hint = did_you_mean(str(value), allowed)
            problems.append(f"{dotted} must be one of {', '.join(allowed)}, got {value!r}.{hint}")
    return problems + _consistency_problems(data)


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
    if isinstance(data.get("max_new_tokens"), int) and data["max_new_tokens"] < 1:
        problems.append(f"max_new_tokens must be >= 1, got {data['max_new_tokens']}")
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
    problems = _problems(data)
    if problems:
        raise ConfigError([f"task {origin}: {p}" for p in problems])
    words, source = data.get("label_words"), dict(data["source"])
    opts = {k: data[k] for k in _TOP if data.get(k) is not None}
    for key in ("metadata", "include", "source", "sampling", "label_words"):
        opts.pop(key, None)
    return TaskSpec(
        version=data["metadata"]["version"],
        metadata=dict(data["metadata"]),
        source=Source(**{k: v for k, v in source.items() if k != _DIR}, base_dir=source.get(_DIR)),
        sampling=Sampling(**(data.get("sampling") or {})),
        label_words=None if words is None else {
            str(k): tuple(v) if isinstance(v, list) else (v,) for k, v in words.items()},
        **opts,
    )  # fmt: skip
