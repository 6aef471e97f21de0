"""The decoder tier's pieces on a tiny random Gemma-3 built from a config (no download).

The tokenizer is a word-level one built here from the words of the texts used, with a BOS
like Gemma's; the real Gemma runs in the slow test ``tests/integration/test_demo_gemma.py``.
"""

from __future__ import annotations

import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors  # noqa: E402

from starmerge.demo.assets import TaskData  # noqa: E402
from starmerge.demo.decoder import answer_batch, answer_loss, encode_items  # noqa: E402
from starmerge.demo.decoder_tasks import (  # noqa: E402
    Prompter,
    check_first_tokens,
    first_line,
    load_trivia,
)
from starmerge.errors import StarmergeError  # noqa: E402
from starmerge.eval.backends import CausalLMBackend  # noqa: E402

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]


def word_tokenizer(texts):
    """Word-level tokenizer over the words (and punctuation) of ``texts``; adds a BOS."""
    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t)})
    vocab = {w: i for i, w in enumerate(SPECIAL + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 2)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>")  # fmt: skip


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def tiny_gemma(vocab_size, seed=0):
    torch.manual_seed(seed)
    config = transformers.Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        pad_token_id=0, eos_token_id=1, bos_token_id=2)  # fmt: skip
    return transformers.Gemma3ForCausalLM(config).eval()


NEWS = TaskData("news", ("stocks fell as the bank cut rates", "the team won the cup final",
                         "a new phone with a faster chip"), (0, 1, 2),
                ("business", "sports", "tech"), "test")  # fmt: skip
TRIVIA = TaskData("trivia", ("What is the capital of France ?", "Who wrote Hamlet ?"), (0, 1),
                  ("Paris", "William Shakespeare"), "test", generation=True)  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    texts = [*NEWS.texts, *TRIVIA.texts, *NEWS.label_names, *TRIVIA.label_names,
             "Article : Topic Question Answer"]  # fmt: skip
    return word_tokenizer(texts)


def test_answer_loss_equals_full_logit_cross_entropy(tok):
    """Slicing hidden states to the answer positions gives the full-logit loss exactly."""
    model = tiny_gemma(len(tok))
    prompter = Prompter(tok, max_length=32)
    backend = CausalLMBackend(model, tok)
    items = encode_items(backend, prompter, NEWS) + encode_items(backend, prompter, TRIVIA)
    answers = [
        len(tok(f" {a}\n", add_special_tokens=False)["input_ids"]) for a in TRIVIA.label_names
    ]
    assert [len(t) for _, t in items] == [1, 1, 1, *answers]  # label word's first token; answer
    assert answers[1] > 1
    with torch.no_grad():
        got = answer_loss(model, answer_batch(items, tok.pad_token_id), reduction="none")
        want = []
        for ctx, tgt in items:  # unpadded, every position's logits, the obvious way
            logp = torch.log_softmax(model(torch.tensor([ctx + tgt])).logits[0].float(), -1)
            want.append(
                -sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(tgt)) / len(tgt)
            )
    assert got.tolist() == pytest.approx(want, abs=1e-5)
    mean = answer_loss(model, answer_batch(items, tok.pad_token_id))
    n_tokens = sum(len(t) for _, t in items)
    token_mean = sum(w * len(t) for w, (_, t) in zip(want, items, strict=True)) / n_tokens
    assert float(mean) == pytest.approx(token_mean, abs=1e-5)


def test_prompts_are_cut_before_the_template_so_the_cue_survives(tok):
    long = TaskData("news", (" ".join(["stocks fell as the bank cut rates"] * 20),), (0,),
                    NEWS.label_names, "test")  # fmt: skip
    prompter = Prompter(tok, max_length=16)
    (prompt,) = prompter.prompts(long)
    assert prompt.endswith("\nTopic:") and prompt.startswith("Article: stocks fell")
    assert len(CausalLMBackend(tiny_gemma(len(tok)), tok).encode(prompt)) <= 16
    short = Prompter(tok, max_length=64).prompts(NEWS)
    assert short[0] == "Article: stocks fell as the bank cut rates\nTopic:"


def test_targets_and_label_words(tok):
    prompter = Prompter(tok, max_length=32)
    assert prompter.choices(NEWS) == [" business", " sports", " tech"]
    assert prompter.target(NEWS, 1) == tok(" sports", add_special_tokens=False)["input_ids"]
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    assert (
        prompter.target(TRIVIA, 0) == tok(" Paris", add_special_tokens=False)["input_ids"] + newline
    )


def test_label_words_sharing_a_first_token_are_refused(tok):
    clash = TaskData("news", NEWS.texts, NEWS.labels, ("tech", "tech stocks", "sports"), "test")
    with pytest.raises(StarmergeError, match="start with the same token"):
        check_first_tokens(Prompter(tok, 32), [clash])
    check_first_tokens(Prompter(tok, 32), [NEWS, TRIVIA])  # distinct (and generation skipped)


def test_first_line_is_the_answer():
    assert first_line(" Paris\nQuestion: next") == "Paris"
    assert first_line("\n  William Shakespeare  ") == "William Shakespeare"


def test_trivia_loader_counts_and_pairs():
    trivia = load_trivia()
    assert trivia.generation and len(trivia) >= 200
    assert len(set(trivia.texts)) == len(trivia)  # one answer per question
    by_question = dict(zip(trivia.texts, trivia.labels, strict=True))
    nixon = next(q for q in trivia.texts if "37th President" in q)
    assert trivia.label_names[by_question[nixon]] == "Richard Nixon"


def test_decoder_tier_end_to_end_on_a_tiny_gemma(tmp_path, monkeypatch):
    """``run_demo(model="gemma-270m")`` with the tiny model in Gemma's place: the whole loop."""
    import copy
    import json

    from starmerge.demo import run as demo
    from starmerge.demo.decoder_tasks import load_decoder_task
    from starmerge.eval.results import validate_results

    tasks = ["langid", "trivia"]
    texts = [t for name in tasks for t in load_decoder_task(name).texts]
    names = [n for name in tasks for n in load_decoder_task(name).label_names]
    tok = word_tokenizer([*texts, *names, "Sentence : Language Question Answer"])
    model = tiny_gemma(len(tok))
    monkeypatch.setattr("starmerge.demo.gemma.load", lambda cache: (tok, copy.deepcopy(model)))
    methods = ["simple_average", "star", "regmean", "fisher_merging"]
    kwargs = dict(demo.DECODER, tasks=tasks, steps=3, batch_size=4, n_train=40, n_test=10,
                  n_stats=4, methods=methods)  # fmt: skip
    data = demo.run_demo(**kwargs, full=False, out_dir=tmp_path / "out",
                         cache_dir=tmp_path / "cache", progress=False)  # fmt: skip
    assert data["failed"] == {} and data["skipped"] == []
    stored = json.loads(open(data["files"]["results"]).read())
    assert validate_results(stored) == [] and stored["suite"] == "demo-gemma-270m"
    assert {t: stored["tasks"][t]["metric"] for t in tasks} == {
        "langid": "accuracy", "trivia": "exact_match"}  # fmt: skip
    rows = {row["name"]: row for row in stored["rows"]}
    assert list(rows) == ["base", "individual", *methods]
    trivia = stored["predictions"]["base"]["trivia"]
    assert len(trivia) == 10 and all(isinstance(p["pred"], str) for p in trivia)
    gold = {p["gold"] for p in trivia}
    assert gold <= set(load_decoder_task("trivia").label_names)
    # The decoder adapters are real PEFT adapters on q/v of the Gemma parameter names.
    adapter = next((tmp_path / "cache/demo/gemma-270m").glob("langid-*/adapter"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert not (adapter.parent / "head.safetensors").exists()
    # Statistics came from the answer-position loss on training items.
    assert data["data_used"]["regmean"]["split"] == "train"


def test_tiers_are_found_by_model_name():
    from starmerge.demo import decoder as demo_decoder
    from starmerge.demo import encoder as demo_encoder
    from starmerge.demo.train import tier_module
    from starmerge.errors import UnknownNameError

    assert tier_module("gemma-270m") is demo_decoder and tier_module("minilm") is demo_encoder
    with pytest.raises(UnknownNameError, match="'gema-270m'.*gemma-270m"):
        tier_module("gema-270m")
