"""Run ``starmerge extract``: survey, extract module by module, write the adapter and manifest.

Two streaming passes over the fine-tune, one parameter of each model in memory at a time:

1. the parameters that are not LoRA targets are compared with the base (changed or not), so a
   refusal (a changed norm without a flag) comes before anything is created;
2. inside :func:`~starmerge.io.output_dir.atomic_output_dir`, each target's delta is replaced
   by its truncated-SVD factors; then the adapter is written by
   :func:`~starmerge.io.adapter_writer.write_adapter`, plus the ``modules_to_save`` tensors, and
   ``starmerge.json``. Any failure leaves ``OUT_DIR`` as it was.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from tqdm.auto import tqdm

from starmerge.engine import resolve_device
from starmerge.errors import InputError
from starmerge.extract import (
    ExtractOptions,
    Inputs,
    Layout,
    check_stored,
    extract_matrix,
    layout,
    modules_to_save,
    open_inputs,
)
from starmerge.io.adapter import ADAPTER_CONFIG, PREFIX
from starmerge.io.adapter_writer import ADAPTER_FILE, write_adapter
from starmerge.io.hashing import hash_files
from starmerge.io.output_dir import (
    atomic_output_dir,
    check_output_dir,
    check_outside_inputs,
    write_guard,
)
from starmerge.manifest import versions, write_manifest
from starmerge.memory import PeakMemory, max_rss_bytes
from starmerge.tensors.delta import LowRank


def extract_command(paths: tuple[str, ...], flags: dict[str, Any]) -> str:
    """Run ``starmerge extract`` from the CLI's arguments and flags; return its summary line.

    Raises:
        InputError: As :func:`run_extract`, and for paths or flags that do not fit together.
    """
    base, model, out_dir = split_paths(paths, flags["base"], flags["model"])
    save, skip = flags["modules_to_save"], flags["skip_non_matrix"]
    if save and skip:
        raise InputError("give at most one of --modules-to-save and --skip-non-matrix")
    targets = flags["target_modules"]
    options = ExtractOptions(
        rank=flags["rank"],
        energy=flags["energy"],
        max_rank=flags["max_rank"],
        target_modules=None
        if targets is None
        else tuple(filter(None, map(str.strip, targets.split(",")))),
        non_matrix="save" if save else "skip" if skip else "refuse",
        dtype=flags["dtype"],
        device=flags["device"],
    )
    m = run_extract(
        base, model, out_dir, options, overwrite=flags["overwrite"], progress=not flags["quiet"]
    )
    ranks = [x["rank"] for x in m["modules"].values()]
    return (
        f"extracted {len(ranks)} modules (rank {min(ranks)}-{max(ranks)}, energy kept min "
        f"{m['energy_kept_min']:.4f}) into {out_dir}; unchanged {len(m['unchanged'])}, skipped "
        f"{len(m['skipped'])}, saved whole {len(m['modules_to_save'])}, outside --target-modules "
        f"{len(m['excluded'])} (all listed in starmerge.json)"
    )


def split_paths(
    paths: tuple[str, ...], base: str | None, model: str | None
) -> tuple[str, str, Path]:
    """``(BASE, FINETUNED, OUT_DIR)`` from the positional form or ``--base``/``--model``.

    Raises:
        InputError: Neither form, or a mix of them.

    Example:
        >>> split_paths(("b", "ft", "out"), None, None)
        ('b', 'ft', PosixPath('out'))
    """
    if base is None and model is None and len(paths) == 3:
        return paths[0], paths[1], Path(paths[2])
    if base is not None and model is not None and len(paths) == 1:
        return base, model, Path(paths[0])
    raise InputError(
        f"give BASE FINETUNED OUT_DIR, or --base BASE --model FINETUNED OUT_DIR; got "
        f"{len(paths)} paths {list(paths)}, --base {base!r}, --model {model!r}"
    )


def run_extract(
    base: str,
    model: str,
    out_dir: Path,
    options: ExtractOptions,
    *,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Extract a LoRA adapter of ``model`` - ``base`` into ``out_dir``; return the manifest.

    Args:
        base: The base model (a local path or a Hub id).
        model: The full fine-tune of ``base`` (a local path or a Hub id).
        out_dir: The output directory (a PEFT adapter directory plus ``starmerge.json``).
        options: Rank or energy, targets, the non-matrix policy, dtype and device.
        overwrite: Replace a non-empty ``out_dir``.
        progress: Show a progress bar.

    Raises:
        InputError: Bad options, unreadable or non-finite inputs, changed parameters that a
            LoRA cannot hold (without a flag), or nothing to extract.
        OutputError: ``out_dir`` overlaps an input, is not empty without ``overwrite``, or
            cannot be written. In every case ``out_dir`` is left as it was.

    Example:
        >>> run_extract("base", "ft", Path("out"), ExtractOptions(rank=16))  # doctest: +SKIP
    """
    options.check()
    device = resolve_device(options.device)
    inputs = open_inputs(base, model)
    check_outside_inputs(out_dir, inputs.paths())
    check_output_dir(out_dir, overwrite=overwrite)
    plan = layout(inputs, options.target_modules)
    start = time.perf_counter()
    with PeakMemory() as memory, ThreadPoolExecutor(max_workers=1) as pool:
        record = _survey(inputs, plan, options)  # refusals first, before hashing starts
        hashes = pool.submit(_hashes, inputs)  # hashlib frees the GIL: overlaps the SVDs
        with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
            modules = _extract(inputs, plan, options, device, record, progress)
            dtype = getattr(torch, options.dtype) if options.dtype else inputs.default_dtype()
            check_stored(modules, dtype)
            write_adapter(
                tmp,
                modules,
                base_model=inputs.base_name(),
                task_type=inputs.task_type,
                template_config=None,
                dtype=dtype,
                fan_in_fan_out=inputs.fan_in_fan_out,
            )
            _add_saved(tmp, inputs, record["saved"], dtype)
            record.update(wall_time_s=round(time.perf_counter() - start, 3))
            manifest = _manifest(inputs, options, dtype, record, hashes.result(), memory)
            write_manifest(tmp, manifest)
    return manifest


def _hashes(inputs: Inputs) -> dict[str, dict[str, str]]:
    return {"base": hash_files(inputs.task.base.files), "model": hash_files(inputs.task.files)}


def _survey(inputs: Inputs, plan: Layout, options: ExtractOptions) -> dict[str, Any]:
    """Pass 1: which non-target parameters changed, and what the options do with them.

    Returns:
        The manifest's record so far: ``unchanged`` keys, ``skipped`` (key -> reason),
        ``excluded`` (changed 2-D weights outside ``--target-modules``), ``saved`` modules.
    """
    unchanged: list[str] = []
    changed: dict[str, str] = {}
    excluded: list[str] = []
    for key in [*plan.other, *plan.excluded]:
        if inputs.unchanged(key):
            unchanged.append(key)
        elif key in plan.other:
            changed[key] = plan.other[key]
        else:
            excluded.append(key)
    if options.non_matrix == "refuse" and changed:
        raise _refusal(changed)
    saved = modules_to_save(inputs, changed) if options.non_matrix == "save" else {}
    skipped = changed if options.non_matrix == "skip" else {}
    # a target whose module is saved whole (its bias changed) is not also extracted
    plan.targets = [k for k in plan.targets if k.rpartition(".")[0] not in saved]
    return {"unchanged": unchanged, "skipped": skipped, "excluded": excluded, "saved": saved}


def _refusal(changed: dict[str, str]) -> InputError:
    """The error for ``changed`` (key -> reason), parameters a LoRA cannot hold, without a flag."""
    shown = ", ".join(f"{k} ({why})" for k, why in list(changed.items())[:5])
    more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
    return InputError(
        f"the fine-tune changed parameters that a LoRA adapter cannot hold as low-rank factors "
        f"({len(changed)}): {shown}{more}; pass --modules-to-save (save them whole in the "
        "adapter) or --skip-non-matrix (leave them out), which starmerge.json then lists"
    )


def _is_zero(delta: torch.Tensor) -> bool:
    return not bool(torch.any(delta))


def _extract(
    inputs: Inputs,
    plan: Layout,
    options: ExtractOptions,
    device: str,
    record: dict[str, Any],
    progress: bool,
) -> dict[str, LowRank]:
    """Pass 2: each changed target's truncated SVD; rank and energy per module into ``record``."""
    modules: dict[str, LowRank] = {}
    per_module: dict[str, dict[str, Any]] = {}
    for key in tqdm(plan.targets, desc="extract", disable=not progress, unit="module"):
        delta = inputs.task.get(key).tensor  # (out, in), or (in, out) for Conv1D; float32
        if _is_zero(delta):
            record["unchanged"].append(key)
            continue
        low, kept = extract_matrix(delta.to(device), options)
        del delta
        modules[key] = LowRank(low.b.cpu(), low.a.cpu(), 1.0)
        module = key.removesuffix(".weight")
        per_module[module] = {"rank": low.rank, "energy_kept": kept, "shape": list(low.shape)}
    if not modules:
        raise InputError(
            f"nothing to extract: no LoRA target of {inputs.ft_path} differs from the base model "
            f"{inputs.base_path} ({len(plan.targets)} targets compared); check that the two "
            "models differ, or widen --target-modules"
        )
    record["modules"] = per_module
    return modules


def _add_saved(tmp: Path, inputs: Inputs, saved: dict[str, str], dtype: torch.dtype) -> None:
    """Add the saved modules' fine-tuned parameters to the adapter, and list them in its config.

    PEFT stores a ``modules_to_save`` module's parameters under ``base_model.model.<key>``.
    """
    if not saved:
        return
    weights, config_file = tmp / ADAPTER_FILE, tmp / ADAPTER_CONFIG
    tensors = safetensors.torch.load_file(str(weights))
    for module, source in saved.items():
        for key in inputs.task.keys():
            owner, _, leaf = key.rpartition(".")
            if owner == source:
                # a copy each: lm_head may be saved from the same tensor as the embedding
                tensors[f"{PREFIX}{module}.{leaf}"] = inputs.task.ft.get(key).to(dtype, copy=True)
    config = json.loads(config_file.read_text())
    config["modules_to_save"] = sorted(saved)
    with write_guard(weights):
        safetensors.torch.save_file(tensors, str(weights), metadata={"format": "pt"})
    with write_guard(config_file):
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _manifest(
    inputs: Inputs,
    options: ExtractOptions,
    dtype: torch.dtype,
    record: dict[str, Any],
    hashes: dict[str, dict[str, str]],
    memory: PeakMemory,
) -> dict[str, Any]:
    """``starmerge.json``: options, inputs with sha256, per-module rank and energy, lists."""
    energies = [m["energy_kept"] for m in record["modules"].values()]
    return {
        "format": "starmerge-extract/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "extract",
        "options": {
            **asdict(options),
            "dtype": str(dtype).removeprefix("torch."),
            "fan_in_fan_out": inputs.fan_in_fan_out,
        },
        "base_model": _entry(inputs.base_source, inputs.base_path, hashes["base"]),
        "inputs": [{"kind": "model", **_entry(inputs.ft_source, inputs.ft_path, hashes["model"])}],
        "modules": record["modules"],
        "energy_kept_min": min(energies),
        "unchanged": record["unchanged"],
        "skipped": record["skipped"],
        "modules_to_save": sorted(record["saved"]),
        "excluded": record["excluded"],
        "versions": versions(),
        "wall_time_s": record["wall_time_s"],
        "peak_memory_bytes": memory.peak,
        "max_rss_bytes": max_rss_bytes(),
    }


def _entry(source: str, path: Path, sha256: dict[str, str]) -> dict[str, Any]:
    return {"source": source, "path": str(path), "sha256": sha256}
