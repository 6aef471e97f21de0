"""Model backends behind a narrow contract (lm-eval style): score choices, or generate.

The runner only talks to a :class:`Backend` (or a :class:`ClassifierBackend` for encoder +
head models). Fixes of the seed code's evaluation, on purpose:

- Exactly one BOS. A prompt (after the chat template, when enabled) is tokenized once with
  ``add_special_tokens=False``; the BOS is prepended only when the tokenizer normally adds one
  and the text does not already start with it (chat templates usually write it themselves).
- Scores do not depend on the batch size (left padding with explicit position ids); only the
  continuation positions get logits (``logits_to_keep``), which saves memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from starmerge.eval.classifier import ClassifierHeadBackend

__all__ = [
    "Backend",
    "CausalLMBackend",
    "ClassifierBackend",
    "ClassifierHeadBackend",
    "Seq2SeqBackend",
]


@runtime_checkable
class Backend(Protocol):
    """What the runner needs from a language model."""

    def score_choices(self, prompts: list[str], choices: list[list[str]]) -> list[list[float]]:
        """Summed log-likelihood of each choice continuation given its prompt."""

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy continuation of each prompt (new text only, special tokens removed)."""


@runtime_checkable
class ClassifierBackend(Protocol):
    """An encoder with one classification head per task (class indices, no text)."""

    def predict(self, task: str, texts: list[str]) -> list[int]:
        """Predicted class index of each text with ``task``'s head."""


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, ...]:
    """Pad to a (B, T) id tensor and its attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, seq in enumerate(seqs):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[b, span] = torch.tensor(seq, dtype=torch.long)
        mask[b, span] = 1
    return ids, mask


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Request indices grouped into batches of similar length (longest first)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else int(pad)


def _regroup(owners: list[int], scores: list[float], n: int) -> list[list[float]]:
    """Flat per-request scores back to one list per prompt."""
    out: list[list[float]] = [[] for _ in range(n)]
    for i, score in zip(owners, scores, strict=True):
        out[i].append(score)
    return out


def _greedy(
    model: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    n_new: int,
    pad: int,
    stop: Sequence[int] = (),
):
    """Greedy ``generate`` on the model's device; the output ids on CPU.

    ``stop``: token ids that end a sequence besides the model's own EOS.
    """
    ids, mask = ids.to(model.device), mask.to(model.device)
    extra = {}
    if stop:
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        extra["eos_token_id"] = [*eos, *stop]
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=n_new,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
        **extra,
    )
    return out.cpu()


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log p(target) at each position: (B, T, V), (B, T) -> (B, T), in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)


class CausalLMBackend:
    """A decoder-only ``transformers`` model (``AutoModelForCausalLM``).

    Args:
        model: The model (put it on its device and in eval mode first).
        tokenizer: Its tokenizer.
        batch_size: Requests per forward pass.
        chat_template: Wrap each prompt as one user turn with the tokenizer's chat template
            (``add_generation_prompt=True``).
        template_kwargs: Extra chat-template variables, e.g. ``{"date_string": "26 Jul 2024"}``
            to pin Llama-3's date line.
        stop_token_ids: Token ids that end a generation besides the EOS (e.g. a newline's,
            when only the first line is read).

    Example:
        >>> backend = CausalLMBackend(model, tokenizer, batch_size=4)  # doctest: +SKIP
        >>> backend.score_choices(["Great. Sentiment:"], [[" good", " bad"]])  # doctest: +SKIP
        [[-1.2, -3.4]]
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        batch_size: int = 8,
        chat_template: bool = False,
        template_kwargs: dict[str, Any] | None = None,
        stop_token_ids: Sequence[int] = (),
    ):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.stop = tuple(stop_token_ids)
        self.chat_template, self.template_kwargs = chat_template, dict(template_kwargs or {})
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
        self._bos = bos if adds_bos else None

    def render(self, prompt: str) -> str:
        """The prompt text the model sees (chat template applied when enabled)."""
        if not self.chat_template:
            return prompt
        turn = [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(
            turn, add_generation_prompt=True, tokenize=False, **self.template_kwargs
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of rendered ``text`` with exactly one leading BOS (if the model uses one)."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if self._bos is not None and ids[:1] != [self._bos]:
            ids.insert(0, self._bos)
        return ids

    def _request(self, prompt: str, choice: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids), split as lm-eval does: encode the whole, cut."""
        text = self.render(prompt)
        ctx, whole = self.encode(text), self.encode(text + choice)
        if whole[: len(ctx)] == ctx:
            cont = whole[len(ctx) :]
        else:  # the boundary merged tokens: encode the choice on its own
            cont = list(self.tokenizer(choice, add_special_tokens=False)["input_ids"])
        if not cont:
            raise ValueError(f"choice {choice!r} encodes to no tokens after prompt {prompt!r}")
        return ctx, cont

    @torch.inference_mode()
    def score_choices(self, prompts: list[str], choices: list[list[str]]) -> list[list[float]]:
        """Summed log-likelihood of each choice continuation given its prompt.

        Choices of one token share one forward pass of their context: the log-likelihood of
        a one-token continuation is read at the context's last position, which is exactly the
        input the per-choice pass would run (label words are mostly one token, so a k-way
        classification costs one pass instead of k).
        """
        pairs = zip(prompts, choices, strict=True)
        reqs = [(i, self._request(p, c)) for i, (p, cs) in enumerate(pairs) for c in cs]
        scores = [0.0] * len(reqs)
        shared: dict[tuple[int, ...], list[int]] = {}  # context -> its one-token requests
        for r, (_, (ctx, cont)) in enumerate(reqs):
            if len(cont) == 1:
                shared.setdefault(tuple(ctx), []).append(r)
        contexts = list(shared)
        for batch in _batches([len(c) for c in contexts], self.batch_size):
            logits = self._logits([list(contexts[c]) for c in batch], 1)[:, -1]  # (B, V)
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            for b, c in enumerate(batch):
                for r in shared[contexts[c]]:
                    scores[r] = float(logp[b, reqs[r][1][1][0]])
        longer = [r for r, (_, (_, cont)) in enumerate(reqs) if len(cont) > 1]
        for batch in _batches(
            [len(reqs[r][1][0]) + len(reqs[r][1][1]) for r in longer], self.batch_size
        ):
            batch = [longer[b] for b in batch]
            seqs = [reqs[r][1][0] + reqs[r][1][1] for r in batch]
            conts = [reqs[r][1][1] for r in batch]
            keep = max(len(t) for t in conts)
            logits = self._logits([s[:-1] for s in seqs], keep)  # (B, keep, V)
            targets = torch.tensor([[-1] * (keep - len(t)) + t for t in conts])
            logp = _token_logprobs(logits, targets.to(logits.device)).cpu()
            for b, r in enumerate(batch):
                scores[r] = float(logp[b, keep - len(conts[b]) :].sum())
        return _regroup([i for i, _ in reqs], scores, len(prompts))

    def _logits(self, seqs: list[list[int]], keep: int) -> torch.Tensor:
        """Logits of the last ``keep`` positions of left-padded ``seqs``: (B, keep, V)."""
        ids, mask = _pad(seqs, _pad_id(self.tokenizer), left=True)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        kwargs = {k: v.to(self.model.device) for k, v in kwargs.items()}
        try:
            logits = self.model(**kwargs, logits_to_keep=keep).logits
        except TypeError:  # older models without logits_to_keep: full logits, then cut
            logits = self.model(**kwargs).logits
        return logits[:, -keep:]

    @torch.inference_mode()
    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy continuation of each prompt (new text only, special tokens removed)."""
        encoded = [self.encode(self.render(p)) for p in prompts]
        out = [""] * len(prompts)
        for batch in _batches([len(e) for e in encoded], self.batch_size):
            ids, mask = _pad([encoded[i] for i in batch], _pad_id(self.tokenizer), left=True)
            gen = _greedy(self.model, ids, mask, max_new_tokens, _pad_id(self.tokenizer), self.stop)
            new = gen[:, ids.shape[1] :]  # only the new tokens
            for b, i in enumerate(batch):
                out[i] = self.tokenizer.decode(new[b], skip_special_tokens=True)
        return out


class Seq2SeqBackend:
    """An encoder-decoder ``transformers`` model (T5 / Flan-T5).

    A choice is scored as a complete decoder target: its tokens plus the EOS (leading
    whitespace is stripped, since T5 targets carry no delimiter), so "positive" does not also
    get the credit of "positively".

    Args:
        model: The model (``AutoModelForSeq2SeqLM``).
        tokenizer: Its tokenizer.
        batch_size: Requests per forward pass.
    """

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def _target(self, choice: str) -> list[int]:
        ids = list(self.tokenizer(choice.strip(), add_special_tokens=False)["input_ids"])
        eos = self.tokenizer.eos_token_id
        return ids + ([eos] if eos is not None else [])

    @torch.inference_mode()
    def score_choices(self, prompts: list[str], choices: list[list[str]]) -> list[list[float]]:
        """Summed log-likelihood of each choice as the decoder target for its prompt."""
        enc = [list(self.tokenizer(p)["input_ids"]) for p in prompts]
        reqs = [(i, self._target(c)) for i, cs in enumerate(choices) for c in cs]
        scores, pad = [0.0] * len(reqs), _pad_id(self.tokenizer)
        for batch in _batches([len(enc[i]) + len(t) for i, t in reqs], self.batch_size):
            ids, mask = _pad([enc[reqs[r][0]] for r in batch], pad, left=False)
            labels, lmask = _pad([reqs[r][1] for r in batch], pad, left=False)
            labels[lmask == 0] = -100  # ignored positions; the model shifts labels itself
            ids, mask, labels = (t.to(self.model.device) for t in (ids, mask, labels))
            logits = self.model(input_ids=ids, attention_mask=mask, labels=labels).logits
            logp = _token_logprobs(logits, labels).cpu() * lmask  # (B, T_target)
            for b, r in enumerate(batch):
                scores[r] = float(logp[b].sum())
        return _regroup([i for i, _ in reqs], scores, len(prompts))

    @torch.inference_mode()
    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy decoding of each prompt (special tokens removed)."""
        enc = [list(self.tokenizer(p)["input_ids"]) for p in prompts]
        out = [""] * len(prompts)
        for batch in _batches([len(e) for e in enc], self.batch_size):
            ids, mask = _pad([enc[i] for i in batch], _pad_id(self.tokenizer), left=False)
            gen = _greedy(self.model, ids, mask, max_new_tokens, _pad_id(self.tokenizer))
            for b, i in enumerate(batch):
                out[i] = self.tokenizer.decode(gen[b], skip_special_tokens=True)
        return out
