"""The Python API: merge in memory, or run a config like the CLI does."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starmerge.errors import ConfigError, InputError
from starmerge.tensors.delta import Delta


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
    device: str = "cpu",
) -> MergeOutcome:
    """Merge task deltas held in memory with a registered method.

    Args:
        method: A name from ``starmerge methods``.
        task_deltas: One mapping ``parameter key -> Delta`` per task; a key that a task lacks is
            a zero delta for that task.
        parameters: Method hyperparameters (validated; defaults filled).
        weights: Per-task weights, for methods that take them (``task_arithmetic``).
        device: Where the method computes (``cpu`` or ``cuda``).

    Returns:
        The merged deltas and statistics.

    Raises:
        ConfigError: Unknown method or bad parameters.
        InputError: Tasks whose deltas for one key have different shapes.

    Example:
        >>> out = merge_deltas("star", [adapter_a, adapter_b], {"eta": 40})
        >>> out.deltas["model.layers.0.self_attn.q_proj.weight"].to_dense()
    """
    from starmerge.methods import METHODS
    from starmerge.pipeline import fit_state, merge_params

    spec = METHODS.get(method)
    given = dict(parameters or {})
    if weights is not None:
        if "weights" not in spec.params:
            raise ConfigError([f"{method} does not use per-model weights, got weights={weights}"])
        given["weights"] = [float(w) for w in weights]
    params = spec.resolve(given)
    shapes = _shapes(task_deltas)

    def read(key: str) -> list[Delta | None]:
        return [t.get(key) for t in task_deltas]

    state = fit_state(spec, params, len(task_deltas), shapes, read, device=device)
    merged, per_param = {}, {}
    for key, result in merge_params(spec, params, state, shapes, read, device=device):
        merged[key] = result.delta
        if result.stats:
            per_param[key] = dict(result.stats)
    summary = state.summary() if state is not None else {}
    return MergeOutcome(merged, {"state": summary, "per_parameter": per_param})


def _shapes(task_deltas: Sequence[Mapping[str, Delta]]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i, task in enumerate(task_deltas):
        for key, delta in task.items():
            if shapes.setdefault(key, delta.shape) != delta.shape:
                raise InputError(
                    f"task {i} has {key} of shape {delta.shape} but an earlier task has "
                    f"{shapes[key]}; all tasks must be fine-tunes of the same base model"
                )
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
    from starmerge.config import load_config
    from starmerge.engine import run_merge
    from starmerge.plan import make_plan

    cfg = load_config(config, overrides)
    plan = make_plan(cfg)
    return run_merge(plan, Path(out_dir), overwrite=overwrite, device=device, progress=progress)
