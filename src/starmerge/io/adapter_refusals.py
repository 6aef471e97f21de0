"""Which PEFT adapter features and config values the LoRA loader refuses, and their errors.

Only plain LoRA is read as ``scale * B @ A``; every other feature (DoRA, LoRA biases, embedding
LoRA, ``modules_to_save``, LoRA variants, inits that change the base model) and any unknown tensor
is refused by name, with the fix, rather than silently dropped. ``starmerge.io.adapter`` calls
:func:`refuse_config` on the config, :func:`check_numbers` on its ranks and alphas, and
:func:`refuse_tensors` on tensors that are not LoRA factors.

Ranks and alphas are read as PEFT reads them (``r`` a positive int, ``lora_alpha`` a number,
``rank_pattern``/``alpha_pattern`` mappings of module patterns to those), and stricter where PEFT
would load an adapter that cannot be meant: an alpha that is not positive and finite (0 makes the
adapter a no-op, NaN or Inf poison every weight), or ``true``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from starmerge.errors import InputError, UnsupportedFeatureError, short_repr

_MERGE_FIX = "merge it into the base model (PeftModel.merge_and_unload) and pass it as `model:`"
# init_lora_weights values whose adapter applies to a modified base model, not the original one
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# *_config fields that only configure an initialisation or a runtime, not the adapted function
_HARMLESS_CONFIGS = set(
    "loftq_config eva_config corda_config lora_ga_config megatron_config runtime_config".split()
)
_TENSOR_FEATURES = (  # marker in a tensor key -> feature name
    ("lora_magnitude_vector", "DoRA"),
    ("lora_embedding_", "embedding LoRA"),
    ("modules_to_save", "modules_to_save"),
    ("trainable_tokens", "trainable tokens"),
)
_FEATURE_FLAGS = {  # config key -> feature name, refused when truthy
    "use_dora": "DoRA (use_dora: true)",
    "lora_bias": "LoRA bias (lora_bias: true)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on nn.Parameter (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora: true)",
}


def refuse(path: Path, feature: str, fix: str = _MERGE_FIX) -> UnsupportedFeatureError:
    """The error for an adapter at ``path`` that uses ``feature``, with the ``fix`` to apply.

    Example:
        >>> raise refuse(Path("ad"), "DoRA (use_dora: true)")  # doctest: +SKIP
    """
    return UnsupportedFeatureError(
        f"adapter {path} uses {feature}, which starmerge does not implement; {fix}"
    )


def refuse_config(config: dict[str, Any], path: Path) -> None:
    """Raise for the first feature the adapter config enables that starmerge does not implement.

    Raises:
        UnsupportedFeatureError: Naming the feature and the fix.
    """
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise refuse(path, f"peft_type {peft_type!r} (only LORA is supported)")
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise refuse(path, f"LoRA bias (bias: {bias})")
    if config.get("modules_to_save"):
        raise refuse(path, f"modules_to_save ({config['modules_to_save']})")
    for key, feature in _FEATURE_FLAGS.items():
        if config.get(key):
            raise refuse(path, feature)
    for key, value in config.items():  # LoRA variants: *_config and use_* switches
        unknown_config = key.endswith("_config") and key not in _HARMLESS_CONFIGS
        unknown_switch = key.startswith("use_") and key != "use_rslora"
        if value and (unknown_config or unknown_switch):
            raise refuse(path, f"the LoRA variant {key}")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(_BASE_CHANGING_INITS):
        raise refuse(
            path,
            f"init_lora_weights: {init} (its adapter applies to a changed base model)",
            "re-save it with PEFT's path_initial_model_for_weight_conversion, or " + _MERGE_FIX,
        )


def refuse_tensors(keys: list[str], path: Path) -> UnsupportedFeatureError:
    """The error for tensors that are not LoRA factors, naming the feature where known."""
    for marker, feature in (*_TENSOR_FEATURES, (".bias", "LoRA bias")):
        hit = next(
            (k for k in keys if marker in k and (marker != ".bias" or k.endswith(marker))), ""
        )
        if hit:
            return refuse(path, f"{feature} (tensor '{hit}')")
    more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
    return refuse(path, f"tensor '{keys[0]}'{more}, which the LoRA loader does not understand")


def check_numbers(config: dict[str, Any], path: Path) -> None:
    """Raise for the first ``r``, ``lora_alpha`` or pattern value PEFT would not read as meant.

    Raises:
        InputError: Naming the adapter, the field, the value received and the fix.
    """
    _check_value(path, "r", config.get("r", 8), _is_rank)
    _check_value(path, "lora_alpha", config.get("lora_alpha", 8), _is_alpha)
    for field, ok in (("rank_pattern", _is_rank), ("alpha_pattern", _is_alpha)):
        patterns = config.get(field)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise InputError(
                f"adapter {path}: {field} must be a mapping of module patterns to values "
                f"(or null), got {short_repr(patterns)}; fix adapter_config.json"
            )
        for key, value in patterns.items():
            _check_value(path, f"{field}[{short_repr(key)}]", value, ok)


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_alpha(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value) and value > 0
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_value(path: Path, field: str, value: Any, ok: Any) -> None:
    if ok(value):
        return
    want = "a positive integer" if ok is _is_rank else "a positive finite number"
    raise InputError(
        f"adapter {path}: {field} must be {want} (as PEFT reads it), got {short_repr(value)}; "
        "fix adapter_config.json or re-save the adapter with PEFT"
    )
