"""Index the inputs (headers only), check they fit together, and predict peak memory.

Nothing here reads tensor data: a plan is what ``starmerge validate`` and ``--dry-run`` report,
and what the engine then executes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from starmerge.config import ModelSpec, RunConfig, load_config
from starmerge.errors import ConfigError, InputError, StarmergeError
from starmerge.io.adapter import LoraAdapter, load_adapter
from starmerge.io.checkpoint import TensorIndex
from starmerge.io.full import FullFineTune
from starmerge.io.hub import ADAPTER_PATTERNS, MODEL_PATTERNS, resolve
from starmerge.io.statistics import StatsFile
from starmerge.methods import METHODS
from starmerge.methods.base import Method
from starmerge.methods.contract import STATISTICS
from starmerge.paths import with_absolute_paths
from starmerge.peak_model import KeyInputs, OutputModel, peak_bytes
from starmerge.tensors.delta import Delta, LowRank
from starmerge.tensors.threads import one_thread, split_over_cores


@dataclass
class Task:
    """A task model in the plan."""

    spec: ModelSpec
    path: Path
    source: Any
    shapes: dict[str, tuple[int, ...]]


@dataclass
class Plan:
    """Everything the engine needs, derived from headers alone."""

    config: RunConfig
    method: Method
    params: dict[str, Any]
    tasks: list[Task]
    shapes: dict[str, tuple[int, ...]]
    base: Any = None
    base_path: Path | None = None
    missing: dict[str, list[str]] = field(default_factory=dict)
    predicted_peak_bytes: int = 0
    out_dtype: torch.dtype = torch.float32
    config_path: Path | None = None

    def read(self, key: str) -> list[Delta | None]:
        """Every task's delta for ``key`` (None for a task that lacks it).

        Adapters are read on two cores (:func:`split_over_cores`, once the first task's factors
        show the reads large enough): each factor is read straight into its own tensor, so this
        holds nothing more at once. A full fine-tune's delta is formed from temporaries, so
        those are read one task at a time.
        """
        out: list[Delta | None] = [None] * len(self.tasks)

        def fill(tasks: Sequence[int]) -> None:
            for i in tasks:
                task = self.tasks[i]
                out[i] = task.source.get(key) if key in task.shapes else None

        fill(range(1))
        rest = len(self.tasks) - 1
        if isinstance(out[0], LowRank) and all(
            isinstance(t.source, LoraAdapter) for t in self.tasks
        ):
            entries = (out[0].b.numel() + out[0].a.numel()) * rest
            with one_thread():  # positioned reads and finiteness sums, a task per core
                split_over_cores(lambda tasks: fill([i + 1 for i in tasks]), rest, entries)
        else:
            fill(range(1, len(self.tasks)))
        return out


def make_plan(config: RunConfig, config_path: Path | None = None) -> Plan:
    """Open every input lazily and check they are compatible.

    Args:
        config: The validated config.
        config_path: The config file: relative input paths start at its directory (at the
            working directory when ``None``), and it counts as an input that the output
            directory must avoid. The plan's config holds the paths as absolute paths.

    Raises:
        InputError: Listing every input problem at once (missing paths, bad adapters, shape
            or base-model disagreements).
    """
    base_dir = None if config_path is None else Path(config_path).parent
    config = with_absolute_paths(config, base_dir)
    method = METHODS.get(config.method)
    params = dict(config.parameters)
    if "weights" in method.params and any(m.weight is not None for m in config.models):
        params["weights"] = [1.0 if m.weight is None else m.weight for m in config.models]
    params = method.resolve(params)
    problems: list[str] = []
    base, base_path = _open_base(config, problems, base_dir)
    tasks = [_open_task(m, base, problems, base_dir) for m in config.models]
    tasks = [t for t in tasks if t is not None]
    _check_statistics(params, len(config.models), problems)
    if problems:
        raise InputError(_join(problems))
    shapes = _check_shapes(tasks, base, problems)
    _check_bases(tasks, problems)
    if problems:
        raise InputError(_join(problems))
    plan = Plan(config, method, params, tasks, shapes, base, base_path, config_path=config_path)
    plan.missing = {
        t.spec.label: sorted(set(shapes) - set(t.shapes))
        for t in tasks
        if set(shapes) - set(t.shapes)
    }
    plan.out_dtype = _out_dtype(config, base, tasks)
    plan.predicted_peak_bytes = predict_peak(plan)
    return plan


def _check_statistics(params: dict[str, Any], n_models: int, problems: list[str]) -> None:
    """Precomputed ``parameters.statistics``: one readable statistics file per model."""
    paths = params.get(STATISTICS)
    if paths is None:
        return
    if len(paths) != n_models:
        problems.append(
            f"parameters.statistics must list one statistics file per model ({n_models}), got "
            f"{len(paths)}"
        )
    for path in paths:
        try:
            StatsFile(path)
        except StarmergeError as exc:
            problems.append(str(exc))


def _join(problems: list[str]) -> str:
    return (
        problems[0]
        if len(problems) == 1
        else f"{len(problems)} input problems: " + "; ".join(problems)
    )


def _open_base(
    config: RunConfig, problems: list[str], base_dir: Path | None
) -> tuple[Any, Path | None]:
    if config.base_model is None:
        return None, None
    try:
        path = resolve(
            config.base_model, what="base model", allow_patterns=MODEL_PATTERNS, base_dir=base_dir
        )
        return TensorIndex.open(path), path
    except StarmergeError as exc:
        problems.append(str(exc))
        return None, None


def _open_task(
    spec: ModelSpec, base: Any, problems: list[str], base_dir: Path | None
) -> Task | None:
    try:
        if spec.kind == "adapter":
            path = resolve(
                spec.source, what="adapter", allow_patterns=ADAPTER_PATTERNS, base_dir=base_dir
            )
            source = load_adapter(path, base)
        else:
            what = "fine-tuned model"
            path = resolve(spec.source, what=what, allow_patterns=MODEL_PATTERNS, base_dir=base_dir)
            if base is None:
                return None  # the missing base is reported by the config check
            source = FullFineTune(base, TensorIndex.open(path), spec.label)
        return Task(spec, path, source, dict(source.shapes()))
    except StarmergeError as exc:
        problems.append(str(exc))
        return None


def _check_shapes(tasks: list[Task], base: Any, problems: list[str]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    owner: dict[str, str] = {}
    for t in tasks:
        for key, shape in t.shapes.items():
            if key in shapes and shapes[key] != shape:
                problems.append(
                    f"{t.spec.label} has {key} of shape {shape} but {owner[key]} has "
                    f"{shapes[key]}; all task models must be fine-tunes of the same base model"
                )
            shapes.setdefault(key, shape)
            owner.setdefault(key, t.spec.label)
    if base is not None:
        _check_against_base(shapes, owner, base, problems)
        order = {k: i for i, k in enumerate(base.keys())}
        shapes = dict(sorted(shapes.items(), key=lambda kv: order.get(kv[0], len(order))))
    return shapes


def _check_against_base(
    shapes: dict[str, tuple[int, ...]], owner: dict[str, str], base: Any, problems: list[str]
) -> None:
    """Every changed key must exist in the base with the same shape (grouped per task model)."""
    base_keys = set(base.keys())
    absent: dict[str, list[str]] = {}
    for key, shape in shapes.items():
        if key not in base_keys:
            absent.setdefault(owner[key], []).append(key)
        elif tuple(base.shape(key)) != shape:
            problems.append(
                f"{owner[key]} has {key} of shape {shape} but the base model has "
                f"{tuple(base.shape(key))}; check that base_model is the right model"
            )
    for label, keys in absent.items():
        problems.append(
            f"{label} changes {len(keys)} parameters that the base model does not have (e.g. "
            f"{keys[0]}); check that base_model is the model it was trained on"
        )


def _check_bases(tasks: list[Task], problems: list[str]) -> None:
    named = {
        t.spec.label: str(t.source.base_model).rstrip("/")
        for t in tasks
        if t.spec.kind == "adapter" and getattr(t.source, "base_model", None)
    }
    if len(set(named.values())) > 1:
        listing = ", ".join(f"{k} -> {v}" for k, v in named.items())
        problems.append(
            f"the adapters were made for different base models ({listing}); merge only adapters "
            "of one base model"
        )


def _out_dtype(config: RunConfig, base: Any, tasks: list[Task]) -> torch.dtype:
    if config.output.dtype is not None:
        return getattr(torch, config.output.dtype)
    if base is not None:
        counts = Counter(base.dtype(k) for k in base.keys() if base.dtype(k).is_floating_point)
        if counts:
            return counts.most_common(1)[0][0]
    return torch.float32


def predict_peak(plan: Plan) -> int:
    """Predicted peak anonymous memory in bytes beyond the runtime (:mod:`starmerge.peak_model`).

    Each merged parameter's inputs as they reach the method (LoRA factors or dense deltas, and
    whether reading casts), the method's declared footprint and what the output costs.
    """
    keys = {key: _key_inputs(plan, key, shape) for key, shape in plan.shapes.items()}
    base = None
    if plan.config.output.format == "model" and plan.base is not None:
        base = {
            k: (_numel(plan.base.shape(k)), plan.base.dtype(k).itemsize, k in plan.shapes)
            for k in plan.base.keys()
        }
    output = OutputModel(
        plan.config.output.format, plan.out_dtype.itemsize, plan.config.output.rank, base
    )
    n_tasks = len(plan.tasks)
    return peak_bytes(plan.method, plan.params, n_tasks, keys, output, plan.config.space)


def _key_inputs(plan: Plan, key: str, shape: tuple[int, ...]) -> KeyInputs:
    """How ``key``'s task deltas reach the method: summed LoRA rank, or dense (and casts)."""
    present = [t for t in plan.tasks if key in t.shapes]
    if all(t.spec.kind == "adapter" for t in present):
        ranks = [_lora_rank(t.source.config) for t in present]
        return KeyInputs(shape, lora_rank=max(sum(ranks), 1))
    dtypes = [t.source.ft.dtype(key) for t in present if t.spec.kind != "adapter"]
    if plan.base is not None and key in plan.base:
        dtypes.append(plan.base.dtype(key))
    return KeyInputs(shape, cast=any(d != torch.float32 for d in dtypes))


def _lora_rank(config: dict[str, Any]) -> int:
    """An adapter's largest rank (``r`` or a ``rank_pattern`` entry): an upper bound per module."""
    pattern = config.get("rank_pattern") or {}
    return max([int(config.get("r") or 8), *(int(v) for v in pattern.values())])


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def check_config_and_inputs(config_path: Path, overrides: list[str]) -> Plan:
    """Load the config and index the inputs; raise one error listing every problem found.

    Relative input paths (in the file and in ``overrides``) start at the config file's directory.
    """
    config = load_config(config_path, overrides)
    try:
        return make_plan(config, Path(config_path))
    except InputError as exc:
        raise ConfigError([str(exc)]) from None
