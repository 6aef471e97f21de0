"""``starmerge eval``: score one saved model (optionally with a PEFT adapter) on task files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from starmerge.errors import InputError


def load_backend(
    model_path: str,
    *,
    adapter: str | None = None,
    batch_size: int = 8,
    chat_template: bool = False,
    template_kwargs: dict | None = None,
) -> Any:
    """Load a HF model (+ adapter, merged in) and its tokenizer as an evaluation backend.

    Encoder-decoder models get a ``Seq2SeqBackend``, others a ``CausalLMBackend``.

    Raises:
        InputError: The path is not a model directory or has no tokenizer.
    """
    import transformers as tf

    from starmerge.eval.backends import CausalLMBackend, Seq2SeqBackend
    from starmerge.io.hub import resolve

    path = resolve(model_path, what="model")
    try:
        config = tf.AutoConfig.from_pretrained(path)
        tokenizer = tf.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise InputError(
            f"cannot load a model and tokenizer from {path} ({str(exc).splitlines()[0]}); give "
            "a HF model directory with config.json and tokenizer files"
        ) from None
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    cls = tf.AutoModelForSeq2SeqLM if seq2seq else tf.AutoModelForCausalLM
    model = cls.from_pretrained(path)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, resolve(adapter, what="adapter"))
        model = model.merge_and_unload()
    model.eval()
    if seq2seq:
        return Seq2SeqBackend(model, tokenizer, batch_size=batch_size)
    return CausalLMBackend(
        model,
        tokenizer,
        batch_size=batch_size,
        chat_template=chat_template,
        template_kwargs=template_kwargs,
    )


def evaluate_model(
    model_path: str,
    tasks: Sequence[str],
    out_dir: Path,
    *,
    adapter: str | None = None,
    name: str | None = None,
    batch_size: int = 8,
    seed: int = 0,
    chat_template: bool = False,
) -> tuple[dict, Path]:
    """Evaluate one model on ``tasks`` and write a results JSON with one row.

    Returns:
        The results dict and the path it was written to.

    Example:
        >>> results, path = evaluate_model("out/merged", ["example_sst2"], Path("results/eval"))
    """
    from starmerge.eval.results import Results
    from starmerge.eval.runner import evaluate
    from starmerge.eval.tasks import load_task

    specs = [load_task(t) for t in tasks]
    backend = load_backend(
        model_path, adapter=adapter, batch_size=batch_size, chat_template=chat_template
    )
    row = name or Path(model_path.rstrip("/")).name
    config = {
        "model": model_path,
        "adapter": adapter,
        "tasks": list(tasks),
        "chat_template": chat_template,
    }
    results = Results(suite="eval", model=model_path, seed=seed, config=config)
    results.add_eval(row, evaluate(backend, specs, seed=seed))
    path = results.write(out_dir, name=row)
    return results.to_json(), path
