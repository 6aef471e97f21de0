"""The merge config: YAML that maps one to one onto frozen dataclasses.

``load_config`` parses, applies ``key.path=value`` overrides and validates once, raising a single
``ConfigError`` that lists every problem. Paths are not touched here (see ``plan.py``); the
``data:`` section is parsed in ``config_data.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from starmerge.config_data import DataSpec, data_checks, parse_data
from starmerge.errors import (
    ConfigError,
    StarmergeError,
    UnknownNameError,
    did_you_mean,
    short_repr,
)
from starmerge.overrides import apply_overrides
from starmerge.yaml_io import load_yaml

TOP_KEYS = ("method", "parameters", "base_model", "models", "output", "data")
MODEL_KEYS = ("adapter", "model", "weight", "name")
OUTPUT_KEYS = ("format", "dtype", "max_shard_size", "rank")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelSpec:
    """One task model: a PEFT adapter or a full fine-tuned checkpoint."""

    kind: Literal["adapter", "model"]
    source: str
    weight: float | None = None
    name: str | None = None

    @property
    def label(self) -> str:
        """A short name for messages and the manifest."""
        return self.name or Path(self.source.rstrip("/")).name or self.source


@dataclass(frozen=True)
class OutputSpec:
    """What to write: a merged HF model or a merged PEFT adapter."""

    format: Literal["model", "adapter"] = "model"
    dtype: str | None = None
    max_shard_size: str = "5GB"
    rank: int | None = None


@dataclass(frozen=True)
class RunConfig:
    """A validated merge recipe."""

    method: str
    parameters: Mapping[str, Any]
    models: tuple[ModelSpec, ...]
    base_model: str | None = None
    output: OutputSpec = field(default_factory=OutputSpec)
    data: DataSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (written next to every output)."""
        models = [
            {m.kind: m.source, **({"weight": m.weight} if m.weight is not None else {})}
            for m in self.models
        ]
        return {
            "method": self.method,
            "parameters": dict(self.parameters),
            "base_model": self.base_model,
            "models": models,
            "output": asdict(self.output),
            **({"data": asdict(self.data)} if self.data is not None else {}),
        }


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read, override and validate a merge config.

    Args:
        path: The YAML file.
        overrides: ``dotted.key=value`` strings (``parameters.eta=20``, ``method.eta=20``,
            ``output.dtype=bfloat16``, ``models.0.weight=0.5``); values are parsed as YAML
            (see :mod:`starmerge.overrides`).

    Raises:
        ConfigError: The file is unreadable or not acceptable YAML (see
            :mod:`starmerge.yaml_io`), an override is malformed, or, listing every problem at
            once, the config is invalid.

    Example:
        >>> cfg = load_config("configs/star_two_adapters.yaml", ["parameters.eta=20"])
    """
    raw = load_yaml(path, what="config file")
    return parse_config(apply_overrides({} if raw is None else raw, overrides))


def parse_config(raw: Any) -> RunConfig:
    """Validate a config mapping (already parsed YAML) into a ``RunConfig``.

    Raises:
        ConfigError: Listing every problem at once.
    """
    if not isinstance(raw, dict):
        raise ConfigError([f"the config must be a mapping with keys {', '.join(TOP_KEYS)}"])
    problems = _unknown_keys(raw, TOP_KEYS, "top level")
    method, params = _method(raw, problems)
    models = _models(raw.get("models"), problems)
    output = _output(raw.get("output") or {}, problems)
    base = raw.get("base_model")
    if base is not None and not isinstance(base, str):
        problems.append(f"base_model must be a path or hub id string, got {short_repr(base)}")
    data = parse_data(raw.get("data"), len(models), problems)
    _cross_checks(method, params, models, output, base, problems)
    data_checks(method, params, data, base, problems)
    if problems:
        raise ConfigError(problems)
    return RunConfig(method or "", params, tuple(models), base, output, data)


def _unknown_keys(node: Mapping, allowed: Sequence[str], where: str) -> list[str]:
    return [
        f"unknown key {short_repr(key)} in {where}.{did_you_mean(str(key), allowed)} "
        f"Allowed: {', '.join(allowed)}"
        for key in node
        if key not in allowed
    ]


def _method(raw: Mapping, problems: list[str]) -> tuple[str | None, dict[str, Any]]:
    from starmerge.methods import METHODS

    name, given = raw.get("method"), raw.get("parameters") or {}
    if not isinstance(given, dict):
        problems.append(f"parameters must be a mapping, got {short_repr(given)}")
        given = {}
    if not isinstance(name, str):
        problems.append(
            f"method is required (one of: {', '.join(METHODS.names())}), got {short_repr(name)}"
        )
        return None, dict(given)
    try:
        method = METHODS.get(name)
    except UnknownNameError as exc:
        problems.append(str(exc))
        return None, dict(given)
    try:
        return name, method.resolve(given)
    except ConfigError as exc:
        problems.extend(exc.problems)
        return name, dict(given)


def _models(raw: Any, problems: list[str]) -> list[ModelSpec]:
    if not isinstance(raw, list) or not raw:
        problems.append("models must be a non-empty list of {adapter: PATH} or {model: PATH}")
        return []
    models = []
    for i, entry in enumerate(raw):
        where = f"models[{i}]"
        if not isinstance(entry, dict):
            problems.append(
                f"{where} must be a mapping like {{adapter: PATH}}, got {short_repr(entry)}"
            )
            continue
        problems.extend(_unknown_keys(entry, MODEL_KEYS, where))
        kinds = [k for k in ("adapter", "model") if k in entry]
        if len(kinds) != 1:
            problems.append(f"{where} needs exactly one of 'adapter' or 'model', got {kinds}")
            continue
        source, weight = entry[kinds[0]], entry.get("weight")
        if not isinstance(source, str) or not source:
            problems.append(
                f"{where}.{kinds[0]} must be a path or hub id, got {short_repr(source)}"
            )
            continue
        weight = _weight(weight, where, problems)
        models.append(ModelSpec(kinds[0], source, weight, entry.get("name")))
    return models


def _weight(weight: Any, where: str, problems: list[str]) -> float | None:
    """``models[i].weight`` as a finite float, or None (unset, or a problem was recorded)."""
    if weight is None:
        return None
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        problems.append(f"{where}.weight must be a number, got {short_repr(weight)}")
        return None
    try:
        value = float(weight)
    except OverflowError:  # an int beyond a float's range
        value = math.inf
    if not math.isfinite(value):
        problems.append(
            f"{where}.weight must be a finite number, got {short_repr(weight)}; "
            "give a number such as 1.0"
        )
        return None
    return value


def _output(raw: Any, problems: list[str]) -> OutputSpec:
    if not isinstance(raw, dict):
        problems.append(f"output must be a mapping, got {short_repr(raw)}")
        return OutputSpec()
    problems.extend(_unknown_keys(raw, OUTPUT_KEYS, "output"))
    out = OutputSpec(
        format=raw.get("format", "model"),
        dtype=raw.get("dtype"),
        max_shard_size=str(raw.get("max_shard_size", "5GB")),
        rank=raw.get("rank"),
    )
    if out.format not in ("model", "adapter"):
        problems.append(f"output.format must be model or adapter, got {short_repr(out.format)}")
    if out.dtype is not None and out.dtype not in DTYPES:
        hint = did_you_mean(str(out.dtype), DTYPES)
        problems.append(
            f"output.dtype must be one of {', '.join(DTYPES)}, got {short_repr(out.dtype)}.{hint}"
        )
    if out.rank is not None and (
        isinstance(out.rank, bool) or not isinstance(out.rank, int) or out.rank < 1
    ):
        problems.append(
            f"output.rank must be a positive integer or null, got {short_repr(out.rank)}"
        )
    try:
        from starmerge.io.writer import parse_size

        parse_size(out.max_shard_size)
    except StarmergeError as exc:
        problems.append(f"output.max_shard_size: {exc}")
    return out


def _cross_checks(
    method: str | None,
    params: Mapping[str, Any],
    models: list[ModelSpec],
    output: OutputSpec,
    base: str | None,
    problems: list[str],
) -> None:
    from starmerge.methods import METHODS

    has_full = any(m.kind == "model" for m in models)
    if base is None and (output.format == "model" or has_full):
        why = (
            "output.format is model"
            if output.format == "model"
            else "a models entry is a full model"
        )
        problems.append(f"base_model is required because {why}; add base_model: PATH-OR-HUB-ID")
    if output.format == "adapter" and has_full:
        problems.append(
            "output.format adapter needs LoRA adapters as inputs, got a full model "
            "(`model:` entry); use output.format: model"
        )
    if method is None or method not in METHODS:
        return
    spec = METHODS.get(method)
    if spec.needs_base and base is None and output.format == "adapter" and not has_full:
        problems.append(
            f"{method} works on the base model's weights, not only on task deltas, so it needs "
            "base_model even for an adapter-only merge; add base_model: PATH-OR-HUB-ID"
        )
    if any(m.weight is not None for m in models) and "weights" not in spec.params:
        problems.append(
            f"{method} does not use per-model weights, got models[].weight; remove "
            "them or use task_arithmetic"
        )
    if output.format == "adapter" and not spec.lowrank_output and output.rank is None:
        problems.append(
            f"{method} is elementwise, so its merge is not low-rank: set output.rank "
            "(the SVD rank of the merged adapter) or use output.format: model"
        )
