"""Tiny random models for the offline suites: tokenizer, model, PEFT adapters, full fine-tunes.

:func:`build_model` saves a tiny random model of a suite's architecture (T5, Llama or Mistral,
built from a config with the real module names) with a small word-level tokenizer (BOS, EOS, and
the suite's chat template: Llama-3-style with its date line, or Mistral's ``[INST]``);
:func:`make_adapter` makes a PEFT adapter on it with ``peft``, and :func:`make_full_checkpoint` a
fine-tuned copy whose q/v weights changed. ``starmerge.suites.tiny`` assembles these into a suite.

Needs ``transformers``, ``tokenizers`` and ``peft``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

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
# The vocabulary: the suites' label words, digits, then 14 tokens (punctuation and the FILLER
# nouns) that the data mirror's random texts leave out (``tiny._text``).
WORDS = (
    "yes no true false positive negative neutral entailment entail contradiction contradict "
    "neither maybe choice1 choice2 world sports business sci tech option violence not "
    "plausible answerable gender profession race religion good bad in favor against single "
    "pair coord conn none algebra arithmetic measurement numbers probability neg pos a b c n e "
    "0 1 2 3 4 5 6 7 8 9 . , ? ' the cat dog man house cancer tumor anna tom river"
).split()
FILLER = "the cat dog man house river anna tom cancer tumor".split()


def tiny_tokenizer(kind: str) -> Any:
    """A word-level fast tokenizer: ``t5`` (EOS appended), ``llama``/``mistral`` (BOS first)."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(_SPECIAL + WORDS)}
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
    words = answers or [w for w in WORDS if w not in FILLER and w not in ".,?'"]
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


def make_adapter(base: Path, out_dir: Path, targets: list[str], seed: int, r: int = 4,
                 alpha: int | None = None, scale: float = 0.3,
                 **lora_kwargs: Any) -> Path:  # fmt: skip
    """A PEFT LoRA adapter on ``base`` with random non-zero factors (``scale`` x N(0, 1)).

    ``alpha`` defaults to ``2 r``; ``lora_kwargs`` go to ``LoraConfig`` (``use_rslora``...).
    """
    from peft import LoraConfig, get_peft_model

    model, task_type = _load(base)
    config = LoraConfig(r=r, lora_alpha=2 * r if alpha is None else alpha, target_modules=targets,
                        task_type=task_type, **lora_kwargs)  # fmt: skip
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
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
