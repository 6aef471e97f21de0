"""An encoder with one classification head per task (the embedded demo's backend)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch

from starmerge.errors import UnknownNameError, did_you_mean

__all__ = ["ClassifierHeadBackend"]


class ClassifierHeadBackend:
    """A shared encoder plus one classification head per task (the embedded demo's models).

    Args:
        encoder: A ``transformers`` encoder (``AutoModel``) returning ``last_hidden_state``.
        heads: Task name -> module mapping pooled (B, H) features to (B, n_classes) logits.
        tokenizer: The encoder's tokenizer.
        pooling: ``"mean"`` over non-padding tokens, or ``"cls"`` (the first token).
        batch_size: Texts per forward pass.
        max_length: Truncation length in tokens.

    Example:
        >>> backend = ClassifierHeadBackend(encoder, {"news": head}, tok)  # doctest: +SKIP
        >>> backend.predict("news", ["Stocks fell sharply."])  # doctest: +SKIP
        [2]
    """

    def __init__(
        self,
        encoder: Any,
        heads: Mapping[str, torch.nn.Module],
        tokenizer: Any,
        pooling: Literal["mean", "cls"] = "mean",
        batch_size: int = 32,
        max_length: int = 256,
    ):
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.encoder, self.heads, self.tokenizer = encoder, dict(heads), tokenizer
        self.pooling, self.batch_size = pooling, batch_size
        self._tokenize = {"padding": True, "truncation": True, "max_length": max_length}

    def _head(self, task: str) -> Callable[[torch.Tensor], torch.Tensor]:
        if task not in self.heads:
            hint, heads = did_you_mean(task, self.heads), ", ".join(self.heads)
            raise UnknownNameError(f"No head for task {task!r}.{hint} Heads: {heads}")
        return self.heads[task]

    @torch.inference_mode()
    def logits(self, task: str, texts: list[str]) -> torch.Tensor:
        """Class logits of each text with ``task``'s head: (len(texts), n_classes), on CPU."""
        head, out = self._head(task), []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            batch = self.tokenizer(chunk, return_tensors="pt", **self._tokenize)
            batch = batch.to(self.encoder.device)
            hidden = self.encoder(**batch).last_hidden_state  # (B, T, H)
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(head(pooled).float().cpu())
        return torch.cat(out) if out else torch.empty(0, 0)

    def predict(self, task: str, texts: list[str]) -> list[int]:
        """Predicted class index of each text with ``task``'s head."""
        return self.logits(task, texts).argmax(-1).tolist() if texts else []
