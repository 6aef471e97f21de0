"""The only loop over parameters: fit passes, then the merge pass.

``fit_state`` streams every parameter's task deltas through a method's fitter (as many passes as it
asks for); ``merge_params`` yields one merged delta per parameter. Both take a ``read(key)``
callable, so the same code serves the streaming CLI engine (reading checkpoints lazily) and
in-memory merges (``starmerge.api.merge_deltas``). Peak memory: the T deltas of one parameter,
their densified copies when the method needs entries, and the result. The method gets its kernel
parameters, its fit step's state, and (when it declares ``needs_base``) the base tensor.

In a merge space (``space="core"`` or ``"knots"``, :mod:`starmerge.tensors.spaces`) every
parameter's LoRA deltas are projected onto a shared basis; the fitter and the kernel see each
task's small coordinates as ``Dense`` deltas (a task that lacks the parameter still as None for
the fitter), and the merged coordinates are lifted back to an exact ``LowRank`` of the
parameter's shape; each basis is computed once per run (:mod:`starmerge.space_cache`).

For a separable method (the mean or sum of a per-task transform), ``transform_task`` and
``combine_tasks`` give the same merge from per-task parts that a caller may cache (sweeps).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from starmerge.errors import ConfigError, InputError, short_repr
from starmerge.io.statistics import open_statistics
from starmerge.methods.base import Method
from starmerge.methods.contract import STATISTICS, Merged, State
from starmerge.settings import count_layers
from starmerge.space_cache import SpaceCache, SpaceState, space_cache
from starmerge.space_form import check_space
from starmerge.tensors.delta import Delta, Dense, LowRank, densify, zeros_like_delta
from starmerge.tensors.factors import concat_lowrank
from starmerge.tensors.finite import delta_finite
from starmerge.tensors.spaces import Projection
from starmerge.tensors.threads import one_thread

Reader = Callable[[str], Sequence[Delta | None]]
BaseReader = Callable[[str], Tensor]  # parameter key -> the base model's tensor


def to_method_form(
    deltas: Sequence[Delta | None],
    accepts: frozenset[str],
    device: torch.device | str = "cpu",
) -> list[Delta | None]:
    """Bring one parameter's deltas into the form a method takes (``None`` kept).

    All ``LowRank`` stay factored when the method accepts low rank; a mixture, or a method that
    needs entries, gets ``Dense`` float32. Everything moves to ``device``.
    """
    present = [d for d in deltas if d is not None]
    all_lowrank = bool(present) and all(isinstance(d, LowRank) for d in present)
    keep_lowrank = all_lowrank and "lowrank" in accepts
    out: list[Delta | None] = []
    for d in deltas:
        if d is not None and not keep_lowrank and isinstance(d, LowRank):
            d = densify(d)
        out.append(None if d is None else _to_device(d, device))
    return out


def fill_missing(
    deltas: Sequence[Delta | None], shape: tuple[int, ...], device: torch.device | str = "cpu"
) -> list[Delta]:
    """Replace ``None`` (a task without this parameter) with a zero delta of the right kind."""
    present = [d for d in deltas if d is not None]
    lowrank = bool(present) and isinstance(present[0], LowRank)
    dtype = present[0].dtype if present else torch.float32
    zero = _to_device(zeros_like_delta(shape, lowrank, dtype), device)
    return [zero if d is None else d for d in deltas]


def _to_device(delta: Delta, device: torch.device | str) -> Delta:
    if isinstance(delta, Dense):
        return Dense(delta.tensor.to(device))
    return LowRank(delta.b.to(device), delta.a.to(device), delta.scale)


def fit_state(
    method: Method,
    params: Mapping[str, Any],
    n_tasks: int,
    shapes: Mapping[str, tuple[int, ...]],
    read: Reader,
    *,
    statistics: Sequence[str | Path] | None = None,
    base: BaseReader | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    space: str = "full",
) -> State | None:
    """Run the method's fitter over every parameter, pass after pass; None if it has none.

    Args:
        method: The method.
        params: Its resolved parameters (kernel and data step).
        n_tasks: Number of tasks T.
        shapes: Parameter key -> shape, in streaming order.
        read: Every task's delta of a key (None where a task lacks it).
        statistics: One statistics entry per task (the data step's cache entries); None: the
            precomputed ``params["statistics"]`` when given.
        base: The base tensor of a key (for a method that declares ``needs_base``).
        device: Where the fitter computes.
        progress: Show a progress bar per pass.
        space: The merge space (``full``, ``core``, ``knots``): the fitter sees coordinates.

    Raises:
        ConfigError: The method does not run in ``space``.
        InputError: In ``core``/``knots``, a parameter that is not LoRA for every task.
    """
    check_space(method, space)
    if method.fit is None:
        return None
    entries = statistics if statistics is not None else params.get(STATISTICS)
    files = None if entries is None else open_statistics(entries)
    fitter = method.fitter(n_tasks, params, files)
    if not getattr(fitter, "needs_deltas", True):  # e.g. TIES with trim local: nothing to fit
        fitter.end_pass()
        return fitter.state()
    n_pass, cache = 0, space_cache(None, space)
    while True:
        n_pass += 1
        bar = tqdm(shapes, desc=f"fit pass {n_pass}", disable=not progress, unit="param")
        for key in bar:
            projection, deltas = _method_inputs(method, key, read, device, cache)
            if projection is not None and projection.empty:
                continue  # every task is zero here: no coordinate to see
            with one_thread(projection is not None):  # coordinates: small factor work
                fitter.observe(key, deltas, **_base_args(method, base, key, device))
            del projection, deltas  # freed before the next parameter is read
        if not fitter.end_pass():
            return fitter.state() if cache is None else SpaceState(fitter.state(), cache)


def _base_args(
    method: Method, base: BaseReader | None, key: str, device: torch.device | str
) -> dict[str, Tensor]:
    """``{"base": tensor}`` for a method that declares ``needs_base``; else nothing."""
    if not method.needs_base:
        return {}
    if base is None:
        why = f"{method.name} needs the base model's weights, not only task deltas; give the "
        raise ConfigError([why + "base model (config: base_model; merge_deltas: base=)"])
    return {"base": base(key).to(device)}


def merge_params(
    method: Method,
    params: Mapping[str, Any],
    state: State | None,
    shapes: Mapping[str, tuple[int, ...]],
    read: Reader,
    *,
    keys: Iterable[str] | None = None,
    base: BaseReader | None = None,
    device: torch.device | str = "cpu",
    space: str = "full",
    n_layers: int | None = None,
) -> Iterator[tuple[str, Merged]]:
    """Yield ``(key, Merged)`` for each parameter (in ``keys`` order), result on the CPU.

    In ``core``/``knots`` space the result is the lifted ``LowRank`` and the stats add
    ``core_shape``, the coordinates' shape ``[p, q]``.

    Raises:
        ConfigError: The method does not run in ``space``.
        InputError: A merged delta holds NaN or Inf (it is never yielded, so never written);
            in ``core``/``knots``, a parameter that is not LoRA for every task.
    """
    check_space(method, space)
    n_layers = count_layers(shapes) if n_layers is None else n_layers
    cache = space_cache(state, space)  # the fit passes' bases, handed over key by key
    for key in keys if keys is not None else shapes:
        projection, deltas = _method_inputs(method, key, read, device, cache, False)
        if projection is not None and projection.empty:  # all zero: the merge is zero
            zero = zeros_like_delta(projection.shape, True, projection.coords[0].dtype)
            yield key, Merged(zero, {"core_shape": list(projection.core_shape)})
            continue
        shape = shapes[key] if projection is None else projection.core_shape
        deltas = fill_missing(deltas, shape, device)
        kwargs = method.params_at(params, key, n_layers) | _base_args(method, base, key, device)
        if state is not None:
            kwargs["state"] = state.at(key)
        small = projection is not None or all(isinstance(d, LowRank) for d in deltas)
        with one_thread(small):  # factor work and coordinates (tensors/threads.py)
            merged = method.fn(deltas, **kwargs)
            if projection is not None and cache is not None:
                stats = {**merged.stats, "core_shape": list(projection.core_shape)}
                merged = Merged(cache.release(projection.lift(merged.delta)), stats)
        _check_finite(method, params, key, merged.delta)
        artifacts = {name: t.cpu() for name, t in merged.artifacts.items()}
        yield key, Merged(_to_device(merged.delta, "cpu"), merged.stats, artifacts)
        del projection, deltas, kwargs, merged, artifacts  # freed before the next read
    if cache is not None:
        cache.buffers.clear()  # the merge's coordinate buffers: the run is over


def _method_inputs(
    method: Method,
    key: str,
    read: Reader,
    device: torch.device | str,
    cache: SpaceCache | None,
    keep: bool = True,
) -> tuple[Projection | None, list[Delta | None]]:
    """What the fitter and kernel see of ``key``: deltas, or coordinates (``SpaceCache.inputs``)."""
    if cache is None:  # space: full
        return None, to_method_form(read(key), method.accepts, device)
    return cache.inputs(
        key,
        lambda: [None if d is None else _to_device(d, device) for d in read(key)],
        keep=keep,
        factored="lowrank" in method.accepts,
    )


def _check_finite(method: Method, params: Mapping[str, Any], key: str, delta: Delta) -> None:
    """The last line of defence: a non-finite merged delta stops the merge, naming the key."""
    if delta_finite(delta):
        return
    shown = {k: v for k, v in params.items() if k != "statistics"}
    raise InputError(
        f"the {method.name} merge of '{key}' is not finite (NaN or Inf) with parameters "
        f"{short_repr(shown)}; lower the parameters (scaling, weights, alpha) or check the "
        "inputs of this parameter"
    )


Part = tuple[Delta, Mapping[str, Any]]  # one task's transformed delta of a key and its stats


def transform_task(
    method: Method, params: Mapping[str, Any], deltas: Mapping[str, Delta], task: int, n_tasks: int
) -> dict[str, Part]:
    """A separable method's per-task step on every parameter of task ``task`` of ``n_tasks``.

    Example:
        >>> transform_task(METHODS.get("star"), {"eta": 40.0}, vector, 0, 2)  # doctest: +SKIP
    """
    assert method.separable is not None, f"{method.name} is not separable"
    n_layers = count_layers(deltas)
    out = {}
    for key, d in deltas.items():
        kernel = method.params_at(params, key, n_layers)
        kwargs = method.separable.task_params(method.name, kernel, task, n_tasks)
        out[key] = method.separable.transform(d, **kwargs)
    return out


def combine_tasks(
    method: Method, params: Mapping[str, Any], parts: Sequence[Mapping[str, Part]]
) -> tuple[dict[str, Delta], dict[str, dict[str, Any]]]:
    """The merge from every task's transformed parameters: their mean or sum, key by key.

    A task that lacks a key contributes the transform of a zero delta, as the kernel's zero
    delta would. Low-rank parts stay factored (concatenated); others are summed in float32.

    Returns:
        The merged delta per key, and per key the parts' stats listed in task order.
    """
    assert method.separable is not None, f"{method.name} is not separable"
    n_tasks = len(parts)
    coef = 1.0 / n_tasks if method.separable.combine == "mean" else 1.0
    shapes = {k: d.shape for p in parts for k, (d, _) in p.items()}
    n_layers = count_layers(shapes)
    merged: dict[str, Delta] = {}
    stats: dict[str, dict[str, Any]] = {}
    for key, shape in shapes.items():
        present = [p[key][0] for p in parts if key in p]
        zero = zeros_like_delta(shape, isinstance(present[0], LowRank), present[0].dtype)
        kwargs = method.params_at(params, key, n_layers)
        task_parts = [
            p[key] if key in p else _zero_part(method, kwargs, zero, t, n_tasks)
            for t, p in enumerate(parts)
        ]
        merged[key] = _combine([d for d, _ in task_parts], coef)
        names = dict.fromkeys(n for _, st in task_parts for n in st)
        if names:
            stats[key] = {n: [st.get(n) for _, st in task_parts] for n in names}
    return merged, stats


def _zero_part(
    method: Method, kwargs: Mapping[str, Any], zero: Delta, task: int, n_tasks: int
) -> Part:
    """The transform of a zero delta, for a task that lacks the key."""
    assert method.separable is not None
    task_kwargs = method.separable.task_params(method.name, kwargs, task, n_tasks)
    return method.separable.transform(zero, **task_kwargs)


def _combine(deltas: Sequence[Delta], coef: float) -> Delta:
    """``coef * sum(deltas)``: factored when all are low rank, else dense float32."""
    if all(isinstance(d, LowRank) for d in deltas):
        return concat_lowrank(deltas, [coef] * len(deltas))  # type: ignore[arg-type]
    total = torch.zeros(deltas[0].shape, dtype=torch.float32, device=deltas[0].device)
    for d in deltas:
        total += d.to_dense(torch.float32)
    return Dense((total * coef).to(deltas[0].dtype))
