"""Helpers for the data-method tests: a word-level tokenizer and tiny local task files."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

WORDS = (
    "<pad> <s> </s> <unk> review sentiment positive negative good bad movie film : the a an "
    "not great awful and it was very copy say hello world yes no"
).split()

SENTIMENT = [
    {"text": "good movie", "label": 1},
    {"text": "bad film", "label": 0},
    {"text": "not a good movie and it was very bad", "label": 0},
    {"text": "great film", "label": 1},
    {"text": "the awful movie", "label": 0},
    {"text": "it was very good and great", "label": 1},
]
COPY = [
    {"text": "say hello", "answer": "hello"},
    {"text": "say world", "answer": "world"},
    {"text": "say yes", "answer": "yes"},
    {"text": "say no no", "answer": "no"},
    {"text": "say hello world", "answer": "hello world"},
]


def make_tokenizer():
    """A word-level fast tokenizer (adds ``<s>`` like Llama's) over ``WORDS``."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def write_sentiment_task(root: Path) -> Path:
    """A label-word task file over a local JSONL file."""
    return _write(
        root,
        "sentiment",
        SENTIMENT,
        {
            "input_template": "review : {text} sentiment :",
            "label_column": "label",
            "label_words": {0: "negative", 1: "positive"},
            "metric": "accuracy",
        },
    )


def write_copy_task(root: Path) -> Path:
    """A generative task file (target column) over a local JSONL file."""
    return _write(
        root,
        "copy",
        COPY,
        {
            "input_template": "copy : {text} :",
            "target_column": "answer",
            "metric": "exact_match",
            "scoring": "generate",
        },
    )


def _write(root: Path, name: str, rows: list[dict], keys: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {
        "name": name,
        "metadata": {"version": 1},
        "source": {"type": "local", "path": f"{name}.jsonl", "format": "jsonl"},
        **keys,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(task, sort_keys=False))
    return path


def statistics_from_deltas(root: Path, model: dict) -> list[str]:
    """One statistics file per task, derived from that task's deltas (so it follows task order).

    ``model`` maps parameter key -> one delta (or None) per task. Fisher = tau^2 + 0.1 for every
    key; for ``*.weight`` matrices, Grams I + tau^T tau / n (input) and I + tau tau^T / n (output).
    """
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    n_tasks = len(next(iter(model.values())))
    paths = []
    for t in range(n_tasks):
        stats = {}
        for key, deltas in model.items():
            shape = next(d for d in deltas if d is not None).shape
            tau = torch.zeros(shape) if deltas[t] is None else deltas[t].to_dense(torch.float32)
            stats[f"{key}::fisher"] = tau.square() + 0.1
            if key.endswith(".weight") and tau.ndim == 2:
                module = key.removesuffix(".weight")
                stats[f"{module}::gram_in"] = torch.eye(shape[1]) + tau.T @ tau / shape[0]
                stats[f"{module}::gram_out"] = torch.eye(shape[0]) + tau @ tau.T / shape[1]
        path = root / f"stats{t}.safetensors"
        save_file(stats, path)
        paths.append(str(path))
    return paths
