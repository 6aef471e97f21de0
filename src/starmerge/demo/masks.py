"""Trained Localize-and-Stitch masks for the demo's ``localize_stitch mode=trained`` row.

Each task's masks over P are trained by :func:`starmerge.stats.masks.train_masks` (the paper's
objective; the trainer ``starmerge merge`` runs through ``stats.gather.train_into``): the plain
encoder theta_0 plus sigmoid(S) * tau, mean pooling, that task's head and cross-entropy on its
labels, over the batches the statistics use (the same seeded ``n`` *training* items; never test
items). Each (adapter, n, mask settings) is written once into the demo cache as a statistics
entry holding ``<key>::mask`` per parameter (what the method reads) and, in ``index.json``, the
items, the cost and the training loss of the hard masks next to the dataless top-k mask that
keeps as many entries.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from starmerge.demo.train import TaskAdapter, applied
from starmerge.io.statistics import open_statistics
from starmerge.memory import PeakMemory, rss_anon_bytes
from starmerge.methods.localize_stitch import LSFitter, in_parameter_set
from starmerge.stats.collect import LossFn
from starmerge.stats.masks import train_masks
from starmerge.tensors.delta import Dense
from starmerge.tensors.sparsify import kth_largest_abs

MASKS_VERSION = 2  # bump when training changes what an entry holds (2: peak_bytes counted)


def settings_label(settings: Mapping[str, Any]) -> str:
    """``masks-`` and a short hash of the mask-training settings.

    Example:
        >>> settings_label({"sparsity": 0.01, "steps": 10})  # doctest: +SKIP
        'masks-3f2a9c1d'
    """
    blob = json.dumps(dict(settings), sort_keys=True, default=str).encode()
    return f"masks-{hashlib.sha256(blob).hexdigest()[:8]}"


def mask_key(adapter: TaskAdapter, settings: Mapping[str, Any], n: int) -> str:
    """The cache key: the adapter, the settings' label, n and :data:`MASKS_VERSION`."""
    return f"{adapter.path.name}-{settings_label(settings)}-n{n}-v{MASKS_VERSION}"


def task_taus(
    adapters: Mapping[str, TaskAdapter], task: str, parameter_set: str
) -> dict[str, Tensor]:
    """``task``'s dense task vector on every merged key in P (zeros where it has no delta).

    As in ``stats.gather.train_into``: the keys are those of every adapter, so each task's
    entry holds a mask for every parameter the merge reads.
    """
    shapes = {k: d.shape for a in adapters.values() for k, d in a.deltas.items()}
    own = adapters[task].deltas
    return {
        k: own[k].to_dense(torch.float32) if k in own else torch.zeros(shape)
        for k, shape in shapes.items()
        if in_parameter_set(k, parameter_set)
    }


def train_entry(
    writer: Any,
    encoder: torch.nn.Module,
    taus: Mapping[str, Tensor],
    batches: Sequence[Any],
    loss_fn: LossFn,
    settings: Mapping[str, Any],
) -> int:
    """Train one task's masks into ``writer`` (a ``StatsWriter``); return the peak bytes.

    The peak is at least the trainer's own state, five float32 copies of P (theta_0, tau, the
    logits, their gradient and the parameters' gradients), or the process's RSS growth during
    training when that is larger (it adds activations, but misses memory the allocator reused).

    ``writer.meta`` gets ``mask_losses`` (the soft-mask loss before each step), ``kept`` and
    ``total`` (entries of P), and ``loss`` (the hard masks' training loss, ``trained``, beside
    the dataless top-k mask with as many entries, ``top_k``, and the whole task vector, ``full``).
    """
    params = dict(settings)
    params.pop("parameter_set", None)
    at_start = rss_anon_bytes() or 0
    with PeakMemory() as memory:
        result = train_masks(encoder, taus, batches, loss_fn, **params)
    masks = {k: m & (taus[k] != 0) for k, m in result.masks.items()}  # as the method counts
    kept = sum(int(m.sum()) for m in masks.values())
    writer({f"{k}::mask": m for k, m in result.masks.items()})
    ones = {k: torch.ones_like(m) for k, m in masks.items()}
    writer.meta.update(
        mask_losses=[round(x, 5) for x in result.losses],
        kept=kept,
        total=sum(t.numel() for t in taus.values()),
        loss={
            name: round(masked_loss(encoder, taus, m, batches, loss_fn), 5)
            for name, m in (("trained", masks), ("top_k", top_k(taus, kept)), ("full", ones))
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
    encoder: torch.nn.Module,
    taus: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    batches: Sequence[Any],
    loss_fn: LossFn,
) -> float:
    """Mean over ``batches`` of the batch-mean loss of theta_0 + mask * tau."""
    deltas = {k: Dense(torch.where(masks[k], t, torch.zeros_like(t))) for k, t in taus.items()}
    with torch.no_grad(), applied(encoder, deltas):
        return sum(float(loss_fn(encoder, b).mean()) for b in batches) / len(batches)


def mask_summary(
    adapters: Mapping[str, TaskAdapter], entries: Sequence[Path], parameter_set: str
) -> dict[str, Any]:
    """Per-task sparsity and the overlap of the stored masks, counted as the merge counts them.

    One counting pass of the method's own fit step (``LSFitter``) over the entries.
    """
    fitter = LSFitter(
        len(entries),
        mode="trained",
        parameter_set=parameter_set,
        statistics=open_statistics(entries),
    )
    keys = dict.fromkeys(k for a in adapters.values() for k in a.deltas)
    for key in keys:
        fitter.observe(key, [a.deltas.get(key) for a in adapters.values()])
    summary = fitter.state().summary()
    return {k: summary[k] for k in ("sparsity", "kept", "total", "overlap_fraction")}
