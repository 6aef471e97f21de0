"""Suite models on tiny random T5/Llama/Mistral models: one BOS, pinned date, deltas applied in
place, full-checkpoint task vectors, and scores that do not depend on the batch size."""

from __future__ import annotations

import datetime as dt

import pytest
import torch
from tests.fixtures.tiny_suites import build_model, make_full_checkpoint, make_tiny_suite

from starmerge.errors import InputError
from starmerge.io.checkpoint import TensorIndex
from starmerge.suites import load_suite
from starmerge.suites.models import apply_deltas, full_task_vector, make_backend
from starmerge.sweep.jobs import Job, RunOptions, Runtime
from starmerge.sweep.workbench import Workbench
from starmerge.tensors.delta import Dense, LowRank

pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import transformers as tf

    root = tmp_path_factory.mktemp("tiny-models")
    out = {}
    for kind in ("llama", "mistral", "t5"):
        path = build_model(kind, root / kind)
        cls = tf.T5ForConditionalGeneration if kind == "t5" else tf.AutoModelForCausalLM
        out[kind] = (path, cls.from_pretrained(path).eval(), tf.AutoTokenizer.from_pretrained(path))
    return out


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_prompt_ids_start_with_exactly_one_bos(tiny, kind):
    _, model, tok = tiny[kind]
    suite = load_suite("llama-3.2-3b-instruct" if kind == "llama" else "mistral-7b-instruct")
    backend = make_backend(suite, model, tok, batch_size=2)
    ids = backend.encode(backend.render("Is it yes or no?"))
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert ids.count(tok.bos_token_id) == 1
    # Seed: apply_chat_template(tokenize=False), then tokenizer(text) adds a second BOS.
    seed_text = tok.apply_chat_template(
        [{"role": "user", "content": "Is it yes or no?"}], add_generation_prompt=True,
        tokenize=False)  # fmt: skip
    assert tok(seed_text)["input_ids"][:2] == [tok.bos_token_id] * 2


def test_llama_chat_template_date_is_pinned(tiny, monkeypatch):
    import transformers.utils.chat_template_utils as ctu

    class Future(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2031, 1, 2)

    monkeypatch.setattr(ctu, "datetime", Future)
    _, model, tok = tiny["llama"]
    backend = make_backend(load_suite("llama-3.2-3b-instruct"), model, tok, batch_size=2)
    assert "Today Date: 26 Jul 2024" in backend.render("hi")
    seed_text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "Today Date: 02 Jan 2031" in seed_text  # the seed's prompts follow the calendar


def test_apply_deltas_adds_then_restores_exactly(tiny):
    _, model, _ = tiny["llama"]
    key = "model.layers.0.self_attn.q_proj.weight"
    weight = model.state_dict()[key]
    before = weight.clone()
    b, a = torch.randn(weight.shape[0], 2), torch.randn(2, weight.shape[1])
    deltas = {key: LowRank(b, a, 0.5), "model.norm.weight": Dense(torch.ones(32))}
    with apply_deltas(model, deltas):
        assert torch.allclose(model.state_dict()[key], before + 0.5 * b @ a, atol=1e-6)
        assert torch.equal(model.state_dict()["model.norm.weight"], torch.full((32,), 2.0))
    assert torch.equal(model.state_dict()[key], before)
    with pytest.raises(InputError, match="not parameters of the model"):
        with apply_deltas(model, {"model.layers.9.q.weight": Dense(torch.zeros(1))}):
            pass
    assert torch.equal(model.state_dict()[key], before)


def test_apply_deltas_applies_a_tied_weight_once(tiny):
    _, model, _ = tiny["t5"]
    shared = model.state_dict()["shared.weight"].clone()
    delta = Dense(torch.ones_like(shared))
    with apply_deltas(model, {"shared.weight": delta, "encoder.embed_tokens.weight": delta}):
        assert torch.equal(model.state_dict()["encoder.embed_tokens.weight"], shared + 1)
    assert torch.equal(model.state_dict()["shared.weight"], shared)


def test_full_checkpoint_task_vector_qv_and_changed(tiny, tmp_path):
    base_dir = tiny["t5"][0]
    ft_dir = make_full_checkpoint(base_dir, tmp_path / "ft", seed=3)
    base, ft = TensorIndex.open(base_dir), TensorIndex.open(ft_dir)
    qv = full_task_vector(base, ft, "qv", "ft")
    assert len(qv) == 12 and all(k.endswith((".q.weight", ".v.weight")) for k in qv)
    assert set(full_task_vector(base, ft, "changed", "ft")) == set(qv)  # only q/v moved
    with pytest.raises(InputError, match="no 'changed' parameters differ"):
        full_task_vector(base, base, "changed", "base")


@pytest.fixture(scope="module")
def flan_hella_boolq(tmp_path_factory):
    root = tmp_path_factory.mktemp("flan-hb")
    return make_tiny_suite("flan-t5-large", root, tasks=["hella", "boolq"], rows=8)


def _seed_accuracy(preds: list[str], golds: list[str], batch_size: int) -> float:
    """The seed's Flan hella/boolq scoring: every example of a batch gets the gold label of the
    batch's first example (``true_labels[i]`` with ``i`` the batch start)."""
    hits = 0
    for i in range(0, len(golds), batch_size):
        hits += sum(p == golds[i] for p in preds[i : i + batch_size])
    return hits / len(golds)


def test_scores_do_not_depend_on_the_batch_size(flan_hella_boolq):
    suite_file, data = flan_hella_boolq
    suite = load_suite(suite_file)
    bench = Workbench(suite, RunOptions(), Runtime(device="cpu", data_dir=data))
    runs = {}
    for bs in (1, 3, 8):
        bench.backend.batch_size = bs
        runs[bs] = bench.run(Job("individual", ("hella",)))["results"]["hella"]
    assert bench.model_loads == 1
    outputs = {bs: [p["output"] for p in r["predictions"]] for bs, r in runs.items()}
    assert outputs[1] == outputs[3] == outputs[8]
    assert runs[1]["score"] == runs[3]["score"] == runs[8]["score"]
    # The seed's per-batch gold would make this score move with the batch size (labels are
    # grouped by the seed's balanced sampler).
    preds = [p["pred"] for p in runs[1]["predictions"]]
    golds = [p["gold"] for p in runs[1]["predictions"]]
    always_first = ["0"] * len(golds)
    assert len({_seed_accuracy(always_first, golds, bs) for bs in (1, 3, 8)}) > 1
    assert runs[1]["score"] == sum(p == g for p, g in zip(preds, golds, strict=True)) / len(golds)


def test_long_flan_inputs_keep_their_instruction(tiny):
    # Seed: batch_encode_plus(truncation=True) cut Flan inputs at 512 tokens, so long IMDB
    # reviews lost the instruction that follows them.
    _, model, tok = tiny["t5"]
    suite = load_suite("flan-t5-large")
    spec = suite.tasks["imdb"].spec()
    prompt = spec.input_template.format(text=" ".join(["cat"] * 700))
    backend = make_backend(suite, model, tok, batch_size=1)
    seen = []
    original = model.generate

    def spy(**kwargs):
        seen.append(kwargs["input_ids"][0].tolist())
        return original(**kwargs)

    model.generate = spy
    try:
        backend.generate([prompt], 2)
    finally:
        del model.generate
    suffix = tok("'negative'.", add_special_tokens=False)["input_ids"]
    assert len(seen[0]) > 512 and seen[0][-len(suffix) - 1 : -1] == suffix
