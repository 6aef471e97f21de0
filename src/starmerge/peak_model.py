"""Predicted peak memory of a merge: the engine's buffers around each method's footprint.

What is counted is anonymous memory (``RssAnon``, what :mod:`starmerge.memory` measures). The
checkpoints are read tensor by tensor into new buffers (``io/safetensors_reader.py``: positioned
reads, no memory map), so a tensor read costs its stored bytes while it is held; statistics files
are memory-mapped and cost nothing until computed on. Per merged parameter (P = one float32 copy
of it, T tasks):

- inputs: a full fine-tune's delta ``ft - base`` is P per task, and while one task is read its
  two read buffers (2 P more; 3 P when the checkpoints are not float32 and are cast); LoRA
  factors cost next to nothing, and a kernel that needs entries gets each task densified (P,
  scaled in place); in ``core``/``knots`` space each task's coordinates and the basis (the
  factors' QRs), except that a ``knots`` merge by a method that takes low rank gets the
  coordinates as factors (``SpaceBasis.factored_coordinates``: the basis only);
- fit passes: the inputs plus the method's declared fit footprint (plus the base tensor as read
  for a method that declares ``needs_base``);
- merge: the inputs plus the method's kernel footprint (and that base tensor, which the pipeline
  holds with the result); then, with the inputs and the result still held:
  - model output: the base tensor as read (and its float32 cast when it is not float32), the
    densified result of a low-rank merge, the sum, and its cast to the output dtype (the writer
    hands the tensor's own buffer to the file);
  - adapter output: a dense result's thin SVD to ``output.rank`` (LAPACK's workspace); each
    module's kept factors stay until the adapter is written, and writing copies them twice
    (the scaled ``B`` and safetensors' serialised bytes);
- model output also writes the base's other tensors: each read, and cast to the output dtype
  when needed;
- a method with a fit step in ``core``/``knots`` space keeps every parameter's basis from its
  first pass until the merge takes it (``space_cache.py``): counted whole from the fit on.

The pipeline's loops and the engine drop a parameter's deltas and result (their loop variables
are deleted) before the next parameter is read, so parameters do not overlap. The peak is the
largest of these over parameters, plus the adapter factors held so far. The Python and torch
runtime itself (about 150 MiB) is not counted. The allocator's slack is small because the
engine fixes glibc's mmap threshold at 1 MiB (:func:`starmerge.memory.bounded_allocator`):
freed tensors go back to the system at once.
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
    cached = _space_cache_bytes(method, keys, space)
    peak, held = 0.0, cached
    for name, key in keys.items():
        p = _parts(method, params, n_tasks, key, output, space, (output.base or {}).get(name))
        # The pipeline and the engine drop a parameter's buffers before the next one is read.
        read = p.inputs + p.reading
        merge = max(read, p.inputs + p.kernel, p.inputs + p.kept + p.write)
        if p.fit is not None:
            peak = max(peak, cached + max(read, p.inputs + p.fit))
        peak = max(peak, held + merge)
        held += p.retained
    if output.format == "adapter":
        peak = max(peak, held + 2 * _stored_bytes(keys, n_tasks, method, params, output, space))
    for numel, itemsize, merged in (output.base or {}).values():
        if not merged:  # copied through: read, and cast when the dtype changes
            cast = numel * output.itemsize if itemsize != output.itemsize else 0
            peak = max(peak, numel * itemsize + cast)
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
        held = coords.copies(n_tasks) + basis
        if space == "knots" and "lowrank" in method.accepts:  # the merge: factored coordinates
            factored = MemoryCase(n_tasks, core, r, params)
            return factored, (held if method.fit is not None else basis), 0.0
        return coords, held, 0.0
    if key.lora_rank and "lowrank" in method.accepts and full.matrix:
        return MemoryCase(n_tasks, key.shape, key.lora_rank, params), 0.0, 0.0
    if key.lora_rank:  # densified per task: the product, scaled in place
        return full, full.copies(n_tasks), 0.0
    # A full fine-tune: both tensors read into new buffers (and cast), then subtracted.
    return full, full.copies(n_tasks), full.copies(3 if key.cast else 2)


def _parts(
    method: Method,
    params: Mapping[str, Any],
    n_tasks: int,
    key: KeyInputs,
    output: OutputModel,
    space: str,
    base: tuple[int, int, bool] | None,
) -> _Parts:
    case, inputs, reading = _case(method, params, n_tasks, key, space)
    foot = (method.memory or default_footprint)(case)
    full = MemoryCase(n_tasks, key.shape)
    read_base = full.copies(1) if base is None else base[0] * base[1]  # the base tensor as read
    given = read_base if method.needs_base else 0.0  # handed to the kernel and the fitter
    kernel = foot.kernel + given
    fit = None if method.fit is None else foot.fit + given
    lowrank_result = bool(key.lora_rank) and (space != "full" or method.exact_lowrank(params))
    result = MemoryCase(n_tasks, key.shape, key.lora_rank).factors(1) if lowrank_result else 0
    artifacts = _artifact_bytes(method, key.shape, n_tasks)
    kept = (result or full.copies(1)) + artifacts + given  # the pipeline holds its base too
    if output.format == "model":  # the base as read (and cast), the sum, its cast for the file
        cast_out = full.numel * output.itemsize if output.itemsize != F32 else 0.0
        cast = base is not None and base[1] != F32  # added to the merge in float32
        densify = (
            read_base + full.copies(2 if lowrank_result else 1) + full.copies(1 if cast else 0)
        )
        write = max(densify, full.copies(1) + cast_out)
        return _Parts(inputs, reading, kernel, fit, kept, write, 0.0)
    if lowrank_result:
        return _Parts(inputs, reading, kernel, fit, kept, result, result)
    m, n = full.dims
    rank = min(output.rank or 0, m, n)  # truncated_svd keeps copies of the kept factors only
    return _Parts(inputs, reading, kernel, fit, kept, full.svd(F32), F32 * (m + n) * rank)


def _space_cache_bytes(method: Method, keys: Mapping[str, KeyInputs], space: str) -> float:
    """The bases a fit step's first pass keeps for the merge: R x R float64 blocks per key."""
    if space == "full" or method.fit is None:
        return 0.0
    blocks = 4 if space == "core" else 2
    return sum(
        blocks * key.lora_rank**2 * F64
        for key in keys.values()
        if key.lora_rank and len(key.shape) == 2
    )


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
