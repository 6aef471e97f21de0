"""The only loop over parameters: fit passes, then the merge pass.

``fit_state`` streams every parameter's task deltas through a method's fitter (as many passes as it
asks for); ``merge_params`` yields one merged delta per parameter. Both take a ``read(key)``
callable, so the same code serves the streaming CLI engine (reading checkpoints lazily) and
in-memory merges (``starmerge.api.merge_deltas``). Peak memory: the T deltas of one parameter,
their densified copies when the method needs entries, and the result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from starmerge.methods.base import Merged, Method, State
from starmerge.tensors.delta import Delta, Dense, LowRank, densify, zeros_like_delta

Reader = Callable[[str], Sequence[Delta | None]]


def prepare(
    deltas: Sequence[Delta | None],
    shape: tuple[int, ...],
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
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> State | None:
    """Run the method's fitter over every parameter, pass after pass; None if it has none."""
    if method.fit is None:
        return None
    fitter = method.fit(n_tasks, **params)
    n_pass = 0
    while True:
        n_pass += 1
        bar = tqdm(shapes.items(), desc=f"fit pass {n_pass}", disable=not progress, unit="param")
        for key, shape in bar:
            fitter.observe(key, prepare(read(key), shape, method.accepts, device))
        if not fitter.end_pass():
            return fitter.state()


def merge_params(
    method: Method,
    params: Mapping[str, Any],
    state: State | None,
    shapes: Mapping[str, tuple[int, ...]],
    read: Reader,
    *,
    keys: Iterable[str] | None = None,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[str, Merged]]:
    """Yield ``(key, Merged)`` for each parameter (in ``keys`` order), result on the CPU."""
    for key in keys if keys is not None else shapes:
        shape = shapes[key]
        deltas = fill_missing(prepare(read(key), shape, method.accepts, device), shape, device)
        kwargs = dict(params)
        if state is not None:
            kwargs["state"] = state.at(key)
        merged = method.fn(deltas, **kwargs)
        artifacts = {name: t.cpu() for name, t in merged.artifacts.items()}
        yield key, Merged(_to_device(merged.delta, "cpu"), merged.stats, artifacts)
