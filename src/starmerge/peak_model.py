"""Predicted peak memory of a merge: the engine's buffers around each method's footprint.

What is counted is anonymous memory (``RssAnon``, what :mod:`starmerge.memory` measures):
checkpoint tensors are read with positioned reads (``io/safetensors_reader.py``), so a model
output holds each base tensor as read (its stored bytes) beside the merge. Per merged parameter
(P = one float32 copy of it, T tasks):

- inputs: a full fine-tune's delta ``ft - base`` is P per task (its reads cast first when the
  checkpoints are not float32: 2 P more while one task is read); LoRA factors cost nothing, and a
  kernel that needs entries gets each task densified (P, and P more while it is scaled);
- fit passes: the inputs plus the method's declared fit footprint;
- merge: the inputs plus the method's kernel footprint; then, with the inputs and the result
  still held:
  - model output: the base cast to float32 when it is not, the densified result of a low-rank
    merge (2 P while it is scaled), the sum, its cast to the output dtype and the bytes handed to
    the file;
  - adapter output: a dense result's thin SVD to ``output.rank`` (LAPACK's workspace); each
    module's factors stay until the adapter is written (today the whole ``V^T`` of that SVD,
    which ``factors.truncated_svd`` slices without copying), and writing copies them twice
    (the scaled ``B`` and safetensors' serialised bytes);
- model output also writes the base's other tensors: each cast to the output dtype when needed
  and copied once into the file.

A parameter is read while the previous one's deltas and result are still held (the pipeline's
generator and the engine's loop variable release them only once the next ones exist), so a read
costs both parameters. The peak is the largest of these over parameters, plus the adapter
factors held so far. The Python and torch runtime itself (about 150 MiB) is not counted, nor
allocator slack: glibc keeps freed blocks under its mmap threshold (which grows up to 32 MiB)
in its heap, so merges of tensors smaller than that can sit above the prediction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starmerge.methods.base import Method
from starmerge.methods.footprint import F32, F64, MemoryCase, default_footprint


@dataclass(frozen=True)
class KeyInputs:
    """How one merged parameter's task deltas reach the method.

    Args:
        shape: The parameter's shape.
        lora_rank: Sum of the tasks' LoRA ranks when every task gives LoRA factors for it
            (0: some task is a full fine-tune).
        cast: A full fine-tune or its base is stored in another dtype than float32.
    """

    shape: tuple[int, ...]
    lora_rank: int = 0
    cast: bool = False


@dataclass(frozen=True)
class OutputModel:
    """What the output costs.

    Args:
        format: ``model`` or ``adapter``.
        itemsize: Bytes per entry of the output dtype.
        rank: ``output.rank`` (adapter output of a dense merge).
        base: Model output: every base tensor's ``(numel, stored itemsize, merged)``.
    """

    format: str = "model"
    itemsize: int = F32
    rank: int | None = None
    base: Mapping[str, tuple[int, int, bool]] | None = None


@dataclass(frozen=True)
class _Parts:
    """One merged parameter's buffers, in bytes."""

    inputs: float  # the task deltas as the kernel gets them
    reading: float  # extra while they are read (casts, densifying)
    kernel: float  # the kernel's declared footprint
    fit: float | None  # the fit step's declared footprint (None: no fit step)
    kept: float  # the kernel's result and artifacts
    write: float  # beyond inputs and result while the output is written
    retained: float  # what stays until the end (adapter factors)


def peak_bytes(
    method: Method,
    params: Mapping[str, Any],
    n_tasks: int,
    keys: Mapping[str, KeyInputs],
    output: OutputModel,
    space: str = "full",
) -> int:
    """Predicted peak anonymous memory of the merge in bytes, beyond the runtime.

    Args:
        method: The method (its ``memory`` declaration, what it accepts, its fit step).
        params: Its resolved parameters.
        n_tasks: Number of tasks T.
        keys: The merged parameters in the order the engine merges them.
        output: What the output costs.
        space: The merge space (``full``, ``core``, ``knots``).

    Example:
        >>> from starmerge.methods import METHODS
        >>> peak_bytes(METHODS.get("task_arithmetic"), {}, 2, {"w": KeyInputs((1024, 1024))},
        ...              OutputModel("model", base={"w": (1024 * 1024, 4, True)})) // 2**20
        20
    """
    peak, held = 0.0, 0.0
    prev = _Parts(0, 0, 0, None, 0, 0, 0)
    for name, key in keys.items():
        base = (output.base or {}).get(name)
        base_cast = base is not None and base[1] != F32  # added to the merge in float32
        p = _parts(method, params, n_tasks, key, output, space, base_cast, base)
        # The pipeline reads a parameter while the previous one's deltas and result are held.
        read = prev.inputs + prev.kept + p.inputs + p.reading
        merge = max(read, prev.kept + p.inputs + p.kernel, p.inputs + p.kept + p.write)
        if p.fit is not None:
            peak = max(peak, prev.inputs + p.inputs + p.reading, p.inputs + p.fit)
        peak = max(peak, held + merge)
        held += p.retained
        prev = p
    if output.format == "adapter":
        peak = max(peak, held + 2 * _stored_bytes(keys, n_tasks, method, params, output, space))
    for numel, itemsize, merged in (output.base or {}).values():
        if not merged:  # copied through: read into memory, cast when the dtype changes, written
            out = numel * output.itemsize
            peak = max(peak, numel * itemsize + (0 if itemsize == output.itemsize else out))
    return int(peak)


def _case(
    method: Method, params: Mapping[str, Any], n_tasks: int, key: KeyInputs, space: str
) -> tuple[MemoryCase, float, float]:
    """The kernel's view of ``key``, the inputs it holds and the reading's extra transient."""
    full = MemoryCase(n_tasks, key.shape, params=params)
    if space != "full" and key.lora_rank and full.matrix:  # coordinates in a shared basis
        r = key.lora_rank
        core = (r, r) if space == "core" else (r, key.shape[1])
        basis = MemoryCase(n_tasks, key.shape, r).factors(2, F64)  # the factors' QRs
        coords = MemoryCase(n_tasks, core, params=params)
        return coords, coords.copies(n_tasks) + basis, 0.0
    if key.lora_rank and "lowrank" in method.accepts and full.matrix:
        return MemoryCase(n_tasks, key.shape, key.lora_rank, params), 0.0, 0.0
    if key.lora_rank:  # densified per task: the product, then its scaled copy
        return full, full.copies(n_tasks), full.copies(1)
    return full, full.copies(n_tasks), full.copies(2 if key.cast else 0)


def _parts(
    method: Method,
    params: Mapping[str, Any],
    n_tasks: int,
    key: KeyInputs,
    output: OutputModel,
    space: str,
    base_cast: bool,
    base: tuple[int, int, bool] | None = None,
) -> _Parts:
    case, inputs, reading = _case(method, params, n_tasks, key, space)
    foot = (method.memory or default_footprint)(case)
    fit = None if method.fit is None else foot.fit
    full = MemoryCase(n_tasks, key.shape)
    lowrank_result = bool(key.lora_rank) and (space != "full" or method.exact_lowrank(params))
    result = MemoryCase(n_tasks, key.shape, key.lora_rank).factors(1) if lowrank_result else 0
    artifacts = _artifact_bytes(method, key.shape, n_tasks)
    kept = (result or full.copies(1)) + artifacts
    if output.format == "model":  # the base as read, its float32 copy, the sum, the file's bytes
        out = full.numel * output.itemsize
        read = full.numel * (base[1] if base is not None else F32)  # positioned read: anonymous
        densify = full.copies(2 if lowrank_result else 1) + full.copies(1 if base_cast else 0)
        densify += read
        write = max(densify, full.copies(1) + max(out, artifacts), 2 * out)
        return _Parts(inputs, reading, foot.kernel, fit, kept, write, 0.0)
    if lowrank_result:
        return _Parts(inputs, reading, foot.kernel, fit, kept, result, result)
    m, n = full.dims
    k, rank = min(m, n), min(output.rank or 0, min(m, n))
    return _Parts(inputs, reading, foot.kernel, fit, kept, full.svd(F32), F32 * (m * rank + k * n))


def _stored_bytes(
    keys: Mapping[str, KeyInputs],
    n_tasks: int,
    method: Method,
    params: Mapping[str, Any],
    output: OutputModel,
    space: str,
) -> float:
    """The adapter's factors as written: ``(m + n) x rank`` per module in the output dtype."""
    total = 0.0
    for key in keys.values():
        m, n = MemoryCase(n_tasks, key.shape).dims
        exact = bool(key.lora_rank) and (space != "full" or method.exact_lowrank(params))
        rank = key.lora_rank if exact else min(output.rank or 0, m, n)
        total += (m + n) * rank * output.itemsize
    return total


def _artifact_bytes(method: Method, shape: tuple[int, ...], n_tasks: int) -> float:
    """The per-parameter artifacts a method returns next to its result (masks)."""
    total = 0.0
    for shape_fn, dtype in method.artifacts.values():
        numel = 1
        for d in shape_fn(shape, n_tasks):
            numel *= d
        total += numel * dtype.itemsize
    return total
