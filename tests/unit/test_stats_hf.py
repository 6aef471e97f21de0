"""The seq2seq and classifier statistics wrappers (``stats.hf``) against brute force.

Tiny random T5 and BERT classifier built from configs. Brute force: one unpadded example at a
time, HF's own loss (mean cross-entropy over the answer tokens, or over the one label), autograd
for the per-example weight gradients and output gradients, and forward hooks for a module's input
rows, summed by hand. The wrapper's statistics come from right-padded batches.
"""

from __future__ import annotations

import pytest
import torch
from tests.unit.data_fixtures import make_tokenizer, write_copy_task, write_sentiment_task

from starmerge.eval.tasks import load_task
from starmerge.stats import collect_statistics, hf

transformers = pytest.importorskip("transformers")

KINDS = {"fisher", "gram_in", "gram_out"}
T5_MODULES = [
    "encoder.block.0.layer.0.SelfAttention.q",  # encoder tokens
    "encoder.block.1.layer.1.DenseReluDense.wo",
    "decoder.block.0.layer.0.SelfAttention.v",  # decoder (answer) tokens
    "decoder.block.0.layer.1.EncDecAttention.q",  # decoder tokens
    "decoder.block.0.layer.1.EncDecAttention.k",  # encoder tokens (cross-attention keys)
    "decoder.block.1.layer.2.DenseReluDense.wi",
]
BERT_MODULES = [
    "bert.encoder.layer.0.attention.self.query",  # tokens, with a bias
    "bert.encoder.layer.1.output.dense",
    "bert.pooler.dense",  # one pooled vector per example
    "classifier",
]


@pytest.fixture(scope="module")
def t5(tiny_models):
    return transformers.T5ForConditionalGeneration.from_pretrained(tiny_models["t5"]).eval()


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=2,
        architectures=["BertForSequenceClassification"],
    )
    return transformers.BertForSequenceClassification(config).eval()


def _spec_and_examples(tmp_path, which):
    spec = load_task((write_copy_task if which == "copy" else write_sentiment_task)(tmp_path))
    return spec, spec.examples()


def _brute_force(model, batches, modules, loss_of):
    """Per-example statistics summed by hand over unpadded single-example batches.

    ``loss_of(model, batch)``: HF's loss for one example; every input row is a real token.
    """
    sums, tokens = {}, dict.fromkeys(modules, 0)
    for batch in batches:
        seen = {}

        def record(name, args, out, seen=seen):  # returns None: the output is left as it is
            seen.setdefault(name, (args[0], out))

        handles = [
            model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: record(n, a, o))
            for n in modules
        ]
        loss = loss_of(model, batch)
        for h in handles:
            h.remove()
        params = [model.get_submodule(n).weight for n in modules]
        biases = [model.get_submodule(n).bias for n in modules]
        outs = [seen[n][1] for n in modules]
        with_bias = [b for b in biases if b is not None]
        grads = torch.autograd.grad(loss, params + with_bias + outs)
        g_w, g_b = grads[: len(params)], iter(grads[len(params) : len(params) + len(with_bias)])
        g_y = grads[len(params) + len(with_bias) :]
        for i, name in enumerate(modules):
            x = seen[name][0].detach().reshape(-1, seen[name][0].shape[-1])
            d = g_y[i].reshape(-1, g_y[i].shape[-1])
            add = {
                f"{name}.weight::fisher": g_w[i] ** 2,
                f"{name}::gram_in": x.T @ x,
                f"{name}::gram_out": d.T @ d,
            }
            if biases[i] is not None:
                add[f"{name}.bias::fisher"] = next(g_b) ** 2
            for k, v in add.items():
                sums[k] = sums.get(k, 0) + v
            tokens[name] += x.shape[0]
    n = len(batches)
    return {k: v / (n if "fisher" in k else tokens[k.split("::")[0]]) for k, v in sums.items()}


def _check(got, expected):
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-8, msg=key)


def test_seq2seq_statistics_match_per_example_gradients_with_padding_masked(t5, tmp_path):
    spec, examples = _spec_and_examples(tmp_path, "copy")
    tok = make_tokenizer()
    padded = hf.build_batches(tok, "seq2seq", spec, examples, 5, 64)  # one batch, padded
    assert any((b["attention_mask"] == 0).any() and (b["labels"] == -100).any() for b in padded)
    got = collect_statistics(
        t5,
        padded,
        hf.make_loss_fn("seq2seq"),
        T5_MODULES,
        KINDS,
        mask_fn=hf.make_mask_fn("seq2seq"),
    )

    def loss_of(model, b):  # HF's mean cross-entropy over the answer tokens
        return model(input_ids=b["input_ids"], labels=b["labels"]).loss

    singles = hf.build_batches(tok, "seq2seq", spec, examples, 1, 64)
    expected = _brute_force(t5, singles, T5_MODULES, loss_of)
    _check(got, expected)
    # Grams over the real tokens only: the encoder side sees the prompts, the decoder the answers.
    n_enc = sum(int(b["attention_mask"].sum()) for b in padded)
    n_dec = sum(int((b["labels"] != -100).sum()) for b in padded)
    x = torch.cat([_inputs(t5, b, "encoder.block.0.layer.0.SelfAttention.q") for b in singles])
    assert x.shape[0] == n_enc and n_dec < n_enc
    torch.testing.assert_close(
        got["encoder.block.0.layer.0.SelfAttention.q::gram_in"],
        x.T @ x / n_enc,
        rtol=1e-4,
        atol=1e-8,
    )


def _inputs(model, batch, name):
    seen = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with torch.no_grad():
        model(input_ids=batch["input_ids"], labels=batch["labels"])
    handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1])


def test_classifier_statistics_match_per_example_gradients_with_padding_masked(bert, tmp_path):
    spec, examples = _spec_and_examples(tmp_path, "sentiment")
    tok = make_tokenizer()
    padded = hf.build_batches(tok, "classifier", spec, examples, 3, 64)
    assert any((b["attention_mask"] == 0).any() for b in padded)
    assert [int(b) for p in padded for b in p["labels"]] == [int(e.label) for e in examples]
    got = collect_statistics(
        bert,
        padded,
        hf.make_loss_fn("classifier"),
        BERT_MODULES,
        KINDS,
        mask_fn=hf.make_mask_fn("classifier"),
    )

    def loss_of(model, b):  # HF's cross-entropy of the one label
        return model(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]
        ).loss

    singles = hf.build_batches(tok, "classifier", spec, examples, 1, 64)
    expected = _brute_force(bert, singles, BERT_MODULES, loss_of)
    _check(got, expected)
    assert "classifier.bias::fisher" in got  # biases get a Fisher too
    # The pooled head sees one row per example: its Grams divide by the number of examples.
    pooled = torch.cat([_pooled(bert, b) for b in singles])
    assert pooled.shape[0] == len(examples)
    torch.testing.assert_close(
        got["classifier::gram_in"], pooled.T @ pooled / len(examples), rtol=1e-4, atol=1e-8
    )


def _pooled(model, batch):
    seen = []
    handle = model.classifier.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    return seen[0]


def test_classifier_true_fisher_is_seeded_and_differs_from_the_empirical(bert, tmp_path):
    spec, examples = _spec_and_examples(tmp_path, "sentiment")
    batches = hf.build_batches(make_tokenizer(), "classifier", spec, examples, 3, 64, seed=1)
    key = "classifier.weight::fisher"

    def fisher(kind):
        return collect_statistics(
            bert, batches, hf.make_loss_fn("classifier", kind), ["classifier"], {"fisher"}
        )[key]

    assert torch.equal(fisher("true"), fisher("true"))
    assert not torch.allclose(fisher("true"), fisher("empirical"))


def test_model_kind_reads_the_config(tiny_models, bert, tmp_path):
    bert.save_pretrained(tmp_path / "bert")
    assert hf.model_kind(tiny_models["t5"]) == "seq2seq"
    assert hf.model_kind(tiny_models["llama"]) == "causal_lm"
    assert hf.model_kind(tmp_path / "bert") == "classifier"
