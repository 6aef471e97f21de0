"""A suite's models: the base model and backend, task vectors, and deltas applied in place.

- :func:`load_base` loads the base model and tokenizer once (``transformers`` imported here).
- :func:`make_backend` wraps them in the harness backend: ``Seq2SeqBackend`` for Flan-T5, or
  ``CausalLMBackend`` with the chat template applied once and its variables pinned (Llama-3.2's
  ``date_string``), so prompts start with exactly one BOS and do not depend on the day.
- :func:`task_vector` reads a task's delta: ``LowRank`` per module from a PEFT adapter, or
  ``Dense(fine-tuned - base)`` from a full checkpoint, on the q/v attention weights (``qv``, the
  seed code's choice) or on every parameter the fine-tune changed (``changed``).
- :func:`apply_deltas` adds merged deltas to the loaded model's weights and restores them on
  exit (exact: the original tensors are saved), instead of deep-copying the model per merge.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from starmerge.errors import InputError
from starmerge.eval.backends import CausalLMBackend, Seq2SeqBackend
from starmerge.io.adapter import load_adapter
from starmerge.io.checkpoint import TensorIndex
from starmerge.io.hub import ADAPTER_PATTERNS, looks_like_hub_id, resolve
from starmerge.suites import Suite, SuiteTask
from starmerge.tensors.delta import Delta, Dense, LowRank

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FULL_KEYS = ("qv", "changed")
# The seed differences exactly the q and v weights of every attention block (T5: q, v).
QV_KEY = re.compile(r"\.(q|v|q_proj|v_proj)\.weight$")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else unchanged."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_base(suite: Suite, dtype: str, device: str) -> tuple[Any, Any]:
    """The suite's base model (eval mode, on ``device``) and its tokenizer."""
    import transformers as tf

    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    cls = tf.AutoModelForSeq2SeqLM if suite.model_class == "seq2seq" else tf.AutoModelForCausalLM
    try:
        model = cls.from_pretrained(suite.base_model, dtype=DTYPES[dtype])
        tokenizer = tf.AutoTokenizer.from_pretrained(suite.base_model)
    except OSError as err:
        first = (str(err).strip().splitlines() or ["?"])[0][:200]
        raise InputError(
            f"cannot load base model {suite.base_model!r} of suite {suite.name} ({first}); "
            "check the id, your hub access (gated models need `huggingface-cli login`) or path"
        ) from None
    return model.to(resolve_device(device)).eval(), tokenizer


def make_backend(suite: Suite, model: Any, tokenizer: Any, batch_size: int) -> Any:
    """The harness backend for the suite's model class."""
    if suite.model_class == "seq2seq":
        return Seq2SeqBackend(model, tokenizer, batch_size=batch_size)
    return CausalLMBackend(
        model,
        tokenizer,
        batch_size=batch_size,
        chat_template=suite.chat_template,
        template_kwargs=dict(suite.template_kwargs),
    )


def _checkpoint_dir(ref: str, what: str) -> Path:
    """A local checkpoint directory; for a hub id, only its config and weight files."""
    path = resolve(ref, what=what, allow_patterns=["*.json", "*.safetensors"])
    if looks_like_hub_id(ref) and not Path(ref).exists() and not any(path.glob("*.safetensors")):
        path = resolve(ref, what=what, allow_patterns=["*.json", "*.bin"])
    return path


def task_vector(suite: Suite, task: SuiteTask, full_keys: str = "qv") -> dict[str, Delta]:
    """The task's delta per parameter key (on the CPU).

    Args:
        suite: The suite (its base model is needed for full checkpoints).
        task: The task; its ``adapter`` or ``model``.
        full_keys: For full checkpoints: ``qv`` (the seed's q/v attention weights) or
            ``changed`` (every floating-point parameter that differs from the base).

    Raises:
        InputError: Unreadable inputs, or a full checkpoint with none of the selected keys.
    """
    if task.adapter:
        path = resolve(
            task.adapter, what=f"adapter of task {task.name}", allow_patterns=ADAPTER_PATTERNS
        )
        adapter = load_adapter(path)
        return {key: adapter.get(key) for key in adapter.keys()}
    if full_keys not in FULL_KEYS:
        raise InputError(f"full_keys must be one of {FULL_KEYS}, got {full_keys!r}")
    base = TensorIndex.open(_checkpoint_dir(suite.base_model, "base_model"))
    ft = TensorIndex.open(_checkpoint_dir(str(task.model), f"model of task {task.name}"))
    return full_task_vector(base, ft, full_keys, task.name)


def full_task_vector(
    base: TensorIndex, ft: TensorIndex, full_keys: str, name: str
) -> dict[str, Delta]:
    """``Dense(ft - base)`` in float32 on the selected keys (see :func:`task_vector`)."""
    out: dict[str, Delta] = {}
    for key in ft.keys():
        if not ft.dtype(key).is_floating_point or key not in base:
            continue  # buffers; tied aliases the base stores under another name
        if full_keys == "qv" and not QV_KEY.search(key):
            continue
        if ft.shape(key) != base.shape(key):
            raise InputError(
                f"model of task {name}: '{key}' has shape {ft.shape(key)} but "
                f"{base.shape(key)} in the base model; give the base it was fine-tuned from"
            )
        delta = ft.get(key).to(torch.float32) - base.get(key).to(torch.float32)
        if full_keys == "qv" or bool(delta.any()):
            out[key] = Dense(delta)
    if not out:
        raise InputError(
            f"model of task {name} ({ft.path}): no {full_keys!r} parameters differ from the base "
            "model; check that it is a fine-tune of this base"
        )
    return out


def _dense_on(delta: Delta, device: torch.device) -> torch.Tensor:
    """The delta as a float32 tensor on ``device`` (a low-rank product formed there)."""
    if isinstance(delta, LowRank):
        b, a = delta.b.to(device, torch.float32), delta.a.to(device, torch.float32)
        return (b @ a) * delta.scale
    return delta.tensor.to(device, torch.float32)


@contextlib.contextmanager
def apply_deltas(model: torch.nn.Module, deltas: Mapping[str, Delta]) -> Iterator[None]:
    """Add ``deltas`` to the model's weights in place; restore the original weights on exit.

    Keys are state-dict names (``model.layers.0.self_attn.q_proj.weight``). Tied aliases of one
    tensor get its delta once. The originals are saved on the CPU and copied back exactly, so a
    sweep loads the base model once and never deep-copies it (the seed code copied it per merge).

    Raises:
        InputError: A key is not a parameter of the model (the seed code skipped such keys
            silently and evaluated the unmodified base model).

    Example:
        >>> with apply_deltas(model, merged.deltas):  # doctest: +SKIP
        ...     scores = evaluate(backend, tasks)
    """
    named = model.state_dict(keep_vars=True)
    unknown = [k for k in deltas if k not in named]
    if unknown:
        raise InputError(
            f"{len(unknown)} delta key(s) are not parameters of the model, e.g. {unknown[0]!r} "
            f"(the model has e.g. {next(iter(named))!r}); the task models must be fine-tunes "
            "of this base model"
        )
    targets: dict[int, tuple[str, torch.Tensor]] = {}
    for key in deltas:
        targets.setdefault(id(named[key]), (key, named[key]))
    saved = {i: t.detach().to("cpu", copy=True) for i, (_, t) in targets.items()}
    try:
        with torch.no_grad():
            for key, tensor in targets.values():
                new = tensor.to(torch.float32) + _dense_on(deltas[key], tensor.device)
                tensor.copy_(new.to(tensor.dtype))
        yield
    finally:
        with torch.no_grad():
            for i, (_, tensor) in targets.items():
                tensor.copy_(saved[i])
