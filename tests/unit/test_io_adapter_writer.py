"""write_adapter round trip: PEFT loads the adapter and merges exactly base + sum of deltas."""

from __future__ import annotations

import json

import pytest
import torch
from io_fixtures import make_peft_adapter, tiny_gpt2, tiny_llama

from starmerge.errors import OutputError
from starmerge.io.adapter import load_adapter
from starmerge.io.adapter_writer import adapter_config, write_adapter
from starmerge.tensors.delta import LowRank


def random_lowrank(shape, rank, scale, gen):
    out, inp = shape
    return LowRank(
        torch.randn(out, rank, generator=gen), torch.randn(rank, inp, generator=gen), scale
    )


def merged_weights(base_dir, adapter_dir):
    import transformers as tf
    from peft import PeftModel

    model = tf.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().state_dict()


def test_round_trip_through_peft(tmp_path):
    base_dir, out = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().save_pretrained(base_dir)
    out.mkdir()
    import transformers as tf

    base = tf.AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    gen = torch.Generator().manual_seed(0)
    ranks = {
        "model.layers.0.self_attn.q_proj": 3,
        "model.layers.1.self_attn.q_proj": 5,
        "model.layers.0.self_attn.v_proj": 3,
        "model.layers.1.mlp.down_proj": 7,
        "model.layers.0.mlp.up_proj": 3,
    }
    modules = {
        f"{m}.weight": random_lowrank(tuple(base[f"{m}.weight"].shape), r, 0.37 * r, gen)
        for m, r in ranks.items()
    }
    modules["model.layers.1.self_attn.v_proj.weight"] = random_lowrank((16, 32), 0, 1.0, gen)
    files = write_adapter(
        out,
        modules,
        base_model=str(base_dir),
        task_type="CAUSAL_LM",
        template_config={"lora_dropout": 0.1, "use_dora": True},
        dtype=torch.float32,
    )
    assert sorted(f.name for f in files) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (3, 3, 0.1)
    assert (
        config["rank_pattern"]
        == config["alpha_pattern"]
        == {"model.layers.1.mlp.down_proj": 7, "model.layers.1.self_attn.q_proj": 5}
    )
    assert config["target_modules"] == sorted(ranks) and config["use_dora"] is False
    merged = merged_weights(base_dir, out)
    for key, w in base.items():
        expected = w + modules[key].to_dense() if key in modules else w
        torch.testing.assert_close(merged[key], expected, atol=1e-5, rtol=1e-5, msg=key)
    ours = load_adapter(out)  # and our own loader reads it back
    assert ours.base_model == str(base_dir) and ours.task_type == "CAUSAL_LM"
    for key in ours.shapes():
        torch.testing.assert_close(ours.get(key).to_dense(), modules[key].to_dense())


def test_fan_in_fan_out_round_trip(tmp_path):
    model = tiny_gpt2()
    base_dir, src, out = tmp_path / "base", tmp_path / "src", tmp_path / "out"
    model.save_pretrained(base_dir)
    reference = make_peft_adapter(
        model, src, r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True
    )
    source = load_adapter(src)
    out.mkdir()
    write_adapter(
        out,
        {k: source.get(k) for k in source.shapes()},
        base_model=None,
        task_type=None,
        template_config=source.config,
        dtype=torch.float32,
        fan_in_fan_out=True,
    )
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    import transformers as tf

    base = tf.AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    merged = merged_weights(base_dir, out)
    for key, delta in reference.items():
        torch.testing.assert_close((merged[key] - base[key]).double(), delta, atol=1e-5, rtol=1e-5)


def test_bfloat16_factors(tmp_path):
    gen = torch.Generator().manual_seed(0)
    lr = random_lowrank((8, 6), 2, 0.5, gen)
    write_adapter(
        tmp_path,
        {"m.weight": lr},
        base_model=None,
        task_type=None,
        template_config=None,
        dtype=torch.bfloat16,
    )
    got = load_adapter(tmp_path).get("m.weight")
    assert got.dtype == torch.bfloat16 and got.scale == 1.0
    torch.testing.assert_close(got.b.float(), (lr.b * 0.5).bfloat16().float())


def test_all_rank_zero_refused(tmp_path):
    zero = LowRank(torch.zeros(4, 0), torch.zeros(0, 4), 1.0)
    with pytest.raises(OutputError, match="every merged delta has rank 0"):
        write_adapter(
            tmp_path,
            {"m.weight": zero},
            base_model=None,
            task_type=None,
            template_config=None,
            dtype=torch.float32,
        )


def test_rank_pattern_keys_hit_only_their_module():
    config = adapter_config(
        {"a.q": 2, "x.a.q": 4, "b.q": 2}, base_model=None, task_type=None, template_config=None
    )
    assert config["rank_pattern"] == {"x.a.q": 4}
    config = adapter_config(
        {"a.q": 4, "x.a.q": 2, "y.a.q": 2, "z.a.q": 4, "w.a.q": 4},
        base_model=None,
        task_type=None,
        template_config=None,
    )
    assert list(config["rank_pattern"]) == ["x.a.q", "y.a.q"]
    # "a.q" (rank 4) would also match "x.a.q": every module is listed, longest first
    config = adapter_config(
        {"a.q": 4, "x.a.q": 2, "b.q": 2}, base_model=None, task_type=None, template_config=None
    )
    assert config["rank_pattern"] == {"x.a.q": 2, "a.q": 4, "b.q": 2}
    assert list(config["rank_pattern"]) == ["x.a.q", "a.q", "b.q"]
