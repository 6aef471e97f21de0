"""Localize-and-Stitch: exact top-k masks, stitching, overlaps, P, and trained masks."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from starmerge.methods import METHODS
from starmerge.methods.localize_stitch import in_parameter_set
from starmerge.pipeline import fit_state, merge_params
from starmerge.stats.masks import initial_logits, train_masks
from starmerge.tensors.delta import Dense

Q, MLP, EMB = (
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
    "model.embed_tokens.weight",
)
SHAPES = {EMB: (6, 4), Q: (4, 4), MLP: (8, 4)}


def _run(task_deltas, **params):
    """fit + merge as the engine does; returns (merged deltas, masks, state summary, stats)."""
    method = METHODS.get("localize_stitch")
    params = method.resolve(params)

    def read(key):
        return [t.get(key) for t in task_deltas]

    state = fit_state(method, params, len(task_deltas), SHAPES, read)
    out = dict(merge_params(method, params, state, SHAPES, read))
    return (
        {k: m.delta.tensor for k, m in out.items()},
        {k: m.artifacts["masks"] for k, m in out.items()},
        state.summary(),
        {k: m.stats for k, m in out.items()},
    )


def _random_tasks(n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{k: Dense(torch.randn(s, generator=gen)) for k, s in SHAPES.items()} for _ in range(n)]


def test_dataless_masks_keep_exactly_the_global_top_k():
    tasks = _random_tasks()
    _, masks, summary, _ = _run(tasks, sparsity=0.25)
    in_p = [Q, MLP]  # the embedding is outside P (blocks)
    n = sum(torch.Size(SHAPES[k]).numel() for k in in_p)
    k = int(0.25 * n)
    for i, task in enumerate(tasks):
        flat = torch.cat([task[key].tensor.reshape(-1) for key in in_p])
        expected = torch.zeros(n, dtype=torch.bool)
        expected[flat.abs().topk(k).indices] = True
        got = torch.cat([masks[key][i].reshape(-1) for key in in_p])
        assert torch.equal(got, expected)
        assert not masks[EMB][i].any()
    assert summary["kept"] == [k] * 3 and summary["total"] == [n] * 3
    assert summary["sparsity"] == [k / n] * 3


def test_disjoint_masks_stitch_to_the_sum_of_masked_task_vectors():
    a = torch.zeros(8, 4)
    a[:4] = torch.arange(1, 17, dtype=torch.float32).reshape(4, 4) * 10  # big values, top rows
    a[4:] = 0.01
    b = a.flip(0)  # big values in the bottom rows
    tasks = [{MLP: Dense(a)}, {MLP: Dense(b)}]
    merged, masks, summary, stats = _run(tasks, sparsity=0.5)
    m = masks[MLP]
    assert not (m[0] & m[1]).any() and summary["overlap"] == 0
    torch.testing.assert_close(merged[MLP], m[0] * a + m[1] * b)
    torch.testing.assert_close(merged[Q], torch.zeros(4, 4))  # no task has it: stays theta_0
    assert merged[EMB].abs().sum() == 0 and stats[EMB] == {"in_set": False}  # outside P


def test_overlapping_entries_are_averaged():
    a = torch.tensor([[4.0, 3.0, 0.1, 0.2]])
    b = torch.tensor([[-2.0, 0.3, 5.0, 0.1]])
    shapes = {MLP: (1, 4)}
    method = METHODS.get("localize_stitch")
    out = method.fn([Dense(a), Dense(b)], sparsity=0.5)  # standalone: one parameter = the model
    # masks: a keeps {0, 1}, b keeps {2, 0}: entry 0 overlaps, averaged despite the sign conflict
    expected = torch.tensor([[(4.0 - 2.0) / 2, 3.0, 5.0, 0.0]])
    torch.testing.assert_close(out.delta.tensor, expected)
    assert out.stats["overlap"] == 1 and out.stats["kept"] == [2, 2]
    assert out.artifacts["masks"].shape == (2, *shapes[MLP])


def test_parameter_set_blocks_excludes_embeddings_head_and_final_norm():
    inside = [
        "model.layers.3.input_layernorm.weight",
        "encoder.block.0.layer.0.SelfAttention.q.weight",
        "transformer.h.2.attn.c_attn.bias",
        "roberta.encoder.layer.11.output.dense.weight",
    ]
    outside = [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "shared.weight",
        "transformer.wte.weight",
        "classifier.dense.weight",
    ]
    assert all(in_parameter_set(k, "blocks") for k in inside)
    assert not any(in_parameter_set(k, "blocks") for k in outside)
    assert all(in_parameter_set(k, "all") for k in outside)


def test_trained_mode_stitches_the_stored_masks(tmp_path):
    tasks = _random_tasks(2)
    files = []
    for i in range(2):
        masks = {
            f"{k}::mask": torch.rand(s, generator=torch.Generator().manual_seed(i)) > 0.5
            for k, s in SHAPES.items()
            if k != EMB
        }
        save_file(masks, tmp_path / f"m{i}.safetensors")
        files.append(str(tmp_path / f"m{i}.safetensors"))
    merged, masks, summary, _ = _run(tasks, mode="trained", statistics=files)
    m, a, b = masks[MLP], tasks[0][MLP].tensor, tasks[1][MLP].tensor
    count = (m[0].float() + m[1].float()).clamp(min=1)
    torch.testing.assert_close(merged[MLP], (m[0] * a + m[1] * b) / count)
    assert summary["mode"] == "trained" and summary["overlap"] == int((m[0] & m[1]).sum()) + int(
        (masks[Q][0] & masks[Q][1]).sum()
    )


def test_trained_mode_without_data_says_how_to_fix():
    from starmerge.errors import ConfigError

    with pytest.raises(ConfigError, match="mode 'trained'.*`data:`"):
        _run(_random_tasks(2), mode="trained")


class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 4, bias=False)])

    def forward(self, x):
        return self.layers[0](x)


def _mse(model, batch):
    x, y = batch
    return (model(x) - y).square().mean(dim=1)  # per example


@pytest.mark.parametrize("regularizer", ["paper", "reference"])
def test_trained_masks_lower_the_task_loss_below_the_dataless_mask(regularizer):
    torch.manual_seed(0)
    model = Regression()
    with torch.no_grad():
        model.layers[0].weight.zero_()  # theta_0 = 0
    target = torch.randn(4, 8)  # the fine-tuned solution: tau = target
    x = torch.randn(64, 8)
    batches = [(x[i : i + 16], x[i : i + 16] @ target.T) for i in range(0, 64, 16)]
    tau = {"layers.0.weight": target}

    def loss_with(mask):
        with torch.no_grad():
            model.layers[0].weight.copy_(mask * target)
            value = sum(float(_mse(model, b).mean()) for b in batches) / len(batches)
            model.layers[0].weight.zero_()
        return value

    dataless = initial_logits(tau, 0.1, 5.0)["layers.0.weight"] > 0
    out = train_masks(
        model, tau, batches, _mse, sparsity=0.1, steps=10, lr=2e3, l1=0.01, regularizer=regularizer
    )
    trained = out.masks["layers.0.weight"]
    assert int(dataless.sum()) == 3
    assert loss_with(trained) < 0.8 * loss_with(dataless)
    assert torch.equal(model.layers[0].weight, torch.zeros(4, 8))  # theta_0 restored
    assert out.losses[-1] < out.losses[0]
