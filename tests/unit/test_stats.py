"""Statistics collection against brute force, padding, the memory budget, and the cache."""

import os

import pytest
import torch
import torch.nn.functional as F
from tests.unit.data_fixtures import make_tokenizer, write_copy_task
from torch import nn

from starmerge.errors import StarmergeError
from starmerge.eval.tasks import load_task
from starmerge.io.statistics import StatsFile
from starmerge.stats import ByteCounter, cache, collect_statistics, hf
from starmerge.stats.cache import StatsWriter, entry_path
from starmerge.stats.collect import accumulator_bytes

KINDS = {"fisher", "gram_in", "gram_out"}


class Tiny(nn.Module):
    """Embedding -> causal running mean -> fc1 -> tanh -> fc2 (no bias) -> logits."""

    def __init__(self, vocab=11, d=6, h=5):
        super().__init__()
        self.emb, self.fc1, self.fc2 = (
            nn.Embedding(vocab, d),
            nn.Linear(d, h),
            nn.Linear(h, vocab, bias=False),
        )

    def forward(self, ids):
        e = self.emb(ids)  # (B, T, d)
        pos = torch.arange(1, ids.shape[1] + 1, dtype=e.dtype)[None, :, None]
        mixed = e.cumsum(dim=1) / pos  # each position sees only earlier ones
        return self.fc2(torch.tanh(self.fc1(mixed)))


def _examples(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 11, (n,), generator=gen) for n in (3, 5, 2, 4, 4)]


def _batches(examples, size):
    out = []
    for i in range(0, len(examples), size):
        chunk = examples[i : i + size]
        width = max(len(e) for e in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width)
        for b, e in enumerate(chunk):
            ids[b, : len(e)], mask[b, : len(e)] = e, 1
        labels = torch.where(mask.bool(), (ids * 3 + 1) % 11, -100)  # a fixed target per token
        out.append({"ids": ids, "mask": mask, "labels": labels})
    return out


def _loss(model, batch):
    logits = model(batch["ids"])
    ce = F.cross_entropy(
        logits.transpose(1, 2), batch["labels"], reduction="none", ignore_index=-100
    )
    return ce.sum(1) / (batch["labels"] != -100).sum(1)  # per-example mean over its tokens


def _brute_force(model, examples):
    """Per-example gradients by autograd, one unpadded example at a time, summed by hand."""
    sums = {
        k: 0.0
        for k in (
            "fc1.weight::fisher",
            "fc1.bias::fisher",
            "fc2.weight::fisher",
            "fc1::gram_in",
            "fc1::gram_out",
            "fc2::gram_in",
            "fc2::gram_out",
        )
    }
    tokens = 0
    for e in examples:
        model.zero_grad()
        ids = e[None]
        emb = model.emb(ids)
        mixed = emb.cumsum(1) / torch.arange(1, len(e) + 1)[None, :, None]
        y1 = model.fc1(mixed)
        x2 = torch.tanh(y1)
        y2 = model.fc2(x2)
        y1.retain_grad()
        y2.retain_grad()
        labels = (ids * 3 + 1) % 11
        F.cross_entropy(y2.transpose(1, 2), labels).backward()  # mean over the example's tokens
        sums["fc1.weight::fisher"] += model.fc1.weight.grad**2
        sums["fc1.bias::fisher"] += model.fc1.bias.grad**2
        sums["fc2.weight::fisher"] += model.fc2.weight.grad**2
        for name, x, y in (("fc1", mixed, y1), ("fc2", x2, y2)):
            sums[f"{name}::gram_in"] += x[0].detach().T @ x[0].detach()
            sums[f"{name}::gram_out"] += y.grad[0].T @ y.grad[0]
        tokens += len(e)
    return {k: v / (len(examples) if k.endswith("fisher") else tokens) for k, v in sums.items()}


def test_statistics_match_per_example_gradients_summed_by_hand():
    torch.manual_seed(0)
    model, examples = Tiny(), _examples()
    expected = _brute_force(model, examples)
    got = collect_statistics(
        model,
        _batches(examples, 3),
        _loss,
        ["fc1", "fc2"],
        KINDS,
        mask_fn=lambda b, name: b["mask"],
    )
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-7, msg=key)
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_gram_only_runs_without_backward_and_padding_is_masked():
    torch.manual_seed(0)
    model, examples = Tiny(), _examples()
    padded = collect_statistics(
        model, _batches(examples, 5), _loss, ["fc1"], {"gram_in"}, mask_fn=lambda b, name: b["mask"]
    )
    single = collect_statistics(model, _batches(examples, 1), _loss, ["fc1"], {"gram_in"})
    torch.testing.assert_close(padded["fc1::gram_in"], single["fc1::gram_in"])


class Deep(nn.Module):
    def __init__(self, n_layers=8, width=32):
        super().__init__()
        self.emb = nn.Embedding(11, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(n_layers))
        self.head = nn.Linear(width, 11, bias=False)

    def forward(self, ids):
        h = self.emb(ids)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return self.head(h)


def test_memory_budget_holds_and_streaming_changes_nothing():
    torch.manual_seed(0)
    model = Deep()
    budget = 30_000  # bytes: two layers' accumulators (2 x 12,416) + one 4,096 workspace
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    modules = [f"layers.{i}" for i in range(8)]
    batches, mask_fn = _batches(_examples(), 2), (lambda b, name: b["mask"])
    assert model_bytes > budget
    full = collect_statistics(model, batches, _loss, modules, KINDS, mask_fn=mask_fn)
    assert sum(t.numel() * 4 for t in full.values()) > 3 * budget
    parts, counter = [], ByteCounter()
    streamed = collect_statistics(
        model,
        batches,
        _loss,
        modules,
        KINDS,
        mask_fn=mask_fn,
        memory_budget=budget,
        sink=parts.append,
        counter=counter,
    )
    assert streamed == {} and len(parts) == 4
    assert 0 < counter.peak <= budget and counter.live == 0
    merged = {k: v for part in parts for k, v in part.items()}
    assert set(merged) == set(full)
    for key, value in full.items():
        torch.testing.assert_close(merged[key], value, msg=key)


@pytest.mark.parametrize("name", [None, "data.memory_budget", "--stats-memory"])
def test_budget_smaller_than_one_module_is_an_error_naming_the_callers_knob(name):
    model, named = Deep(), ({} if name is None else {"budget_name": name})
    need = sum(accumulator_bytes(model.layers[0], KINDS))
    with pytest.raises(StarmergeError) as err:
        collect_statistics(
            model,
            _batches(_examples(), 2),
            _loss,
            ["layers.0"],
            KINDS,
            memory_budget=1000,
            **named,
        )
    knob = name or "memory_budget"  # called directly: the argument's own name
    assert str(err.value) == (
        f"statistics of layers.0 need {need} bytes but {knob} is 1000; raise {knob}"
    )


def test_cache_entry_round_trip(tmp_path):
    a, b = torch.randn(3, 3), torch.randn(2)
    with StatsWriter(tmp_path, "k1", {"kinds": ["gram_in"]}) as writer:
        writer({"m::gram_in": a})
        writer({"m.bias::fisher": b})
    assert entry_path(tmp_path, "k1") == tmp_path / "k1" and entry_path(tmp_path, "k2") is None
    stats = StatsFile(tmp_path / "k1")
    assert stats.meta == {"kinds": ["gram_in"]} and sorted(stats.keys()) == [
        "m.bias::fisher",
        "m::gram_in",
    ]
    assert torch.equal(stats.get("m::gram_in"), a) and torch.equal(stats.get("m.bias::fisher"), b)
    with pytest.raises(RuntimeError), StatsWriter(tmp_path, "k2", {}) as writer:
        writer({"x::gram_in": a})
        raise RuntimeError("interrupted")
    assert entry_path(tmp_path, "k2") is None and [p.name for p in tmp_path.iterdir()] == ["k1"]


@pytest.fixture(scope="module")
def llama(tiny_models):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()


def _hf_stats(model, batch_size, fisher="empirical", tmp_root=None):
    spec = load_task(write_copy_task(tmp_root))
    batches = hf.build_batches(make_tokenizer(), "causal_lm", spec, spec.examples(), batch_size, 64)
    modules = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    return collect_statistics(
        model,
        batches,
        hf.make_loss_fn("causal_lm", fisher),
        modules,
        KINDS,
        mask_fn=hf.make_mask_fn("causal_lm"),
    )


def test_hf_causal_lm_statistics_do_not_depend_on_padding(llama, tmp_path):
    batched = _hf_stats(llama, 3, tmp_root=tmp_path)
    single = _hf_stats(llama, 1, tmp_root=tmp_path)
    for key, value in single.items():
        torch.testing.assert_close(batched[key], value, rtol=1e-4, atol=1e-7, msg=key)
    true_a = _hf_stats(llama, 3, "true", tmp_root=tmp_path)
    true_b = _hf_stats(llama, 3, "true", tmp_root=tmp_path)
    key = "model.layers.1.mlp.down_proj.weight::fisher"
    assert torch.equal(true_a[key], true_b[key])  # sampled labels are seeded
    assert not torch.allclose(true_a[key], batched[key])


def test_cache_entry_written_twice_keeps_the_first(tmp_path, monkeypatch):
    """Two processes finishing the same entry (Ray workers): the second keeps the first's."""
    first = torch.ones(2)
    with StatsWriter(tmp_path, "k", {"n": 1}) as writer:
        writer({"m::gram_in": first})
    late = StatsWriter(tmp_path, "k", {"n": 2})
    late({"m::gram_in": torch.zeros(2)})
    real_exists = type(late.final).exists

    def looks_free(path):  # the entry did not exist when checked, then the other run won
        return False if path == late.final else real_exists(path)

    monkeypatch.setattr(type(late.final), "exists", looks_free)
    assert late.close() == tmp_path / "k"
    monkeypatch.undo()
    assert torch.equal(StatsFile(tmp_path / "k").get("m::gram_in"), first)
    assert sorted(os.listdir(tmp_path)) == ["k"] and cache.entry_path(tmp_path, "k")
