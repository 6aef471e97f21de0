"""Synthetic inputs of ``bench_memory.py``: a Llama-shaped fp32 base, LoRA adapters, statistics.

The base is an HF directory (``config.json`` for ``LlamaConfig`` plus safetensors shards) written
tensor by tensor with random values, without instantiating a model. Everything is cached under
``benchmarks/work/`` (git-ignored) and rebuilt only when the sizes change.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import common as C
import torch
from safetensors.torch import save_file

R, ALPHA = 16, 32
ADAPTED = ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")


# --------------------------------------------------------------------------- synthetic base
def llama_shapes(s: dict) -> dict[str, tuple[int, ...]]:
    """HF Llama parameter names and shapes, in checkpoint order."""
    h, i, head = s["hidden"], s["intermediate"], s["hidden"] // s["heads"]
    kv = s["kv_heads"] * head
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (s["vocab"], h)}
    for n in range(s["layers"]):
        p = f"model.layers.{n}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (s["vocab"], h)
    return shapes


def llama_config(s: dict) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": s["hidden"], "intermediate_size": s["intermediate"],
        "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"], "head_dim": s["hidden"] // s["heads"],
        "vocab_size": s["vocab"], "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float32",
    }


def write_base(path: Path, s: dict) -> None:
    """Write config.json and fp32 shards one at a time (at most one shard in memory)."""
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    shapes = llama_shapes(s)
    groups: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():  # plan the shards first, so their names are known
        nbytes = math_prod(shape) * 4
        if groups[-1] and size + nbytes > s["shard_bytes"]:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    weight_map = {}
    for n, keys in enumerate(groups):
        name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {k: torch.ones(shapes[k]) if len(shapes[k]) == 1
                 else torch.randn(shapes[k], generator=g) * 0.02 for k in keys}
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
        del shard
    total = sum(math_prod(sh) * 4 for sh in shapes.values())
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(llama_config(s), indent=2))


def math_prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def build_inputs(s: dict, work: Path) -> dict:
    base = work / "base"
    stamp = {**s, "v": 1}
    t0 = time.perf_counter()
    built = C.cached(base, stamp, lambda: write_base(base, s))
    shapes = llama_shapes(s)
    modules = {f"model.layers.{n}.{m}": shapes[f"model.layers.{n}.{m}.weight"]
               for n in range(s["layers"]) for m in ADAPTED}
    spec = C.LoraSpec(modules, r=R, alpha=ALPHA, target_modules=("q_proj", "v_proj", "up_proj"),
                      base_model=str(base))
    adapters = [work / "adapters" / f"task{t}" for t in range(s["tasks"])]
    C.cached(work / "adapters", {"tasks": s["tasks"], "base": str(base), **stamp},
             lambda: [C.write_lora(p, spec, seed=100 + t) for t, p in enumerate(adapters)])
    stats = work / "statistics" / "shared.safetensors"
    C.cached(stats.parent, {"modules": list(modules), **stamp},
             lambda: write_statistics(stats, modules))
    return {"base": base, "adapters": adapters, "shapes": shapes, "modules": modules,
            "statistics": stats, "built": built, "build_s": time.perf_counter() - t0}


def write_statistics(path: Path, modules: dict) -> None:
    """One statistics file that every task lists (the data methods' Fishers and input Grams).

    The values only have to be valid (a positive Fisher, a positive definite Gram): memory does
    not depend on them, and one shared file keeps the full-size inputs to about 1 GB.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for module, (out, inp) in modules.items():
        tensors[f"{module}.weight::fisher"] = torch.rand(out, inp, generator=g) + 0.1
        a = torch.randn(R, inp, generator=g)
        tensors[f"{module}::gram_in"] = torch.eye(inp) + a.T @ a / inp
    save_file(tensors, str(path))
