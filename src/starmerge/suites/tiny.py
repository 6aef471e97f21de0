"""Tiny offline replicas of the suites, for tests and smoke runs (no hub access).

:func:`make_tiny_suite` builds, under one directory, a tiny random model of the suite's
architecture (T5, Llama or Mistral, built from a config with the real module names) with a small
word-level tokenizer (BOS, EOS, and the suite's chat template: Llama-3-style with its date line,
or Mistral's ``[INST]``), PEFT adapters made with ``peft`` on it (and, for Flan-T5's full
checkpoints, fine-tuned copies whose q/v weights changed), a local mirror of every task's hub
dataset in the hub's schema, and a suite file that ``include``s the built-in suite and points it
at these. ``starmerge reproduce <that file> --data-dir <mirror>`` then runs end to end offline.

Needs ``transformers``, ``tokenizers`` and ``peft``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from starmerge.eval.matching import words
from starmerge.suites import Suite, load_suite

LLAMA_TEMPLATE = (
    "{{- bos_token }}{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}"
    "{%- set date_string = '26 Jul 2024' %}{%- endif %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n<|eot_id|>' }}"
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
_SPECIAL = ["<pad>", "</s>", "<unk>", "<s>", "<|begin_of_text|>", "<|eot_id|>",
            "<|start_header_id|>", "<|end_header_id|>", "[INST]", "[/INST]"]  # fmt: skip
_WORDS = (
    "yes no true false positive negative neutral entailment entail contradiction contradict "
    "neither maybe choice1 choice2 world sports business sci tech option violence not "
    "plausible answerable gender profession race religion good bad in favor against single "
    "pair coord conn none algebra arithmetic measurement numbers probability neg pos a b c n e "
    "0 1 2 3 4 5 6 7 8 9 . , ? ' the cat dog man house cancer tumor anna tom river"
).split()
AG_NEWS = ["World", "Sports", "Business", "Sci/Tech"]
FILLER = "the cat dog man house river anna tom cancer tumor".split()


def tiny_tokenizer(kind: str) -> Any:
    """A word-level fast tokenizer: ``t5`` (EOS appended), ``llama``/``mistral`` (BOS first)."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(_SPECIAL + _WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(_SPECIAL)
    bos = {"t5": None, "llama": "<|begin_of_text|>", "mistral": "<s>"}[kind]
    eos = {"t5": "</s>", "llama": "<|eot_id|>", "mistral": "</s>"}[kind]
    if bos is None:
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])  # fmt: skip
    else:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])  # fmt: skip
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token="<unk>", pad_token="<pad>"
    )
    if kind != "t5":
        fast.chat_template = LLAMA_TEMPLATE if kind == "llama" else MISTRAL_TEMPLATE
    return fast


def _config(kind: str, vocab: int) -> Any:
    import transformers as tf

    common = {"vocab_size": vocab, "num_attention_heads": 4}
    if kind == "t5":
        return tf.T5Config(d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, d_kv=8,
                           decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                           tie_word_embeddings=False, **common)  # fmt: skip
    cls = tf.LlamaConfig if kind == "llama" else tf.MistralConfig
    ids = {"bos_token_id": 4 if kind == "llama" else 3, "eos_token_id": 5 if kind == "llama" else 1}
    return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_key_value_heads=2,
               max_position_embeddings=512, pad_token_id=0, **ids, **common)  # fmt: skip


def build_model(kind: str, out_dir: Path, seed: int = 0, answers: list[str] | None = None) -> Path:
    """A tiny random ``t5``/``llama``/``mistral`` model and its tokenizer, saved to ``out_dir``.

    ``answers``: the only words it generates (default: every non-filler word of its vocabulary).
    """
    import transformers as tf

    tokenizer = tiny_tokenizer(kind)
    torch.manual_seed(seed)
    config = _config(kind, len(tokenizer))
    cls = tf.T5ForConditionalGeneration if kind == "t5" else tf.AutoModelForCausalLM
    model = cls(config) if kind == "t5" else cls.from_config(config)
    _answer_words_only(model, tokenizer, answers)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _answer_words_only(model: Any, tokenizer: Any, answers: list[str] | None) -> None:
    """Zero the output rows of all but the answer words, and scale those up.

    The random model then answers in label words, so tiny tasks get non-zero scores that depend
    on the adapters.
    """
    vocab = tokenizer.get_vocab()
    words = answers or [w for w in _WORDS if w not in FILLER and w not in ".,?'"]
    keep = sorted({vocab[w] for w in words if w in vocab})
    with torch.no_grad():
        head = model.get_output_embeddings().weight  # (V, H)
        mask = torch.ones(head.shape[0], dtype=torch.bool)
        mask[keep] = False
        head[mask] = 0.0
        head[~mask] *= 8.0


def _load(base: Path) -> Any:
    import transformers as tf

    if tf.AutoConfig.from_pretrained(base).model_type == "t5":
        return tf.T5ForConditionalGeneration.from_pretrained(base), "SEQ_2_SEQ_LM"
    return tf.AutoModelForCausalLM.from_pretrained(base), "CAUSAL_LM"


def make_adapter(base: Path, out_dir: Path, targets: list[str], seed: int, r: int = 4) -> Path:
    """A PEFT LoRA adapter on ``base`` with random non-zero factors."""
    from peft import LoraConfig, get_peft_model

    model, task_type = _load(base)
    peft_model = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, task_type=task_type)
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    peft_model.save_pretrained(out_dir)
    return out_dir


def make_full_checkpoint(base: Path, out_dir: Path, seed: int, r: int = 4) -> Path:
    """A "fine-tuned" copy of ``base`` whose q/v weights moved by a rank-``r`` update."""
    model, _ = _load(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".q.weight", ".v.weight")):
                b = torch.randn(p.shape[0], r, generator=gen) * 0.3
                p.add_(b @ (torch.randn(r, p.shape[1], generator=gen) * 0.3))
    model.save_pretrained(out_dir)
    return out_dir


# ---- hub-schema rows ------------------------------------------------------------------------


def _text(rng: random.Random, n: int = 6) -> str:
    return " ".join(rng.choice(_WORDS[:-14]) for _ in range(n))  # varied inputs, varied outputs


def _glue(config: str) -> Callable[[random.Random, int, int], dict[str, Any]]:
    cols = {
        "mnli_matched": ("premise", "hypothesis", 3), "mrpc": ("sentence1", "sentence2", 2),
        "qnli": ("question", "sentence", 2), "qqp": ("question1", "question2", 2),
        "rte": ("sentence1", "sentence2", 2), "sst2": ("sentence", None, 2),
        "cola": ("sentence", None, 2), "stsb": ("sentence1", "sentence2", 0),
    }[config]  # fmt: skip

    def row(rng: random.Random, i: int, _: int) -> dict[str, Any]:
        out: dict[str, Any] = {cols[0]: _text(rng)}
        if cols[1]:
            out[cols[1]] = _text(rng)
        out["label"] = round(rng.uniform(0, 5), 3) if cols[2] == 0 else i % cols[2]
        return {**out, "idx": i}

    return row


def _super_glue(config: str) -> Callable[[random.Random, int, int], dict[str, Any]]:
    def row(rng: random.Random, i: int, _: int) -> dict[str, Any]:
        t = lambda: _text(rng)  # noqa: E731
        base = {"wic": {"word": "cat", "sentence1": t(), "sentence2": t(), "start1": 0,
                        "start2": 0, "end1": 3, "end2": 3},
                "cb": {"premise": t(), "hypothesis": t()},
                "multirc": {"paragraph": t(), "question": t(), "answer": t()},
                "copa": {"premise": t(), "choice1": t(), "choice2": t(),
                         "question": rng.choice(["cause", "effect"])},
                "wsc": {"text": t(), "span1_index": 0, "span2_index": 3, "span1_text": "cat",
                        "span2_text": "dog"}}[config]  # fmt: skip
        idx: Any = {"paragraph": 0, "question": i, "answer": i} if config == "multirc" else i
        return {**base, "idx": idx, "label": i % (3 if config == "cb" else 2)}

    return row


def _lots_of_loras(spec: Any) -> Callable[[random.Random, int, int], dict[str, Any]]:
    words = [v[0] for v in (spec.label_words or {}).values()]

    def row(rng: random.Random, i: int, _: int) -> dict[str, Any]:
        if spec.metadata.get("transform") == "lots_of_loras_prefix":  # dream
            gold = f"{words[i % len(words)]} {_text(rng, 3)}"
        elif words:
            gold = words[i % len(words)]
        else:
            gold = _text(rng, 2)
        return {"input": f"Question: {_text(rng)}? Answer:", "output": [gold], "id": f"t-{i}"}

    return row


def _row_maker(spec: Any) -> Callable[[random.Random, int, int], dict[str, Any]]:
    src = spec.source
    if src.path == "nyu-mll/glue":
        return _glue(str(src.config))
    if src.path == "aps/super_glue":
        return _super_glue(str(src.config))
    if src.path.startswith("Lots-of-LoRAs/"):
        return _lots_of_loras(spec)
    makers: dict[str, Callable[[random.Random, int, int], dict[str, Any]]] = {
        "stanfordnlp/imdb": lambda r, i, _: {"text": _text(r, 12), "label": i % 2},
        "takala/financial_phrasebank": lambda r, i, _: {"sentence": _text(r), "label": i % 3},
        "SetFit/ag_news": lambda r, i, _: {"text": _text(r), "label": i % 4,
                                           "label_text": AG_NEWS[i % 4]},
        "Rowan/hellaswag": lambda r, i, _: {
            "ind": i, "activity_label": "cat", "ctx_a": _text(r), "ctx_b": "the",
            "ctx": _text(r), "endings": [_text(r, 3) for _ in range(4)], "source_id": f"s{i}",
            "split": "val", "split_type": "indomain", "label": str(i % 4)},
        "google/boolq": lambda r, i, _: {"question": _text(r), "answer": bool(i % 2),
                                         "passage": _text(r, 10)},
        "ybisk/piqa": lambda r, i, _: {"goal": _text(r), "sol1": _text(r), "sol2": _text(r),
                                       "label": i % 2},
    }  # fmt: skip
    return makers[src.path]


def write_mirror(
    suite: Suite, data_dir: Path, rows: int = 12, seed: int = 0, train_rows: int | None = None
) -> Path:
    """A local mirror of every task's hub split, in the hub schema (JSON lines).

    Each task's training split (``train:`` in the suite) gets ``train_rows`` rows (default
    ``rows``) unless it is the evaluated split itself (financial_phrasebank).
    """
    from starmerge.suites.training import train_spec

    rng = random.Random(seed)
    for task in suite.tasks.values():
        _write_split(task.spec().source, _row_maker(task.spec()), data_dir, rows, rng, True)
    for task in suite.tasks.values():  # after the evaluated splits, which stay as they were
        if task.train is not None:
            src = train_spec(task.spec(), task.train).source
            _write_split(src, _row_maker(task.spec()), data_dir, train_rows or rows, rng)
    return Path(data_dir)


def _write_split(
    src: Any, maker: Callable, data_dir: Path, rows: int, rng: random.Random, replace: bool = False
) -> None:
    path = Path(data_dir) / src.path / (src.config or "default") / f"{src.split}.jsonl"
    if path.exists() and not replace:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(maker(rng, i, rows)) for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")


_ARCH = {
    "flan-t5-large": ("t5", ["q", "v"]),
    "llama-3.2-3b-instruct": ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                        "up_proj"]),
    "mistral-7b-instruct": ("mistral", ["q_proj", "k_proj", "v_proj"]),
}  # fmt: skip


def make_tiny_suite(
    name: str, root: Path, tasks: list[str] | None = None, rows: int = 12,
    train_rows: int | None = None,
) -> tuple[Path, Path]:  # fmt: skip
    """Build a tiny offline copy of built-in suite ``name`` under ``root``.

    ``rows`` rows per evaluated split, ``train_rows`` (default ``rows``) per training split.

    Returns:
        ``(suite file, data mirror directory)``.

    Example:
        >>> suite_file, data = make_tiny_suite("flan-t5-large", tmp_path)  # doctest: +SKIP
        >>> reproduce(suite_file, out, runtime=Runtime(data_dir=str(data)))  # doctest: +SKIP
    """
    root = Path(root)
    builtin = load_suite(name)
    kind, targets = _ARCH[name]
    answers = [w for t in builtin.tasks.values() for ws in (t.spec().label_words or {}).values()
               for v in ws for w in words(v)]  # fmt: skip
    base = build_model(kind, root / "base", answers=answers or None)
    entries = {}
    for i, task in enumerate(tasks or list(builtin.tasks)):
        spec = builtin.task(task)
        if spec.adapter:
            path = make_adapter(base, root / "adapters" / task, targets, seed=100 + i)
            entries[task] = {"adapter": str(path)}
        else:
            path = make_full_checkpoint(base, root / "models" / task, seed=100 + i)
            entries[task] = {"model": str(path)}
    suite_file = root / f"{name}-tiny.yaml"
    data = {"include": name, "base_model": str(base), "tasks": entries, "batch_size": 4}
    suite_file.write_text(json.dumps(data, indent=1) + "\n")
    write_mirror(load_suite(suite_file), root / "data", rows=rows, train_rows=train_rows)
    return suite_file, root / "data"
