"""A task's trained Localize-and-Stitch masks as a statistics entry, and what they achieved.

:func:`train_into` trains one task's masks over P with :func:`starmerge.stats.masks.train_masks`
(from the base model theta_0, on the task's batches and loss) and writes ``<key>::mask`` per
parameter into the entry; its ``index.json`` gets the soft-mask loss before each step, the
entries kept, and the training loss of the hard masks beside the dataless top-k mask that keeps
as many entries and beside the whole task vector.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from starmerge.memory import PeakMemory, rss_anon_bytes
from starmerge.methods.contract import DataRequest
from starmerge.stats.collect import LossFn
from starmerge.stats.masks import train_masks
from starmerge.stats.source import TaskSource
from starmerge.tensors.sparsify import kth_largest_abs


def train_into(
    sink: Callable[[dict[str, Tensor]], None],
    meta: dict[str, Any],
    source: TaskSource,
    request: DataRequest,
) -> int:
    """Train one task's masks over P into ``sink``, record the results in ``meta``; peak bytes.

    The peak is at least the trainer's own state, five float32 copies of P (theta_0, tau, the
    logits, their gradient and the parameters' gradients), or the process's RSS growth during
    training when that is larger (it adds activations, but misses memory the allocator reused).

    Args:
        sink: The entry being written (a :class:`~starmerge.stats.cache.StatsWriter`).
        meta: Gets ``mask_losses`` (the soft-mask loss before each step), ``kept`` and
            ``total`` (entries of P), and ``loss``: the hard masks' training loss
            (``trained``), the dataless top-k mask's with as many entries (``top_k``) and the
            whole task vector's (``full``).
        source: The task (its base model, batches, loss and delta).
        request: ``request.masks`` holds the training settings (``parameter_set`` only keys
            the cache); ``request.covers`` says which keys are in P.
    """
    settings = dict(request.masks or {})
    settings.pop("parameter_set", None)
    model, loss_fn = source.base_model(), source.make_loss("empirical")
    taus = {}
    for key, shape in source.shapes.items():
        if request.covers is None or request.covers(key):
            delta = source.tau(key)
            taus[key] = torch.zeros(shape) if delta is None else delta.to_dense(torch.float32)
    at_start = rss_anon_bytes() or 0
    with PeakMemory() as memory:
        result = train_masks(model, taus, source.batches, loss_fn, **settings)
    masks = {k: m.cpu() & (taus[k] != 0) for k, m in result.masks.items()}  # as the method counts
    kept = sum(int(m.sum()) for m in masks.values())
    sink({f"{k}::mask": m for k, m in result.masks.items()})
    ones = {k: torch.ones_like(m) for k, m in masks.items()}
    candidates = (("trained", masks), ("top_k", top_k(taus, kept)), ("full", ones))
    meta.update(
        mask_losses=[round(x, 5) for x in result.losses],
        kept=kept,
        total=sum(t.numel() for t in taus.values()),
        loss={
            name: round(masked_loss(model, taus, m, source.batches, loss_fn), 5)
            for name, m in candidates
        },
    )
    state = 5 * 4 * sum(t.numel() for t in taus.values())
    return max(state, memory.peak - at_start)


def top_k(taus: Mapping[str, Tensor], k: int) -> dict[str, Tensor]:
    """The dataless mask: the ``k`` largest |tau| over all of ``taus`` (ties kept), tau != 0.

    Example:
        >>> top_k({"a": torch.tensor([3.0, -1.0]), "b": torch.tensor([-2.0])}, 2)["a"]
        tensor([ True, False])
    """
    threshold = kth_largest_abs(taus.values(), k)
    if threshold is None:
        return {key: torch.zeros_like(t, dtype=torch.bool) for key, t in taus.items()}
    return {key: (t.abs() >= threshold) & (t != 0) for key, t in taus.items()}


def masked_loss(
    model: nn.Module,
    taus: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    batches: Sequence[Any],
    loss_fn: LossFn,
) -> float:
    """Mean over ``batches`` of the batch-mean loss of theta_0 + mask * tau."""
    deltas = {k: torch.where(masks[k], t, torch.zeros_like(t)) for k, t in taus.items()}
    with torch.no_grad(), _added(model, deltas):
        return sum(float(loss_fn(model, b).mean()) for b in batches) / len(batches)


@contextmanager
def _added(model: nn.Module, deltas: Mapping[str, Tensor]) -> Iterator[None]:
    """Add dense ``deltas`` to the model's parameters in place; restore them exactly on exit."""
    params = {k: model.get_parameter(k) for k in deltas}
    saved = {k: p.detach().clone() for k, p in params.items()}
    try:
        with torch.no_grad():
            for key, delta in deltas.items():
                params[key].add_(delta.to(device=params[key].device, dtype=params[key].dtype))
        yield
    finally:
        with torch.no_grad():
            for key, value in saved.items():
                params[key].copy_(value)
