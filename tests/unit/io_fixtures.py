"""Helpers for the io tests: tiny random HF models from configs, adapters made with PEFT."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_config  # tests/conftest.py, one tiny Llama config for every test


def tiny_llama(seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(tiny_config("llama"))


def tiny_gpt2(seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        vocab_size=128,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return tf.GPT2LMHeadModel(config)


def randomize_lora(peft_model, seed: int = 1, std: float = 0.2) -> None:
    """Give every LoRA parameter random values (PEFT initialises lora_B to zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def make_peft_adapter(model, out_dir: Path, *, seed: int = 1, merge: bool = True, **lora_kwargs):
    """Save a random PEFT LoRA adapter of ``model`` to ``out_dir``.

    Returns:
        PEFT's own task vector ``merge_and_unload() - base`` (float64) of every changed
        parameter, or ``None`` when ``merge`` is false.
    """
    from peft import LoraConfig, get_peft_model

    before = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**lora_kwargs))
    randomize_lora(peft_model, seed)
    peft_model.save_pretrained(out_dir)
    if not merge:
        return None
    after = peft_model.merge_and_unload().state_dict()
    return {
        k: after[k].double() - before[k].double()
        for k in before
        if k in after and not torch.equal(after[k], before[k])
    }


def edit_adapter(
    adapter_dir: Path,
    *,
    config: dict | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    drop: tuple[str, ...] = (),
) -> Path:
    """Change an adapter on disk: update config keys, add/replace tensors, drop tensors."""
    if config:
        cfg_file = adapter_dir / "adapter_config.json"
        cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), **config}))
    if tensors or drop:
        file = adapter_dir / "adapter_model.safetensors"
        state = {k: v for k, v in load_file(file).items() if not any(d in k for d in drop)}
        save_file({**state, **(tensors or {})}, file, metadata={"format": "pt"})
    return adapter_dir
