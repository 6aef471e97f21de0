"""The merge config: YAML that maps one to one onto frozen dataclasses.

``load_config`` parses, applies ``key.path=value`` overrides and validates once, raising a single
``ConfigError`` that lists every problem. Paths are not touched here (see ``plan.py``); the
``data:`` section is parsed in ``config_data.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from starmerge.config_data import DataSpec, data_checks, parse_data, size_check
from starmerge.errors import ConfigError, UnknownNameError, short_repr
from starmerge.mergekit_yaml import from_mergekit, is_mergekit
from starmerge.methods import METHODS
from starmerge.overrides import apply_overrides
from starmerge.schema import option, parse_section, section_keys
from starmerge.space_form import space_problem
from starmerge.yaml_io import load_yaml

DTYPES = ("float32", "bfloat16", "float16")
_SOURCE = "a path or hub id"


def _nonempty(value: str) -> str | None:
    return None if value else f"must be {_SOURCE}"


def _positive(value: int) -> str | None:
    return None if value >= 1 else "must be a positive integer or null"


@dataclass(frozen=True)
class _TopKeys:
    """The top level of a merge config; each section is validated on its own."""

    method: Any = None
    parameters: Any = None
    base_model: str | None = option(None, expect=f"{_SOURCE} string")
    models: Any = None
    output: Any = None
    data: Any = None
    space: Any = None


@dataclass(frozen=True)
class _ModelEntry:
    """One ``models[i]`` entry as written: exactly one of ``adapter`` and ``model``."""

    adapter: str | None = option(None, check=_nonempty, expect=_SOURCE)
    model: str | None = option(None, check=_nonempty, expect=_SOURCE)
    weight: float | None = option(None, fix="give a number such as 1.0")
    name: str | None = None


@dataclass(frozen=True)
class _SpaceKey:
    """The top-level ``space`` key, checked on its own (a bad value keeps the other keys)."""

    space: Literal["full", "core", "knots"] = option("full", expect="one of full, core, knots")


TOP_KEYS = tuple(section_keys(_TopKeys))


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
    dtype: str | None = option(None, choices=DTYPES)
    max_shard_size: str | int = option("5GB", check=size_check, expect="a size such as 5GB")
    rank: int | None = option(None, check=_positive, expect="a positive integer")


@dataclass(frozen=True)
class RunConfig:
    """A validated merge recipe."""

    method: str
    parameters: Mapping[str, Any]
    models: tuple[ModelSpec, ...]
    base_model: str | None = None
    output: OutputSpec = field(default_factory=OutputSpec)
    data: DataSpec | None = None
    space: str = "full"  # full | core | knots: where the method merges (docs/spaces.md)

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
            "space": self.space,
        }


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read, override and validate a merge config.

    A mergekit config (one with ``merge_method:``) is translated first
    (:mod:`starmerge.mergekit_yaml`); overrides then apply to the translated config.

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
    if is_mergekit(raw):  # a mergekit config, read as it is (starmerge.mergekit_yaml)
        raw = from_mergekit(raw)
    return parse_config(apply_overrides({} if raw is None else raw, overrides))


def parse_config(raw: Any) -> RunConfig:
    """Validate a config mapping (already parsed YAML) into a ``RunConfig``.

    Each section goes through :func:`starmerge.schema.parse_section`; then the checks across
    sections (base model, adapter output, per-model weights, the method's data).

    Raises:
        ConfigError: Listing every problem at once.
    """
    if not isinstance(raw, dict):
        raise ConfigError([f"the config must be a mapping with keys {', '.join(TOP_KEYS)}"])
    problems: list[str] = []
    top = parse_section(_TopKeys, raw, "", problems)
    base = top.base_model if top is not None else None
    space = _space(raw, problems)
    method, params = _method(raw, problems)
    models = _models(raw.get("models"), problems)
    output = parse_section(OutputSpec, raw.get("output") or {}, "output", problems)
    data = parse_data(raw.get("data"), len(models), problems)
    if output is not None:
        output = replace(output, max_shard_size=str(output.max_shard_size))
        _cross_checks(method, params, models, output, base, space, problems)
        _space_checks(method, models, output, space, problems)
    if data is not None or raw.get("data") is None:  # an invalid section is reported already
        data_checks(method, params, data, base, problems)
    if problems:
        raise ConfigError(problems)
    output = output or OutputSpec()
    return RunConfig(method or "", params, tuple(models), base, output, data, space or "full")


def _method(raw: Mapping, problems: list[str]) -> tuple[str | None, dict[str, Any]]:
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


def _space(raw: Mapping, problems: list[str]) -> str | None:
    """The merge space (``full`` when absent), or None when the value is invalid (reported)."""
    if "space" not in raw:
        return "full"
    parsed = parse_section(_SpaceKey, {"space": raw["space"]}, "", problems)
    return None if parsed is None else parsed.space


def _space_checks(
    method: str | None,
    models: list[ModelSpec],
    output: OutputSpec,
    space: str | None,
    problems: list[str],
) -> None:
    """``core``/``knots`` need LoRA adapters as inputs and a method that runs in the space."""
    if space in (None, "full"):
        return
    full = [i for i, m in enumerate(models) if m.kind == "model"]
    if full and output.format == "model":  # adapter output says so already (_cross_checks)
        problems.append(
            f"space: {space} merges LoRA adapters in a shared low-rank basis, but "
            f"models[{full[0]}] is a full fine-tuned model (`model:` entry); use space: full"
        )
    if method is not None and method in METHODS:
        problem = space_problem(METHODS.get(method), space)
        if problem:
            problems.append(problem)


def _models(raw: Any, problems: list[str]) -> list[ModelSpec]:
    if not isinstance(raw, list) or not raw:
        problems.append(
            "models must be a non-empty list of {adapter: PATH} or {model: PATH}, "
            f"got {short_repr(raw)}"
        )
        return []
    models = []
    for i, item in enumerate(raw):
        entry = parse_section(_ModelEntry, item, f"models[{i}]", problems)
        if entry is None:
            continue
        kinds = [k for k in ("adapter", "model") if getattr(entry, k) is not None]
        if len(kinds) != 1:
            problems.append(f"models[{i}] needs exactly one of 'adapter' or 'model', got {kinds}")
            continue
        source = getattr(entry, kinds[0])
        models.append(ModelSpec(kinds[0], source, entry.weight, entry.name))
    return models


def _cross_checks(
    method: str | None,
    params: Mapping[str, Any],
    models: list[ModelSpec],
    output: OutputSpec,
    base: str | None,
    space: str | None,
    problems: list[str],
) -> None:
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
    count = spec.models_problem(len(models))
    if count:
        problems.append(count)
    exact = spec.exact_lowrank(params) or space != "full"  # a lifted merge is low rank (None: bad)
    if output.format == "adapter" and not exact and output.rank is None:
        problems.append(
            f"{method} is elementwise, so its merge is not low-rank: set output.rank "
            "(the SVD rank of the merged adapter) or use output.format: model"
        )
