"""Execute a plan: fit, merge parameter by parameter, write, and record the manifest."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from starmerge.errors import InputError, short_repr
from starmerge.io.adapter_writer import stored_factors, write_adapter
from starmerge.io.output_dir import (
    atomic_output_dir,
    check_output_dir,
    check_outside_inputs,
    copy_model_files,
    parse_size,
)
from starmerge.io.shards import StreamingShardWriter, TensorPlan
from starmerge.manifest import (
    build_manifest,
    input_hashes,
    input_paths,
    layout_stats,
    write_manifest,
    write_model_card,
)
from starmerge.memory import PeakMemory, bounded_allocator, trim_heap
from starmerge.methods.contract import Merged
from starmerge.pipeline import fit_state, merge_params
from starmerge.plan import Plan
from starmerge.settings import count_layers
from starmerge.stats.plan_data import plan_statistics
from starmerge.tensors.delta import LowRank
from starmerge.tensors.factors import as_lowrank
from starmerge.tensors.finite import all_finite
from starmerge.tensors.threads import one_thread


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError(
            "--device cuda was given but no CUDA device is available; use --device cpu"
        )
    if device not in ("cpu", "cuda"):
        raise InputError(f"--device must be cpu, cuda or auto, got {device!r}")
    return device


def run_merge(
    plan: Plan,
    out_dir: Path,
    *,
    overwrite: bool = False,
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Merge and write ``plan`` into ``out_dir`` atomically; return the manifest.

    Raises:
        OutputError: ``out_dir`` is or overlaps an input, is not empty without ``overwrite``,
            or writing failed (``out_dir`` is then left exactly as it was).
    """
    check_output(plan, out_dir, overwrite=overwrite)
    device = resolve_device(device)
    bounded_allocator()  # freed tensors go back to the system: the peak is the live tensors'
    start = time.perf_counter()
    # Hash the inputs for the manifest in a thread while the merge runs (hashlib frees the GIL).
    with ThreadPoolExecutor(max_workers=1) as pool, PeakMemory() as memory:
        hashes = pool.submit(input_hashes, plan)
        return _run(plan, out_dir, overwrite, device, progress, start, hashes, memory)


def check_output(plan: Plan, out_dir: Path, *, overwrite: bool) -> None:
    """Check ``out_dir`` before anything is created (a merge and ``--dry-run`` alike).

    Raises:
        OutputError: ``out_dir`` is an input, contains one or lies inside one (even with
            ``overwrite``); or it is a file, or not empty without ``overwrite``.
    """
    check_outside_inputs(out_dir, input_paths(plan))
    check_output_dir(out_dir, overwrite=overwrite)


def _run(
    plan: Plan,
    out_dir: Path,
    overwrite: bool,
    device: str,
    progress: bool,
    start: float,
    hashes: Future,
    memory: PeakMemory,
) -> dict[str, Any]:
    state = fit_state(
        plan.method,
        plan.params,
        len(plan.tasks),
        plan.shapes,
        plan.read,
        statistics=plan_statistics(plan, device=device, progress=progress),  # the data step, cached
        base=_base_reader(plan),
        device=device,
        progress=progress,
        space=plan.config.space,
    )
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        if plan.config.output.format == "model":
            stats = _write_model(plan, state, tmp, device, progress)
        else:
            stats = _write_adapter(plan, state, tmp, device, progress)
        elapsed = time.perf_counter() - start
        manifest = build_manifest(plan, state, stats, elapsed, memory, hashes.result())
        write_manifest(tmp, manifest)
        if plan.config.output.format == "model":
            write_model_card(tmp, manifest)
    return manifest


def _n_layers(plan: Plan) -> int | None:
    """The model's blocks, for layer gradients (mergekit counts the model's, not the adapters')."""
    return count_layers(plan.base.keys()) if plan.base is not None else None


def _base_reader(plan: Plan) -> Callable[[str], torch.Tensor] | None:
    """The base model's tensor of a key, for methods that declare ``needs_base``."""
    return plan.base.get if plan.base is not None else None


def _write_model(plan: Plan, state: Any, tmp: Path, device: str, progress: bool) -> dict:
    base = plan.base
    keys = list(base.keys())
    dtypes = {k: plan.out_dtype if base.dtype(k).is_floating_point else base.dtype(k) for k in keys}
    tensors = [TensorPlan(k, tuple(base.shape(k)), dtypes[k]) for k in keys]
    writer = StreamingShardWriter(tmp, tensors, parse_size(plan.config.output.max_shard_size))
    artifacts = _artifact_writer(plan, tmp)
    merged = merge_params(
        plan.method,
        plan.params,
        state,
        plan.shapes,
        plan.read,
        keys=[k for k in keys if k in plan.shapes],
        base=_base_reader(plan),
        device=device,
        space=plan.config.space,
        n_layers=_n_layers(plan),
    )
    per_param: dict[str, dict] = {}
    for key in tqdm(keys, desc="merge", disable=not progress, unit="param"):
        if key in plan.shapes:
            merged_key, result = next(merged)
            assert merged_key == key  # merge_params follows the given key order
            trim_heap()  # the kernel's freed small blocks, before the write's buffers exist
            # The base tensor is read (into a new buffer) only now, not held during the merge.
            weight = base.get(key).to(torch.float32) + result.delta.to_dense(torch.float32)
            per_param[key] = dict(result.stats)
            _write_artifacts(artifacts, plan, key, result)
            del result  # not held while the next parameter is read and merged
        else:
            weight = base.get(key)
        weight = weight.to(dtypes[key])
        _check_output_finite(plan, key, weight, from_base=True)
        writer.write(key, weight)
        del weight
        trim_heap()  # the freed small blocks of this parameter, before the next one
    writer.close()
    if artifacts is not None:
        artifacts.close()
    copy_model_files(plan.base_path, tmp)
    return {"per_parameter": per_param, **layout_stats(plan)}


def _check_output_finite(
    plan: Plan, key: str, *tensors: torch.Tensor, from_base: bool = False
) -> None:
    """The last check before ``key`` is written: finite in the output dtype (no overflow).

    One reduction per written tensor; only when it fails is the base's own tensor (``from_base``)
    read again, so that a non-finite base model is named as the cause.
    """
    if all(all_finite(t) for t in tensors):
        return
    if from_base and not all_finite(plan.base.get(key)):
        raise InputError(
            f"base model {plan.base_path}: tensor '{key}' contains NaN or Inf values; "
            "give a base model with finite weights"
        )
    raise InputError(
        f"the merged '{key}' is not finite in {str(plan.out_dtype).removeprefix('torch.')} "
        f"({plan.method.name}, parameters {short_repr(plan.params)}); lower the scaling or "
        "weights, or set output.dtype: float32"
    )


def _write_adapter(plan: Plan, state: Any, tmp: Path, device: str, progress: bool) -> dict:
    modules: dict[str, LowRank] = {}
    per_param: dict[str, dict] = {}
    energies = []
    artifacts = _artifact_writer(plan, tmp)
    results = merge_params(
        plan.method,
        plan.params,
        state,
        plan.shapes,
        plan.read,
        base=_base_reader(plan),
        device=device,
        space=plan.config.space,
        n_layers=_n_layers(plan),
    )
    # An exactly low-rank merge is factor work only: one thread (tensors/threads.py).
    factors_only = plan.method.exact_lowrank(plan.params) or plan.config.space != "full"
    with one_thread(factors_only):
        # Factor work frees only small factors, which the next parameter's reads reuse: one
        # trim before the write; a trim per parameter would have its pages faulted in again.
        _merge_modules(
            plan, results, progress, modules, per_param, energies, artifacts, not factors_only
        )
        if factors_only:
            trim_heap()
        if artifacts is not None:
            artifacts.close()
        first = plan.tasks[0].source
        flag, modules = _writer_layout(plan, modules)
        write_adapter(
            tmp,
            modules,
            base_model=getattr(first, "base_model", None),
            task_type=getattr(first, "task_type", None),
            template_config=getattr(first, "config", None),
            dtype=plan.out_dtype,
            fan_in_fan_out=flag,
        )
    summary = {"per_parameter": per_param, **layout_stats(plan)}
    if energies:
        summary["svd_energy_kept_min"] = min(energies)
    return summary


def _merge_modules(
    plan: Plan, results, progress: bool, modules, per_param, energies, artifacts, trim: bool
):
    """Consume the merge: each result as the factors to write, its stats and artifacts.

    ``trim``: give the heap's free pages back after each parameter (a dense merge's buffers).
    """
    for key, result in tqdm(
        results, total=len(plan.shapes), desc="merge", disable=not progress, unit="param"
    ):
        lowrank, energy = as_lowrank(key, result.delta, plan.config.output.rank)
        _check_output_finite(plan, key, *stored_factors(lowrank, plan.out_dtype))
        stats = dict(result.stats)
        if energy is not None:
            stats["svd_energy_kept"] = energy
            energies.append(energy)
        per_param[key] = stats
        _write_artifacts(artifacts, plan, key, result)
        modules[key] = lowrank
        del result  # a dense result is not held while the next one is merged
        if trim:
            trim_heap()


def _writer_layout(plan: Plan, modules: dict[str, LowRank]) -> tuple[bool, dict[str, LowRank]]:
    """The output's ``fan_in_fan_out`` flag, and each module in the layout the writer expects.

    A module's merged delta is in its inputs' layout (transposed where ``io.adapter`` transposed
    it). The flag: any module transposed with a base model (its layers are ``Conv1D``), else
    the first adapter's. ``write_adapter`` transposes every module back when the flag is set.
    """
    first = plan.tasks[0].source
    flips = {
        key: any(key in getattr(t.source, "transposed", ()) for t in plan.tasks) for key in modules
    }
    flag = any(flips.values()) if plan.base is not None else bool(first.fan_in_fan_out)
    out = {
        key.removesuffix(".weight"): d if flips[key] == flag else LowRank(d.a.T, d.b.T, d.scale)
        for key, d in modules.items()
    }
    return flag, out


def _artifact_writer(plan: Plan, tmp: Path):
    """A writer for the method's per-parameter artifacts (masks), planned from shapes; or None."""
    if not plan.method.artifacts:
        return None
    n_tasks = len(plan.tasks)
    tensors = [
        TensorPlan(f"{key}::{name}", tuple(shape_fn(shape, n_tasks)), dtype)
        for key, shape in plan.shapes.items()
        for name, (shape_fn, dtype) in plan.method.artifacts.items()
    ]
    size = parse_size(plan.config.output.max_shard_size)
    return StreamingShardWriter(tmp, tensors, size, prefix="artifacts")


def _write_artifacts(writer, plan: Plan, key: str, result: Merged) -> None:
    """Write ``key``'s artifacts in the order ``_artifact_writer`` planned them."""
    if writer is None:
        return
    for name in plan.method.artifacts:
        writer.write(f"{key}::{name}", result.artifacts[name])
