"""The demo's trained Localize-and-Stitch masks on a tiny random BERT (no model download)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from starmerge.demo.assets import TaskData  # noqa: E402
from starmerge.demo.encoder import EncoderStatistics, pooled  # noqa: E402
from starmerge.demo.env import cpu_threads  # noqa: E402
from starmerge.demo.statistics import entry_meta  # noqa: E402
from starmerge.demo.train import TaskAdapter  # noqa: E402
from starmerge.errors import StarmergeError  # noqa: E402
from starmerge.methods import METHODS  # noqa: E402
from starmerge.stats.cache import cache_key  # noqa: E402
from starmerge.stats.masks_entry import top_k  # noqa: E402
from starmerge.stats.source import entry_fields  # noqa: E402
from starmerge.tensors.delta import Dense  # noqa: E402

TRAINED = METHODS.get("localize_stitch").resolve({"mode": "trained"})


class WordIds:
    """A tokenizer stand-in: word i of the vocabulary -> id i + 1."""

    vocab = ("red", "blue", "green", "cat", "dog", "sun", "moon", "tree")

    def __call__(self, texts, truncation=True, max_length=8):
        ids = [[self.vocab.index(w) + 1 for w in t.split()][:max_length] for t in texts]
        return {"input_ids": ids}


def _encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=10,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    return transformers.BertModel(config).eval()


def _task() -> TaskData:
    """Colours (label 0) against animals and sky (label 1): 48 short texts."""
    g = torch.Generator().manual_seed(1)
    texts, labels = [], []
    for i in range(48):
        words = WordIds.vocab[:3] if i % 2 == 0 else WordIds.vocab[3:]
        picks = torch.randint(len(words), (3,), generator=g).tolist()
        texts.append(" ".join(words[p] for p in picks))
        labels.append(i % 2)
    return TaskData("toy", tuple(texts), tuple(labels), ("colour", "thing"), "test")


def _adapter(encoder, task, tmp_path) -> TaskAdapter:
    """A task vector on the block weights, fitted for a fixed random head (then undone)."""
    torch.manual_seed(2)
    head = torch.nn.Linear(16, 2)
    keys = [k for k, _ in encoder.named_parameters() if ".layer." in k and k.endswith("weight")]
    params = dict(encoder.named_parameters())
    start = {k: params[k].detach().clone() for k in keys}
    optimizer = torch.optim.Adam([params[k] for k in keys], lr=1e-2)
    ids = WordIds()(list(task.texts))["input_ids"]
    input_ids, mask = torch.tensor(ids), torch.ones(len(ids), 3, dtype=torch.long)
    for _ in range(30):
        logits = head(pooled(encoder, input_ids, mask))
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(task.labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    deltas = {k: Dense(params[k].detach() - start[k]) for k in keys}
    with torch.no_grad():
        for k in keys:
            params[k].copy_(start[k])
    path = tmp_path / "toy-0123456789abcdef"
    return TaskAdapter("toy", deltas, head.weight.detach(), head.bias.detach(), path, {})


@pytest.fixture
def setting(tmp_path):
    """Statistics over one toy task; torch threads as the demo picks them (a busy VM: one)."""
    with cpu_threads():
        encoder, task = _encoder(), _task()
        adapter = _adapter(encoder, task, tmp_path)
        stats = EncoderStatistics(
            encoder,
            WordIds(),
            {"toy": adapter},
            {"toy": task},
            tmp_path,
            n=32,
            seed=0,
            max_length=8,
        )
        yield stats, adapter


def test_trained_masks_lower_the_training_loss_and_are_cached(setting):
    stats, adapter = setting
    request = stats.request("localize_stitch", {**TRAINED, "lr": 1e5})
    before = {k: p.detach().clone() for k, p in stats.encoder.named_parameters()}
    params = stats.complete("localize_stitch", ["toy"], {**TRAINED, "lr": 1e5})
    (path,) = params["statistics"]
    meta = entry_meta(path)
    assert meta["split"] == "train" and meta["n"] == 32 == len(meta["items"])
    assert meta["loss"]["trained"] < meta["loss"]["top_k"]  # the requirement
    assert meta["mask_losses"][-1] < meta["mask_losses"][0]
    n_entries = sum(d.to_dense().numel() for k, d in adapter.deltas.items() if request.covers(k))
    assert meta["total"] == n_entries  # P: the blocks' parameters the adapter changes
    # at least the trainer's state: theta_0, tau, logits, their gradient, parameter gradients
    assert stats.seconds["masks"] > 0 and stats.peak_bytes["masks"] >= 5 * 4 * n_entries
    for k, p in stats.encoder.named_parameters():  # theta_0 restored exactly
        assert torch.equal(p, before[k]), k
    assert path.endswith(cache_key(entry_fields(request, stats.source("toy"))))
    stats.seconds.clear()
    assert stats.complete("localize_stitch", ["toy"], {**TRAINED, "lr": 1e5}) == params
    assert stats.seconds == {}  # read from the cache
    used = stats.used("localize_stitch", {**TRAINED, "lr": 1e5})
    assert used["kinds"] == ["masks"] and used["split"] == "train" and used["n"] == 32
    assert used["kept"] == [meta["kept"]] and used["overlap_fraction"] == 0.0
    assert used["loss"] == {"toy": meta["loss"]}


def test_the_cache_key_covers_adapter_settings_and_items(setting):
    stats, adapter = setting
    request = stats.request("localize_stitch", TRAINED)

    def key(req=request, statistics=stats):
        return cache_key(entry_fields(req, statistics.source("toy")))

    assert key() == key()
    other_settings = stats.request("localize_stitch", {**TRAINED, "steps": 5})
    fewer = EncoderStatistics(
        stats.encoder, WordIds(), stats.adapters, stats.train, stats.root, 16, 0, 8
    )
    nudged = {k: Dense(d.to_dense() * 1.01) for k, d in adapter.deltas.items()}
    head = (adapter.head_weight, adapter.head_bias)
    changed = {"toy": TaskAdapter("toy", nudged, *head, adapter.path, {})}
    other_adapter = EncoderStatistics(
        stats.encoder, WordIds(), changed, stats.train, stats.root, 32, 0, 8
    )
    keys = {key(), key(other_settings), key(statistics=fewer), key(statistics=other_adapter)}
    assert len(keys) == 4


def test_top_k_keeps_k_entries_and_never_a_zero():
    taus = {"x": torch.tensor([3.0, -1.0, 0.0]), "y": torch.tensor([-2.0, 0.5])}
    masks = top_k(taus, 2)
    assert masks["x"].tolist() == [True, False, False] and masks["y"].tolist() == [True, False]
    assert not any(m.any() for m in top_k(taus, 0).values())


def test_a_tier_without_heads_cannot_train_masks(tmp_path):
    adapter = TaskAdapter("toy", {}, None, None, tmp_path / "toy-0", {})
    stats = EncoderStatistics(None, None, {"toy": adapter}, {}, tmp_path, 4, 0, 8)
    reason = stats.unavailable("localize_stitch", TRAINED)
    assert reason == (
        "needs trained Localize-and-Stitch masks, and this tier gives no task loss to train "
        "them with"
    )
    with pytest.raises(StarmergeError, match=f"^localize_stitch: {reason}$"):
        stats.complete("localize_stitch", ["toy"], TRAINED)
    assert stats.unavailable("localize_stitch", {"mode": "dataless"}) is None
