"""Plan.read: adapters read on two threads give every task's own factors, in task order."""

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from starmerge.errors import InputError
from starmerge.plan import check_config_and_inputs
from starmerge.tensors import threads
from starmerge.tensors.delta import LowRank

KEYS = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")


def _adapter(path, seed, rank, nan=False):
    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True)
    factors = {}
    for module in KEYS:
        factors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, 24, generator=g)
        factors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(32, rank, generator=g)
    if nan:
        factors[f"base_model.model.{KEYS[1]}.lora_B.weight"][3, 0] = float("nan")
    save_file(factors, str(path / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"],
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    return factors


def _plan(tmp_path, n_tasks, nan_task=None):
    written = [
        _adapter(tmp_path / f"a{t}", t, rank=2 + t % 3, nan=t == nan_task) for t in range(n_tasks)
    ]
    config = {
        "method": "task_arithmetic",
        "output": {"format": "adapter"},
        "models": [{"adapter": str(tmp_path / f"a{t}")} for t in range(n_tasks)],
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    return check_config_and_inputs(path, []), written


@pytest.mark.parametrize("split", [False, True])
def test_read_gives_each_task_its_own_factors_in_order(tmp_path, split, monkeypatch):
    monkeypatch.setattr(threads, "_cores", lambda: 2)
    monkeypatch.setattr(threads, "SPLIT_MIN_ENTRIES", 0 if split else 1 << 62)
    plan, written = _plan(tmp_path, 7)
    for module in KEYS:
        deltas = plan.read(f"{module}.weight")
        assert len(deltas) == 7
        for t, delta in enumerate(deltas):
            assert isinstance(delta, LowRank) and delta.rank == 2 + t % 3
            assert torch.equal(delta.b, written[t][f"base_model.model.{module}.lora_B.weight"])
            assert torch.equal(delta.a, written[t][f"base_model.model.{module}.lora_A.weight"])
            assert delta.scale == 2.0


@pytest.mark.parametrize("nan_task", [2, 3])  # one read here, one in the helper thread
def test_a_non_finite_factor_read_on_either_thread_names_its_adapter(
    tmp_path, nan_task, monkeypatch
):
    monkeypatch.setattr(threads, "_cores", lambda: 2)
    monkeypatch.setattr(threads, "SPLIT_MIN_ENTRIES", 0)
    plan, _ = _plan(tmp_path, 5, nan_task=nan_task)
    plan.read(f"{KEYS[0]}.weight")
    with pytest.raises(InputError, match=f"a{nan_task}.*NaN or Inf"):
        plan.read(f"{KEYS[1]}.weight")
