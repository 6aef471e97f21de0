"""Backends on tiny random models built from configs, with a word-level tokenizer built here."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402

from starmerge.errors import UnknownNameError  # noqa: E402
from starmerge.eval.backends import (  # noqa: E402
    Backend,
    CausalLMBackend,
    ClassifierBackend,
    ClassifierHeadBackend,
    Seq2SeqBackend,
)
from starmerge.eval.runner import evaluate  # noqa: E402
from starmerge.eval.tasks import load_task  # noqa: E402

WORDS = (
    "<pad> <s> </s> <unk> review sentiment positive negative good bad movie film : the a an "
    "not great awful and it was very"
).split()
PROMPTS = [
    "review : good movie sentiment :",
    "review : the bad film",
    "review : not a good movie and it was very very bad sentiment :",
    "review : great",
    "the awful movie",
]
CHOICES = [[" positive", " negative"], [" good", " bad movie"], [" positive", " negative"],
           [" a", " an the"], [" positive", " negative"]]  # fmt: skip


def make_tokenizer(bos=True):
    vocab = {w: i for i, w in enumerate(WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:  # adds <s> like Llama's tokenizer does
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
        )
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    # Like Llama-3's template, it writes the BOS itself.
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}user : {{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %} sentiment :{% endif %}"
    )
    return tok


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def t5():
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=len(WORDS), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=2)  # fmt: skip
    return transformers.T5ForConditionalGeneration(config).eval()


@torch.no_grad()
def _reference_scores(model, tok, prompts, choices):
    """Unbatched, unpadded, full-logit log-likelihoods (the obvious way)."""
    out = []
    for prompt, cs in zip(prompts, choices, strict=True):
        row = []
        for c in cs:
            ctx, whole = tok(prompt)["input_ids"], tok(prompt + c)["input_ids"]
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0], -1)
            row.append(sum(float(logp[t - 1, whole[t]]) for t in range(len(ctx), len(whole))))
        out.append(row)
    return out


def _argmax(rows):
    return [max(range(len(r)), key=r.__getitem__) for r in rows]


def test_causal_scores_do_not_depend_on_batch_size(llama, tok):
    one = CausalLMBackend(llama, tok, batch_size=1).score_choices(PROMPTS, CHOICES)
    three = CausalLMBackend(llama, tok, batch_size=3).score_choices(PROMPTS, CHOICES)
    assert _argmax(one) == _argmax(three)
    for a, b in zip(one, three, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    ref = _reference_scores(llama, tok, PROMPTS, CHOICES)
    for a, r in zip(three, ref, strict=True):
        assert a == pytest.approx(r, abs=1e-4)


def test_exactly_one_bos(llama, tok):
    plain = CausalLMBackend(llama, tok)
    ids = plain.encode(plain.render("review : good"))
    assert ids == [1, *tok("review : good", add_special_tokens=False)["input_ids"]]
    chat = CausalLMBackend(llama, tok, chat_template=True)
    text = chat.render("review : good")
    assert text.startswith("<s>")
    naive = tok(text)["input_ids"]  # the seed code's way: template, then tokenizer(...)
    assert naive[:2] == [1, 1]
    ids = chat.encode(text)
    assert ids[0] == 1 and ids.count(1) == 1
    # a tokenizer that adds no BOS gets none
    no_bos = CausalLMBackend(llama, make_tokenizer(bos=False))
    assert 1 not in no_bos.encode("review : good")


def test_chat_template_kwargs_reach_the_template(llama, tok):
    tok2 = make_tokenizer()
    tok2.chat_template = "{{ bos_token }}{{ date_string }} {{ messages[0]['content'] }}"
    backend = CausalLMBackend(
        llama, tok2, chat_template=True, template_kwargs={"date_string": "good"}
    )
    assert backend.render("bad") == "<s>good bad"


def test_causal_generation_returns_strings_batch_invariant(llama, tok):
    one = CausalLMBackend(llama, tok, batch_size=1).generate(PROMPTS, max_new_tokens=4)
    three = CausalLMBackend(llama, tok, batch_size=3).generate(PROMPTS, max_new_tokens=4)
    assert all(isinstance(t, str) for t in one) and len(one) == len(PROMPTS)
    assert one == three
    assert any(one)


def test_seq2seq_scores_and_generation(t5, tok):
    one = Seq2SeqBackend(t5, tok, batch_size=1).score_choices(PROMPTS, CHOICES)
    three = Seq2SeqBackend(t5, tok, batch_size=3).score_choices(PROMPTS, CHOICES)
    assert _argmax(one) == _argmax(three)
    for a, b in zip(one, three, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    # the choice is scored as a complete target: word then EOS
    enc = torch.tensor([tok(PROMPTS[0])["input_ids"]])
    labels = torch.tensor([[tok.convert_tokens_to_ids("positive"), 2]])
    with torch.no_grad():
        logp = torch.log_softmax(t5(input_ids=enc, labels=labels).logits[0], -1)
    assert one[0][0] == pytest.approx(float(logp[0, labels[0, 0]] + logp[1, 2]), abs=1e-5)
    gen = Seq2SeqBackend(t5, tok, batch_size=2).generate(PROMPTS, max_new_tokens=3)
    assert all(isinstance(t, str) for t in gen)
    assert gen == Seq2SeqBackend(t5, tok, batch_size=5).generate(PROMPTS, max_new_tokens=3)


def test_classifier_head_backend(tok):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    encoder = transformers.BertModel(config).eval()
    heads = {"sent": torch.nn.Linear(32, 3)}
    one = ClassifierHeadBackend(encoder, heads, tok, batch_size=1)
    four = ClassifierHeadBackend(encoder, heads, tok, batch_size=4, pooling="mean")
    assert torch.allclose(one.logits("sent", PROMPTS), four.logits("sent", PROMPTS), atol=1e-5)
    preds = four.predict("sent", PROMPTS)
    assert len(preds) == len(PROMPTS) and all(0 <= p < 3 for p in preds)
    assert ClassifierHeadBackend(encoder, heads, tok, pooling="cls").predict("sent", PROMPTS[:1])
    with pytest.raises(UnknownNameError, match="No head for task 'snet'. Did you mean: sent?"):
        one.predict("snet", PROMPTS)
    assert isinstance(one, ClassifierBackend) and not isinstance(one, Backend)


def test_evaluate_example_task_on_tiny_llama(llama, tok):
    task = load_task("example_sst2")
    one = evaluate(CausalLMBackend(llama, tok, batch_size=1), [task])["example_sst2"]
    four = evaluate(CausalLMBackend(llama, tok, batch_size=8), [task], batch_size=4)
    assert [p["pred"] for p in one.predictions] == [
        p["pred"] for p in four["example_sst2"].predictions
    ]
    assert one.n == 16 and 0.0 <= one.score <= 1.0
    assert set(one.predictions[0]) >= {"index", "input", "gold", "pred", "scores", "correct"}


def test_one_token_choices_share_one_pass_per_prompt(llama, tok):
    """k one-token label words cost one forward of the prompt, with the reference's scores."""
    prompts, choices = PROMPTS[:3], [[" positive", " negative", " good"]] * 3
    calls = []
    hook = llama.register_forward_hook(lambda mod, args, kw, out: calls.append(1), with_kwargs=True)
    try:
        got = CausalLMBackend(llama, tok, batch_size=1).score_choices(prompts, choices)
    finally:
        hook.remove()
    assert len(calls) == len(prompts)  # not len(prompts) * 3
    for a, r in zip(got, _reference_scores(llama, tok, prompts, choices), strict=True):
        assert a == pytest.approx(r, abs=1e-4)
