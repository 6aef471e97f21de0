"""The model side of the embedded demo: train, cache and apply LoRA task adapters.

Each task gets a LoRA adapter on a shared encoder trained *jointly* with a linear head on mean
pooling (the "joint recipe" of ``docs/demo.md``). A trained adapter is cached as a real PEFT
adapter directory plus ``head.safetensors``, keyed by a hash of the recipe and the training
data; its task vector is ``LowRank(lora_B, lora_A, alpha / r)`` per adapted ``<module>.weight``.
Merged deltas are applied to a plain (non-PEFT) copy of the encoder in memory and restored after,
so a whole sweep costs one model load.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from starmerge.demo.assets import TaskData
from starmerge.demo.env import training_threads
from starmerge.errors import InputError, StarmergeError, UnknownNameError, did_you_mean
from starmerge.io.adapter import load_adapter
from starmerge.tensors.delta import Delta

CACHE_VERSION = 1  # bump when the training code changes what a recipe produces


@dataclass(frozen=True)
class Recipe:
    """How every task adapter is trained (all of it goes into the cache key).

    Args:
        rank: LoRA rank r.
        alpha: LoRA alpha (scale = alpha / r).
        targets: Module names LoRA adapts (PEFT suffix match).
        lr: AdamW learning rate for the LoRA factors and the head (linear decay to 0).
        steps: Optimizer steps per task.
        batch_size: Training batch size.
        max_length: Token limit for training and evaluation.
        n_train: Training items per task (fewer when the task has fewer).
        model: The backbone: ``minilm`` (all-MiniLM-L6-v2 + a linear head per task) or
            ``gemma-270m`` (Gemma-3-270M, label words scored by log-likelihood).
    """

    rank: int
    alpha: int
    targets: tuple[str, ...]
    lr: float
    steps: int
    batch_size: int
    max_length: int
    n_train: int
    model: str = "minilm"


@dataclass(frozen=True)
class TaskAdapter:
    """A trained task: its delta per base parameter, its head, and training facts."""

    task: str
    deltas: dict[str, Delta]
    head_weight: Tensor | None  # (n_labels, hidden); None for the decoder tier
    head_bias: Tensor | None  # (n_labels,)
    path: Path
    meta: dict[str, Any]


@contextlib.contextmanager
def applied(encoder: torch.nn.Module, deltas: Mapping[str, Delta]) -> Iterator[None]:
    """Add ``deltas`` to the encoder's weights in place; restore the saved tensors on exit.

    Raises:
        InputError: A key is not a parameter of the encoder (a wrong key would otherwise
            silently leave the base model in place).
    """
    params = dict(encoder.named_parameters())
    unknown = [k for k in deltas if k not in params]
    if unknown:
        raise InputError(
            f"merged delta key {unknown[0]!r} is not a parameter of the encoder "
            f"(e.g. {next(iter(params))!r}); keys must be base parameter names"
        )
    saved = {k: params[k].detach().clone() for k in deltas}
    try:
        with torch.no_grad():
            for key, delta in deltas.items():
                params[key].add_(delta.to_dense(torch.float32).to(params[key].dtype))
        yield
    finally:
        with torch.no_grad():
            for key, value in saved.items():
                params[key].copy_(value)


def split_task(data: TaskData, n_train: int, n_test: int, seed: int) -> tuple[TaskData, TaskData]:
    """Seeded disjoint (train, test) subsets; the test set does not depend on ``n_train``.

    Raises:
        StarmergeError: The task has fewer than ``n_test + 50`` items.
    """
    if len(data) < n_test + 50:
        raise StarmergeError(
            f"task {data.name!r} has {len(data)} items, too few for n_test={n_test} plus "
            "training; use a smaller n_test"
        )
    order = torch.randperm(
        len(data), generator=torch.Generator().manual_seed(_seed_for(data.name, seed))
    ).tolist()
    return data.subset(order[n_test : n_test + n_train]), data.subset(order[:n_test])


def adapter_key(task: TaskData, recipe: Recipe, seed: int) -> str:
    """Hash of the recipe, the seed and the exact training items."""
    head = [CACHE_VERSION, asdict(recipe), seed, task.name, list(task.label_names)]
    digest = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
    for text, label in zip(task.texts, task.labels, strict=True):
        digest.update(f"{label}\t{text}\n".encode())
    return digest.hexdigest()[:16]


def adapter_dir(cache_dir: Path, task: TaskData, recipe: Recipe, seed: int) -> Path:
    """Where the adapter of ``task`` trained with ``recipe`` lives in the cache."""
    return (
        Path(cache_dir) / "demo" / recipe.model / f"{task.name}-{adapter_key(task, recipe, seed)}"
    )


#: Backbone name -> the module of its tier. Each gives ``load_demo_task(name)``, ``train_into(path,
#: train, recipe, seed, progress, cache)`` and ``make_tier(recipe, adapters, cache)``.
TIERS = {"minilm": "starmerge.demo.encoder", "gemma-270m": "starmerge.demo.decoder"}


def tier_module(model: str) -> ModuleType:
    """The tier module of backbone ``model`` (imported on first use).

    Raises:
        UnknownNameError: ``model`` is not a demo backbone.
    """
    if model not in TIERS:
        hint, known = did_you_mean(model, TIERS), ", ".join(TIERS)
        raise UnknownNameError(f"Unknown demo model {model!r}.{hint} Available: {known}")
    return importlib.import_module(TIERS[model])


def get_adapter(
    cache_dir: Path, train: TaskData, recipe: Recipe, seed: int, progress: bool = True
) -> TaskAdapter:
    """Load the cached adapter for ``train``, training and caching it first when missing."""
    path = adapter_dir(cache_dir, train, recipe, seed)
    fresh = not (path / "meta.json").is_file()
    if fresh:
        with training_threads():  # the same bits on any machine and load (see env.py)
            tier = tier_module(recipe.model)
            tier.train_into(path, train, recipe, seed, progress, Path(cache_dir))
    adapter = load_task_adapter(path)
    adapter.meta["fresh"] = fresh  # trained by this call (not written to the cache)
    return adapter


def load_task_adapter(path: Path) -> TaskAdapter:
    """Read a cached adapter: its ``LowRank`` delta per base ``<module>.weight``, and its head."""
    lora = load_adapter(path / "adapter")  # the same reader as `starmerge merge`
    deltas: dict[str, Delta] = {key: lora.get(key) for key in lora.keys()}
    head = (
        load_file(str(path / "head.safetensors")) if (path / "head.safetensors").is_file() else {}
    )
    meta = json.loads((path / "meta.json").read_text())
    return TaskAdapter(meta["task"], deltas, head.get("weight"), head.get("bias"), path, meta)


def write_adapter_dir(
    path: Path, model: Any, meta: dict[str, Any], head: torch.nn.Linear | None = None
) -> None:
    """Write a PEFT adapter (+ head) and ``meta.json`` to a temporary dir, renamed to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        model.save_pretrained(str(tmp / "adapter"))
        if head is not None:
            weights = {"weight": head.weight.detach(), "bias": head.bias.detach()}
            save_file(
                {k: v.contiguous() for k, v in weights.items()}, str(tmp / "head.safetensors")
            )
        (tmp / "meta.json").write_text(
            json.dumps({**meta, "cache_version": CACHE_VERSION}, indent=2)
        )
        if path.exists():  # a stale copy
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _seed_for(task: str, seed: int) -> int:
    return int(hashlib.sha256(f"{task}:{seed}".encode()).hexdigest()[:8], 16)


def train_meta(
    train: TaskData, recipe: Recipe, seed: int, start: float, loss: float
) -> dict[str, Any]:
    """What ``meta.json`` records about a training run."""
    return {
        "task": train.name,
        "label_names": list(train.label_names),
        "n_train": len(train),
        "recipe": asdict(recipe),
        "seed": seed,
        "source": train.source,
        "train_seconds": round(time.perf_counter() - start, 2),
        "final_loss": round(loss, 4),
    }


def run_steps(
    params: list[torch.nn.Parameter],
    batch_loss: Any,
    n_items: int,
    recipe: Recipe,
    generator: torch.Generator,
    bar: Any,
) -> float:
    """``recipe.steps`` AdamW steps (lr decaying linearly to 0) on reshuffled batches of items.

    Args:
        params: What is trained.
        batch_loss: ``batch_loss(item indices) -> scalar loss``.
        n_items: The number of training items (an epoch is a seeded permutation of them).
        recipe: Steps, batch size, learning rate.
        generator: Seeds the permutations.
        bar: An iterable of ``recipe.steps`` (a tqdm bar: the running loss is shown on it).

    Returns:
        The mean loss of the last 10 steps.
    """
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / recipe.steps)
    order: list[int] = []
    recent: list[float] = []
    for _ in bar:
        if len(order) < recipe.batch_size:  # a new epoch, reshuffled
            order += torch.randperm(n_items, generator=generator).tolist()
        batch, order = order[: recipe.batch_size], order[recipe.batch_size :]
        loss = batch_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        recent = (recent + [loss.item()])[-10:]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")
    return sum(recent) / len(recent)
