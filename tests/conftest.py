"""Shared fixtures: tiny random HF models built from configs and PEFT adapters made on them.

Nothing here touches the network: models come from configs, adapters from ``peft`` itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)


def tiny_config(arch: str):
    """The config of a tiny random ``arch`` model (llama, mistral, t5); io_fixtures uses it too."""
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            max_position_embeddings=64,
        )
    if arch == "mistral":
        return tf.MistralConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            max_position_embeddings=64,
            sliding_window=32,
        )
    if arch == "t5":
        return tf.T5Config(
            d_model=32,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            d_kv=8,
            vocab_size=128,
            decoder_start_token_id=0,
        )
    raise ValueError(arch)


def build_tiny_model(arch: str, out_dir: Path, seed: int = 0) -> Path:
    """Save a tiny random ``arch`` model (llama, mistral, t5) to ``out_dir``."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tiny_config(arch)
    cls = tf.T5ForConditionalGeneration if arch == "t5" else tf.AutoModelForCausalLM
    model = cls(config) if arch == "t5" else cls.from_config(config)
    model.save_pretrained(out_dir)
    return out_dir


def make_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    targets: list[str],
    r: int = 4,
    alpha: int = 8,
    seed: int = 1,
    **lora_kwargs,
) -> Path:
    """Make a PEFT LoRA adapter on the model at ``base_dir`` with random (non-zero) factors."""
    from tests.fixtures.tiny_models import make_adapter as make

    return make(base_dir, out_dir, targets, seed, r=r, alpha=alpha, scale=0.2, **lora_kwargs)


@pytest.fixture
def register_test_method():
    """``register(name, **register_method kwargs)``: a merge method that exists in one test only.

    Unregistered after the test, so ``METHODS.names()`` (the conformance suite) never sees it.
    """
    from starmerge.methods import METHODS, register_method

    names: list[str] = []

    def register(name: str, **kwargs):
        def wrap(fn):
            register_method(name, **kwargs)(fn)
            names.append(name)
            return fn

        return wrap

    yield register
    for name in names:
        METHODS.remove(name)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one torch thread (and do not fight other processes for cores).

    Use per module: ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random llama, mistral and t5 models saved as HF directories."""
    root = tmp_path_factory.mktemp("models")
    return {arch: build_tiny_model(arch, root / arch) for arch in ("llama", "mistral", "t5")}


@pytest.fixture(scope="session")
def llama_adapters(tiny_models, tmp_path_factory) -> list[Path]:
    """Three adapters on the tiny llama: plain, rsLoRA, and rank/alpha patterns."""
    root = tmp_path_factory.mktemp("adapters")
    base = tiny_models["llama"]
    qv = ["q_proj", "v_proj"]
    return [
        make_adapter(base, root / "plain", targets=qv, r=4, alpha=8, seed=1),
        make_adapter(base, root / "rslora", targets=qv, r=4, alpha=8, seed=2, use_rslora=True),
        make_adapter(
            base,
            root / "patterns",
            targets=qv + ["k_proj"],
            r=4,
            alpha=8,
            seed=3,
            rank_pattern={"k_proj": 2},
            alpha_pattern={"v_proj": 16},
        ),
    ]
