"""The Python API: merge in memory, or run a config like the CLI does."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from starmerge.config import load_config
from starmerge.engine import run_merge
from starmerge.errors import ConfigError, InputError
from starmerge.methods import METHODS, Method
from starmerge.pipeline import fit_state, merge_params
from starmerge.plan import make_plan
from starmerge.space_form import check_space
from starmerge.tensors.delta import Delta
from starmerge.tensors.finite import delta_finite


@dataclass(frozen=True)
class MergeOutcome:
    """An in-memory merge: one merged delta per parameter, plus statistics.

    Args:
        deltas: Merged delta per parameter key (the pipeline adds the base).
        stats: ``{"state": fitter summary, "per_parameter": {key: stats}}``.
    """

    deltas: dict[str, Delta]
    stats: dict[str, Any] = field(default_factory=dict)


def merge_deltas(
    method: str,
    task_deltas: Sequence[Mapping[str, Delta]],
    parameters: Mapping[str, Any] | None = None,
    weights: Sequence[float] | None = None,
    *,
    base: Mapping[str, Tensor] | None = None,
    device: str = "cpu",
    space: str = "full",
) -> MergeOutcome:
    """Merge task deltas held in memory with a registered method.

    Args:
        method: A name from ``starmerge methods``.
        task_deltas: One mapping ``parameter key -> Delta`` per task; a key that a task lacks is
            a zero delta for that task.
        parameters: Method hyperparameters (validated; defaults filled).
        weights: Per-task weights, for methods that take them (``task_arithmetic``).
        base: The base model's tensor per parameter key, for methods that declare
            ``needs_base`` (they interpolate weights, not only deltas).
        device: Where the method computes (``cpu`` or ``cuda``).
        space: The merge space: ``full`` (the deltas as they are), ``core`` (Core Space) or
            ``knots`` (KnOTS); the latter two need ``LowRank`` deltas and give ``LowRank``
            results (see ``docs/spaces.md``).

    Returns:
        The merged deltas and statistics.

    Raises:
        ConfigError: Unknown method or bad parameters, a method that needs the base model
            called without ``base``, or an unknown space or one the method does not run in.
        InputError: A key missing from ``base``; tasks whose deltas for one key have
            different shapes, a delta that holds NaN or Inf, or a merged delta that does; in
            ``core``/``knots``, a delta that is not ``LowRank``.

    Example:
        >>> out = merge_deltas("star", [adapter_a, adapter_b], {"eta": 40})
        >>> out.deltas["model.layers.0.self_attn.q_proj.weight"].to_dense()
    """
    spec = METHODS.get(method)
    given = dict(parameters or {})
    if weights is not None:
        if "weights" not in spec.params:
            raise ConfigError([f"{method} does not use per-model weights, got weights={weights}"])
        given["weights"] = [float(w) for w in weights]
    params = spec.resolve(given)
    count = spec.models_problem(len(task_deltas))
    if count:
        raise ConfigError([count])
    check_space(spec, space)
    shapes = _shapes(task_deltas)

    read_base = _base_reader(spec, base, shapes)

    def read(key: str) -> list[Delta | None]:
        return [t.get(key) for t in task_deltas]

    args = {"base": read_base, "device": device, "space": space}
    state = fit_state(spec, params, len(task_deltas), shapes, read, **args)
    merged, per_param = {}, {}
    results = merge_params(spec, params, state, shapes, read, **args)
    for key, result in results:
        merged[key] = result.delta
        if result.stats:
            per_param[key] = dict(result.stats)
    summary = state.summary() if state is not None else {}
    return MergeOutcome(merged, {"state": summary, "per_parameter": per_param})


def _base_reader(
    spec: Method, base: Mapping[str, Tensor] | None, shapes: Mapping[str, tuple[int, ...]]
) -> Callable[[str], Tensor] | None:
    """``base.__getitem__`` checked against the merged keys (None when not needed)."""
    if not spec.needs_base:
        return None
    if base is None:
        raise ConfigError(
            [
                f"{spec.name} needs the base model's weights, not only task deltas; pass "
                "base={key: tensor} to merge_deltas"
            ]
        )
    missing = [k for k in shapes if k not in base]
    if missing:
        raise InputError(
            f"base has no tensor for {len(missing)} merged parameters (e.g. {missing[0]}); "
            "pass the base model's tensor of every merged key"
        )
    return base.__getitem__


def _shapes(task_deltas: Sequence[Mapping[str, Delta]]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i, task in enumerate(task_deltas):
        for key, delta in task.items():
            if shapes.setdefault(key, delta.shape) != delta.shape:
                raise InputError(
                    f"task {i} has {key} of shape {delta.shape} but an earlier task has "
                    f"{shapes[key]}; all tasks must be fine-tunes of the same base model"
                )
            if not delta_finite(delta):
                raise InputError(f"task {i} has NaN or Inf in {key}; pass finite deltas")
    return shapes


def merge(
    config: str | Path,
    out_dir: str | Path,
    *,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Run a merge config and write the result, exactly as ``starmerge merge`` does.

    Returns:
        The manifest (also written to ``OUT_DIR/starmerge.json``).

    Example:
        >>> manifest = merge("configs/star_two_adapters.yaml", "out/merged")
    """
    cfg = load_config(config, overrides)
    plan = make_plan(cfg, Path(config))  # relative paths start at the config file
    return run_merge(plan, Path(out_dir), overwrite=overwrite, device=device, progress=progress)
