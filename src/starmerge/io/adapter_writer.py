"""Writing a merged low-rank delta as a PEFT LoRA adapter directory.

The adapter loads with ``PeftModel.from_pretrained(base, out_dir)`` and adds exactly
``scale * b @ a`` to each module's weight:

- each ``LowRank.scale`` is folded into ``lora_B``, and every module gets alpha == r, so PEFT's
  scaling alpha / r is exactly 1 (``use_rslora`` is off);
- ``r``/``lora_alpha`` are the most common rank; other ranks go in ``rank_pattern`` and
  ``alpha_pattern`` keyed by full module names (longest first, checked to match only their own
  module under PEFT's suffix-regex matching);
- ``target_modules`` lists the full module names, so PEFT adapts exactly these modules.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from starmerge.errors import OutputError
from starmerge.io.adapter import ADAPTER_CONFIG, PREFIX, pattern_key
from starmerge.io.output_dir import write_guard
from starmerge.tensors.delta import LowRank

ADAPTER_FILE = "adapter_model.safetensors"
# Fields of a source adapter's config that are kept; everything else is set here or left to
# PEFT's defaults (so no refused feature of a template can leak into the output).
_KEPT_FIELDS = ("lora_dropout", "revision", "auto_mapping")


def write_adapter(
    out_dir: Path,
    modules: dict[str, LowRank],
    *,
    base_model: str | None,
    task_type: str | None,
    template_config: dict[str, Any] | None,
    dtype: torch.dtype,
    fan_in_fan_out: bool = False,
) -> list[Path]:
    """Write ``modules`` as a PEFT LoRA adapter (``adapter_config.json`` + safetensors).

    Args:
        out_dir: An existing directory (normally from ``atomic_output_dir``).
        modules: Parameter key ``<module>.weight`` (or a module name) -> its delta, with
            ``b @ a`` in the base weight's layout. Rank-0 deltas are skipped.
        base_model: ``base_model_name_or_path`` to record.
        task_type: PEFT ``task_type`` to record (e.g. ``"CAUSAL_LM"``).
        template_config: A source adapter's config; only harmless fields are kept from it.
        dtype: dtype of the stored factors (the scale is folded in float32 first).
        fan_in_fan_out: The base stores these weights (in, out) (GPT-2 ``Conv1D``): the factors
            are transposed back to PEFT's layout and the flag is set.

    Returns:
        The two files written.

    Raises:
        OutputError: Every delta has rank 0, or the disk is full.

    Example:
        >>> write_adapter(tmp, {"model.layers.0.self_attn.q_proj.weight": lr},  # doctest: +SKIP
        ...               base_model="org/base", task_type="CAUSAL_LM", template_config=None,
        ...               dtype=torch.bfloat16)
    """
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for key, delta in modules.items():
        if delta.rank == 0:
            continue
        module = key.removesuffix(".weight")
        lora_a, lora_b = _peft_factors(delta, fan_in_fan_out)
        tensors[f"{PREFIX}{module}.lora_A.weight"] = lora_a.to(dtype).contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = lora_b.to(dtype).contiguous()
        ranks[module] = delta.rank
    if not ranks:
        raise OutputError(
            f"nothing to write to adapter {out_dir}: every merged delta has rank 0; "
            "check the method's parameters or write a model output"
        )
    config = adapter_config(
        ranks,
        base_model=base_model,
        task_type=task_type,
        template_config=template_config,
        fan_in_fan_out=fan_in_fan_out,
    )
    out_dir = Path(out_dir)
    weights, config_file = out_dir / ADAPTER_FILE, out_dir / ADAPTER_CONFIG
    with write_guard(weights):
        safetensors.torch.save_file(tensors, str(weights), metadata={"format": "pt"})
    with write_guard(config_file):
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return [config_file, weights]


def _peft_factors(delta: LowRank, fan_in_fan_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``(lora_A (r, in), lora_B (out, r))`` for ``delta``, the scale folded into B."""
    b = _scaled(delta)  # (out, r), or (in, r) with fan_in_fan_out
    a = delta.a.to(torch.float32)  # (r, in), or (r, out) with fan_in_fan_out
    if fan_in_fan_out:  # b @ a = (B A)^T, so A = b^T and B = a^T
        return b.T, a.T
    return a, b


def adapter_config(
    ranks: dict[str, int],
    *,
    base_model: str | None,
    task_type: str | None,
    template_config: dict[str, Any] | None,
    fan_in_fan_out: bool = False,
) -> dict[str, Any]:
    """The ``adapter_config.json`` content for modules with the given ranks (alpha == r each).

    Args:
        ranks: Full module name -> rank (at least one).
        base_model: ``base_model_name_or_path``.
        task_type: PEFT ``task_type``.
        template_config: A source adapter's config; only harmless fields are kept from it.
        fan_in_fan_out: Value of the ``fan_in_fan_out`` flag.

    Returns:
        The config as a JSON-ready dict.

    Example:
        >>> adapter_config({"m.q": 4, "m.k": 4, "m.v": 2}, base_model=None, task_type=None,
        ...                template_config=None)["rank_pattern"]
        {'m.v': 2}
    """
    r = Counter(ranks.values()).most_common(1)[0][0]
    rank_pattern = _rank_pattern({m: k for m, k in ranks.items() if k != r})
    if not _only_self_matches(rank_pattern, ranks):
        # a module name is a suffix of another one: list every module, longest first, so the
        # first key PEFT tries for a name is the name itself
        rank_pattern = _rank_pattern(ranks)
        if not _only_self_matches(rank_pattern, ranks):
            raise ValueError("module names collide under PEFT's rank_pattern regex matching")
    template = template_config or {}
    config = {k: template[k] for k in _KEPT_FIELDS if k in template}
    config.update(
        peft_type="LORA",
        task_type=task_type,
        base_model_name_or_path=base_model,
        r=r,
        lora_alpha=r,
        rank_pattern=rank_pattern,
        alpha_pattern=dict(rank_pattern),
        target_modules=sorted(ranks),
        use_rslora=False,
        use_dora=False,
        bias="none",
        fan_in_fan_out=fan_in_fan_out,
        modules_to_save=None,
        layers_to_transform=None,
        layers_pattern=None,
        exclude_modules=None,
        init_lora_weights=True,
        inference_mode=True,
        lora_bias=False,
    )
    config.setdefault("lora_dropout", 0.0)
    return config


def _rank_pattern(ranks: dict[str, int]) -> dict[str, int]:
    return {m: ranks[m] for m in sorted(ranks, key=lambda m: (-len(m), m))}


def _only_self_matches(rank_pattern: dict[str, int], modules: dict[str, int]) -> bool:
    """Whether PEFT resolves every module's pattern key to itself (or to none if unlisted)."""
    return all(pattern_key(rank_pattern, m) == (m if m in rank_pattern else None) for m in modules)


def stored_factors(delta: LowRank, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors as :func:`write_adapter` stores them: the scale folded into b, in ``dtype``."""
    return _scaled(delta).to(dtype), delta.a.to(dtype)


def _scaled(delta: LowRank) -> torch.Tensor:
    """``b * scale`` in float32 (``b`` itself, not a copy, for a float32 ``b`` at scale 1)."""
    b = delta.b.to(torch.float32)
    return b if delta.scale == 1.0 else b * delta.scale
