"""What one task's statistics come from, and the one cache-key recipe for them.

Every caller of the data step (the CLI engine, ``starmerge.stats.plan_data``; reproductions and
sweeps, ``starmerge.sweep.data``; the demo, ``starmerge.demo.statistics``) describes each task
as a :class:`TaskSource`: how to run the model for that task (the task's model, the base model
for mask training, the batches, the loss, the parameters the merge reads) and what identifies
the result. :func:`entry_fields` turns a request and a source into the fields that
:func:`starmerge.stats.cache.cache_key` hashes; :func:`starmerge.stats.gather.gather_statistics`
looks the key up and collects (or trains) what is missing. Two callers that describe the same
base and task model, the same batches, the same model and loss kinds and the same parameters
share one cache entry.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from starmerge.io.checkpoint import TensorIndex
from starmerge.io.hashing import hash_files
from starmerge.methods.contract import DataRequest
from starmerge.stats.cache import FORMAT
from starmerge.stats.collect import GRAD_KINDS, LossFn
from starmerge.tensors.delta import Delta

KEY_VERSION = 2  # bump when what an entry holds for the same fields changes (2: one recipe)
HF_LOSS = "starmerge.stats.hf"  # the HF wrappers' loss of the model kind (hf.make_loss_fn)


@dataclass(frozen=True)
class TaskSource:
    """How to run one task's model for its statistics, and what identifies them.

    Args:
        base: Identity of the base model, JSON-able: its weight files' sha256
            (:func:`weights_identity`) or another fingerprint.
        model: Identity of the task's model (its adapter's or fine-tune's weight files, or a
            fingerprint).
        model_kind: ``causal_lm``, ``seq2seq`` or ``classifier``: which rows the Grams count
            (:func:`starmerge.stats.hf.make_mask_fn`).
        loss_kind: What ``make_loss`` computes (:data:`HF_LOSS`, or the caller's own loss).
        batches: The task's batches (dicts of tensors; their content is hashed).
        make_loss: ``make_loss(fisher) -> loss_fn(model, batch) -> (B,)``, with the dataset's
            labels (``empirical``) or labels sampled from the model (``true``).
        shapes: Every parameter key the merge reads -> shape: statistics cover the
            ``nn.Linear`` modules among them, trained masks the keys in the request's P.
        task_model: A context manager giving the task's model (the fine-tune, or the base with
            the task's delta applied, in place or as hooks) and undoing it on exit.
        base_model: The base model, theta_0 (trained masks start from it).
        tau: The task's delta of a key, or None where the task has none (a zero delta).
        meta: Descriptive fields written into the entry's ``index.json`` (not keyed).
    """

    base: Any
    model: Any
    model_kind: str
    loss_kind: str
    batches: Sequence[Mapping[str, Any]]
    make_loss: Callable[[str], LossFn]
    shapes: Mapping[str, tuple[int, ...]]
    task_model: Callable[[], AbstractContextManager[nn.Module]]
    base_model: Callable[[], nn.Module]
    tau: Callable[[str], Delta | None]
    meta: Mapping[str, Any] = field(default_factory=dict)


def entry_fields(request: DataRequest, source: TaskSource) -> dict[str, Any]:
    """Everything an entry's content depends on: the fields its cache key hashes.

    The batches stand for the examples, the tokenizer, the batch size and the length limit
    (their tokens are hashed); the Fisher labels count only where gradients are collected.

    Example:
        >>> key = cache_key(entry_fields(DataRequest(("gram_in",)), source))  # doctest: +SKIP
    """
    grads = bool(set(request.kinds) & GRAD_KINDS)
    return {
        "format": FORMAT,
        "version": KEY_VERSION,
        "base": source.base,
        "model": source.model,
        "model_kind": source.model_kind,
        "loss_kind": source.loss_kind,
        "examples": examples_digest(source.batches),
        "kinds": sorted(request.kinds),
        "fisher": request.fisher if grads else None,
        "masks": dict(request.masks) if request.masks is not None else None,
        "parameters": hashlib.sha256("\n".join(sorted(source.shapes)).encode()).hexdigest(),
    }


def examples_digest(batches: Iterable[Mapping[str, Any]]) -> str:
    """sha256 of the batches: every entry of each batch (token ids, masks, labels, seeds).

    Example:
        >>> examples_digest([{"input_ids": torch.ones(1, 2)}])[:8]  # doctest: +SKIP
        '5d2f8c1e'
    """
    digest = hashlib.sha256()
    for batch in batches:
        plain = {k: v.tolist() if isinstance(v, Tensor) else v for k, v in batch.items()}
        digest.update(json.dumps(plain, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def weights_identity(files: Iterable[Path | str]) -> list[str]:
    """The sorted sha256 of a model's weight files (what the CLI's manifest records)."""
    return sorted(hash_files(files).values())


def model_identity(model: nn.Module) -> list[str]:
    """A loaded model's identity: its weight files' sha256, else a hash of its tensors.

    The files are those of the directory it was read from (``name_or_path``, as Hugging Face
    models record it). ``starmerge merge`` (from the base model's files) and the demo (from
    its loaded model) then name the same base model alike.
    """
    path = Path(str(getattr(model, "name_or_path", "") or ""))
    if str(path) not in ("", ".") and path.is_dir():
        return weights_identity(TensorIndex.open(path).files)
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return [digest.hexdigest()]
