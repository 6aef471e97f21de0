"""Hugging Face wrappers for statistics: batches from task examples, losses, padding masks.

Three model kinds (from the model's config): ``causal_lm`` (prompt + answer in one sequence,
loss on the answer tokens), ``seq2seq`` (prompt to the encoder, answer as decoder labels) and
``classifier`` (``*ForSequenceClassification``, label index = position in the task's
``label_words``). The answer of an example is its first label word (after the task's
``target_delimiter``), its target text, or its number (a numeric label without label words).

Normalisation (stated once, used everywhere): an example's loss is the mean cross-entropy over its
answer tokens (MaTS's ``average_sequenceLength``); Fishers average over examples; Grams sum over the
non-pad tokens a module sees and divide by their count: for causal LMs every non-pad token (prompt
and answer), for seq2seq the encoder's tokens for ``encoder.*`` modules and the cross-attention
keys/values, the decoder's (answer) tokens otherwise, for classifiers the input tokens (a head fed
one pooled vector per example counts examples). ``fisher="true"`` samples one label per answer
token from the model's softmax (seeded per batch) instead of the dataset's.

``transformers`` is imported only inside these functions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from starmerge.errors import StarmergeError
from starmerge.stats.collect import LossFn, MaskFn
from starmerge.tensors.delta import LowRank

_CROSS_KV = re.compile(r"(EncDecAttention\.[kv]|encoder_attn\.[kv]_proj)$")


def model_kind(path: str | Path) -> str:
    """``causal_lm``, ``seq2seq`` or ``classifier`` from the HF config at ``path``."""
    import transformers as tf

    config = tf.AutoConfig.from_pretrained(path)
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if any(a.endswith("ForSequenceClassification") for a in config.architectures or ()):
        return "classifier"
    return "causal_lm"


def load_model(path: str | Path, kind: str, device: str = "cpu") -> nn.Module:
    """The HF model at ``path`` for ``kind``, in eval mode on ``device`` (its stored dtype)."""
    import transformers as tf

    cls = {
        "causal_lm": tf.AutoModelForCausalLM,
        "seq2seq": tf.AutoModelForSeq2SeqLM,
        "classifier": tf.AutoModelForSequenceClassification,
    }[kind]
    return cls.from_pretrained(path, dtype="auto").to(device).eval()


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved with the base model.

    Raises:
        StarmergeError: The base model directory has no tokenizer.
    """
    import transformers as tf

    try:
        return tf.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        raise StarmergeError(
            f"statistics need the base model's tokenizer, but {path} has none ({exc}); save "
            "the tokenizer next to the base model"
        ) from None


def answer_text(spec: Any, example: Any) -> str:
    """The answer of an example: its first label word or its target (after the delimiter)."""
    if spec.label_words is not None and example.label is not None:
        return spec.target_delimiter + spec.label_words[str(example.label)][0]
    if example.target is not None:
        return spec.target_delimiter + example.target
    if isinstance(example.label, float):  # a scored number (STS-B): its text, "3.8"
        return spec.target_delimiter + f"{example.label:g}"
    raise StarmergeError(
        f"task {spec.name!r} has neither label_words nor target_column, so its examples have no "
        "answer to compute gradient statistics or masks on; add one to the task file"
    )


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else int(pad)


def _pad(seqs: Sequence[list[int]], value: int) -> Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def build_batches(
    tokenizer: Any,
    kind: str,
    spec: Any,
    examples: Sequence[Any],
    batch_size: int,
    max_length: int,
    seed: int = 0,
    encode: Callable[[str], list[int]] | None = None,
) -> list[dict[str, Any]]:
    """Tokenize ``examples`` of task ``spec`` into right-padded batches for ``kind``.

    ``encode`` turns a prompt into token ids (default: the tokenizer with its special tokens),
    e.g. a chat-template renderer for instruction-tuned causal models.
    """
    pad = _pad_id(tokenizer)
    encode = encode or (lambda text: tokenizer(text)["input_ids"])
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [list(encode(e.input)) for e in chunk]
        batch: dict[str, Any] = {"seed": seed * 1_000_003 + start}
        if kind == "classifier":
            order = list(spec.label_words)
            ids = [p[:max_length] for p in prompts]
            batch["labels"] = torch.tensor([order.index(str(e.label)) for e in chunk])
        else:
            special = kind == "seq2seq"
            encoded = [tokenizer(answer_text(spec, e), add_special_tokens=special) for e in chunk]
            answers = [a["input_ids"][:max_length] for a in encoded]
            if kind == "seq2seq":
                ids = [p[:max_length] for p in prompts]
                batch["labels"] = _pad(answers, -100)
            else:  # keep the answer; cut the prompt from the left
                ids = [(p + a)[-max_length:] for p, a in zip(prompts, answers, strict=True)]
                labels = [[-100] * (len(i) - len(a)) + a for i, a in zip(ids, answers, strict=True)]
                batch["labels"] = _pad(labels, -100)
        batch["input_ids"] = _pad(ids, pad)
        batch["attention_mask"] = _pad([[1] * len(i) for i in ids], 0)
        batches.append(batch)
    return batches


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _sampled(logits: Tensor, valid: Tensor, seed: int) -> Tensor:
    """One label per position drawn from softmax(logits) (seeded); -100 where not valid."""
    gen = torch.Generator(device=logits.device).manual_seed(int(seed))
    probs = torch.softmax(logits.detach().float().reshape(-1, logits.shape[-1]), dim=-1)
    draw = torch.multinomial(probs, 1, generator=gen).reshape(valid.shape)
    return torch.where(valid, draw, torch.full_like(draw, -100))


def _token_mean(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-example cross-entropy averaged over its labelled tokens: ``(B,)``."""
    ce = F.cross_entropy(
        logits.float().transpose(1, 2), labels, reduction="none", ignore_index=-100
    )  # (B, T)
    count = (labels != -100).sum(dim=1).clamp(min=1)
    return ce.sum(dim=1) / count


def make_loss_fn(kind: str, fisher: str = "empirical") -> LossFn:
    """``loss_fn(model, batch) -> (B,)`` for ``kind``; ``fisher="true"`` samples the labels."""

    def loss_fn(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
        dev = _device(model)
        ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
        labels = batch["labels"].to(dev)
        if kind == "classifier":
            logits = model(input_ids=ids, attention_mask=mask).logits  # (B, C)
            if fisher == "true":
                labels = _sampled(logits, torch.ones_like(labels, dtype=torch.bool), batch["seed"])
            return F.cross_entropy(logits.float(), labels, reduction="none")
        if kind == "seq2seq":
            logits = model(input_ids=ids, attention_mask=mask, labels=labels).logits
        else:  # position t predicts token t + 1
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            labels = labels[:, 1:]
        if fisher == "true":
            labels = _sampled(logits, labels != -100, batch["seed"])
        return _token_mean(logits, labels)

    return loss_fn


def make_mask_fn(kind: str) -> MaskFn:
    """``mask_fn(batch, module) -> (B, T)``: the non-pad tokens the module sees (see above)."""

    def mask_fn(batch: Mapping[str, Any], module: str) -> Tensor:
        if kind == "seq2seq":
            encoder_side = module.startswith("encoder.") or ".encoder." in module
            if not (encoder_side or _CROSS_KV.search(module)):
                return batch["labels"] != -100
        return batch["attention_mask"].bool()

    return mask_fn


@contextmanager
def lowrank_deltas(model: nn.Module, deltas: Mapping[str, LowRank]) -> Iterator[None]:
    """Run ``model`` as base + deltas: each adapted Linear's output gets ``x (s B A)^T`` added."""
    handles = []
    for key, delta in deltas.items():
        module = model.get_submodule(key.removesuffix(".weight"))
        linear = isinstance(module, nn.Linear)

        def hook(mod: nn.Module, args: tuple, out: Tensor, d: LowRank = delta, lin: bool = linear):
            x = args[0]
            b, a = d.b.to(x), d.a.to(x)
            extra = (x @ a.T) @ b.T if lin else (x @ b) @ a  # Conv1D stores (in, out)
            return out + d.scale * extra

        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
