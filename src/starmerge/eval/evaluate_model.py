"""``starmerge eval``: score one saved model (optionally with a PEFT adapter) on task files."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from starmerge.errors import InputError, OutputError
from starmerge.eval.backends import CausalLMBackend, Seq2SeqBackend
from starmerge.eval.results import Results
from starmerge.eval.runner import evaluate
from starmerge.eval.tasks import load_task
from starmerge.io.checkpoint import TensorIndex
from starmerge.io.hub import resolve

# Weight files whose safetensors headers are checked before transformers or PEFT open them.
_SAFETENSORS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


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
        InputError: The path is not a model directory, has no tokenizer, or holds a truncated
            or corrupt weights file (the model's or the adapter's).
    """
    import transformers as tf

    path = resolve(model_path, what="model")
    adapter_path = None if adapter is None else resolve(adapter, what="adapter")
    for checkpoint in (path, adapter_path):  # before anything loads, so the error comes alone
        _check_headers(checkpoint)
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
    model = _pretrained(lambda: cls.from_pretrained(path), path, "model")
    if adapter_path is not None:
        from peft import PeftModel

        model = _pretrained(
            lambda: PeftModel.from_pretrained(model, adapter_path), adapter_path, "adapter"
        )
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


def _check_headers(path: Path | None) -> None:
    """Read the safetensors headers in ``path`` with starmerge's own reader.

    A truncated or corrupt file is then named as it is for a merge (``InputError``).
    """
    for name in _SAFETENSORS:
        if path is not None and (Path(path) / name).is_file():
            with TensorIndex.open(Path(path) / name):
                pass


def _pretrained(load: Callable[[], Any], path: Path, what: str) -> Any:
    """Run a ``from_pretrained`` call, turning a bad checkpoint into one ``InputError``."""
    try:
        return load()
    except (SafetensorError, OSError) as exc:
        raise InputError(
            f"cannot load the {what} in {path} ({_first_line(exc)}); re-download or "
            f"re-save the {what}"
        ) from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


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
    try:
        path = results.write(out_dir, name=row)
    except OSError as exc:
        raise OutputError(
            f"cannot write the results to {out_dir} ({exc.strerror or exc}); give a writable "
            "directory with --out"
        ) from None
    return results.to_json(), path
