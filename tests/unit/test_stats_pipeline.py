"""The statistics pipeline on a toy model: one key recipe, one cache lookup, one meta."""

from __future__ import annotations

import contextlib
import json

import torch
from torch import nn

from starmerge.io.statistics import StatsFile
from starmerge.methods.contract import DataRequest
from starmerge.stats import TaskSource, entry_fields, gather_statistics
from starmerge.stats.cache import cache_key
from starmerge.tensors.delta import Dense

SHAPES = {"0.weight": (4, 3), "2.weight": (2, 4)}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randn(4, 5, 3, generator=g),
            "attention_mask": torch.ones(4, 5),
            "labels": torch.randint(2, (4,), generator=g),
        }
        for _ in range(2)
    ]


def _loss(model: nn.Module, batch) -> torch.Tensor:
    logits = model(batch["input_ids"]).mean(dim=1)  # (B, 2)
    return nn.functional.cross_entropy(logits, batch["labels"], reduction="none")


def _source(net: nn.Module, **changes) -> TaskSource:
    tau = {"2.weight": Dense(torch.full((2, 4), 0.1))}  # this task changes one layer only
    fields = dict(
        base=["base-sha"],
        model=["task-sha"],
        model_kind="classifier",
        loss_kind="toy",
        batches=_batches(),
        make_loss=lambda fisher: _loss,
        shapes=SHAPES,
        task_model=lambda: contextlib.nullcontext(net),
        base_model=lambda: net,
        tau=tau.get,
        meta={"task": "toy"},
    )
    return TaskSource(**{**fields, **changes})


def test_the_key_covers_what_the_statistics_depend_on_and_nothing_else():
    model, request = _model(), DataRequest(("fisher",))

    def key(req=request, **changes):
        return cache_key(entry_fields(req, _source(model, **changes)))

    changed = [
        key(base=["other"]),
        key(model=["other"]),
        key(model_kind="causal_lm"),
        key(loss_kind="other"),
        key(batches=_batches(1)),
        key(shapes={"0.weight": (4, 3)}),
        key(DataRequest(("gram_in",))),
        key(DataRequest(("fisher",), fisher="true")),
        key(DataRequest(masks={"steps": 2})),
    ]
    assert len({key(), *changed}) == 1 + len(changed)
    assert key(meta={"task": "renamed"}) == key()  # descriptions are not keyed
    assert key(make_loss=lambda fisher: None, task_model=None) == key()  # nor how it runs
    grams = DataRequest(("gram_in",))
    assert key(grams) == key(DataRequest(("gram_in",), fisher="true"))  # no gradients: no labels


def test_an_entry_is_written_once_with_its_cost_then_reused(tmp_path):
    model, request = _model(), DataRequest(("gram_in", "fisher"))
    (first,) = gather_statistics(request, [_source(model)], tmp_path)
    assert first.computed and first.seconds >= 0 and first.peak_bytes > 0
    assert first.path == tmp_path / first.key
    meta = json.loads((first.path / "index.json").read_text())["meta"]
    assert meta["task"] == "toy" and meta["n"] == 8 and meta["kinds"] == ["fisher", "gram_in"]
    assert meta["peak_bytes"] == first.peak_bytes and "non-pad" in meta["normalisation"]
    stats = StatsFile(first.path)
    assert stats.get("0::gram_in").shape == (3, 3) and stats.get("2.weight::fisher").shape == (2, 4)
    (again,) = gather_statistics(request, [_source(model)], tmp_path)
    assert not again.computed and again.path == first.path and again.seconds == 0


def test_trained_masks_cover_every_merged_key_in_p(tmp_path):
    model = _model()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    request = DataRequest(
        masks={"sparsity": 0.5, "steps": 2, "lr": 1.0}, covers=SHAPES.__contains__
    )
    (entry,) = gather_statistics(request, [_source(model)], tmp_path)
    stats = StatsFile(entry.path)
    assert stats.get("0.weight::mask").shape == (4, 3)  # a key this task leaves at zero
    assert not stats.get("0.weight::mask").any()  # zero delta: never in the initial top-k
    meta = json.loads((entry.path / "index.json").read_text())["meta"]
    assert meta["total"] == 12 + 8 and len(meta["mask_losses"]) == 2
    assert set(meta["loss"]) == {"trained", "top_k", "full"}
    assert entry.peak_bytes >= 5 * 4 * 20  # at least the trainer's own state
    for k, p in model.named_parameters():  # theta_0 restored exactly
        assert torch.equal(p, before[k]), k
