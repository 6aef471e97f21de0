"""mergekit configs, read as they are: a ``merge_method:`` YAML becomes a starmerge config.

``starmerge merge`` and ``starmerge validate`` recognise a mergekit config by its top-level
``merge_method`` key and translate it here, before validation (so every starmerge check and
message applies to the result):

==============================  ============================================================
mergekit                        starmerge
==============================  ============================================================
``merge_method: X``             ``method: X`` (mergekit's names are registry names)
``base_model: B``               ``base_model: B``
``models[].model: M``           ``models[].model: M`` (a full model; its delta M - B is taken)
``models[].model: B+L``         ``models[].adapter: L`` (a LoRA input, never folded into B;
                                B must be the config's ``base_model``)
``models[].model: B`` (base)    left out (its task vector is zero); with a per-model
                                ``weight`` kept as a zero-delta model, so that a weight
                                normalisation (``linear``) counts it as mergekit does; and
                                added for a method that mergekit gives the base as one more
                                model (``karcher``: ``base_counts_as_model``)
``models[].parameters.weight``  ``models[].weight`` (one number per model)
``models[].parameters.X``       ``parameters.Xs`` (``density`` -> ``densities``, ``gamma`` ->
                                ``gammas`` ...: one per model; the global ``X``, else the
                                method's default, where a model has none)
``parameters.lambda``           ``scaling`` where the method has no ``lambda`` (TIES, task
                                arithmetic)
(no ``density``)                ``density: 1.0``, mergekit's default (keep everything)
``parameters:`` (global)        ``parameters:`` (same names; layer gradients and ``filter``
                                conditions as in mergekit: :mod:`starmerge.settings`)
``out_dtype`` / ``dtype``       ``output.dtype`` (``out_dtype``, else ``dtype``: as mergekit);
                                computation is float32 either way
``tokenizer_source: base``      the base model's tokenizer files are copied (the default)
(mergekit trims per tensor)     ``trim: local`` for a method with a ``trim`` parameter (TIES),
                                unless the config sets ``trim``
==============================  ============================================================

Refused by name, never ignored: ``slices:`` and ``modules:`` (layer stacking, ``passthrough``),
``tokenizer_source`` other than ``base``, ``tokenizer:``, ``chat_template``, ``int8_mask``,
per-model gradients or filters (one number per model), per-model parameters other than
``weight`` and ``density``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starmerge.errors import ConfigError, short_repr
from starmerge.methods import METHODS

_REFUSED_TOP = {
    "slices": "layer stacking (slices: / passthrough frankenmerges) is not supported; merge "
    "whole models with `models:`",
    "modules": "per-module configs (modules:) are not supported; merge whole models with `models:`",
    "tokenizer": "tokenizer surgery (tokenizer:) is not supported; starmerge copies the base "
    "model's tokenizer (tokenizer_source: base)",
    "chat_template": "chat_template is not supported; the base model's tokenizer files, with "
    "their chat template, are copied",
}
_REFUSED_PARAMS = {
    "int8_mask": "int8_mask (a mergekit memory saving) is not supported; remove it: starmerge "
    "streams one parameter at a time in float32",
}


def is_mergekit(raw: Any) -> bool:
    """Whether a parsed YAML document is a mergekit config (it has ``merge_method``)."""
    return isinstance(raw, Mapping) and "merge_method" in raw


def from_mergekit(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Translate a mergekit config into a starmerge config mapping (not yet validated).

    Raises:
        ConfigError: Listing every mergekit feature starmerge does not do.

    Example:
        >>> from_mergekit({"merge_method": "ties", "base_model": "b",
        ...     "models": [{"model": "b+lora1", "parameters": {"weight": 0.5}}]})["models"]
        [{'adapter': 'lora1', 'weight': 0.5}]
    """
    problems: list[str] = []
    for key, why in _REFUSED_TOP.items():
        if raw.get(key) is not None:
            problems.append(f"mergekit config: {why}")
    source = raw.get("tokenizer_source")
    if source not in (None, "base"):
        problems.append(
            f"mergekit config: tokenizer_source {short_repr(source)} is not supported; use "
            "`tokenizer_source: base` (the base model's tokenizer is copied)"
        )
    method = raw.get("merge_method")
    params = dict(raw.get("parameters") or {})
    for key, why in _REFUSED_PARAMS.items():
        if key in params:
            problems.append(f"mergekit config: {why}")
            params.pop(key)
    base = _base_name(raw.get("base_model"), problems)
    models, per_model = _models(raw.get("models"), base, problems)
    declared = _declared(method)
    if base is not None and declared is not None and METHODS.get(method).base_counts_as_model:
        if {"model": base} not in models:
            models.insert(0, {"model": base})  # mergekit merges the base as one more model
            per_model = {k: [None, *v] for k, v in per_model.items()}
    params = _mergekit_defaults(method, params)
    for name, values in per_model.items():
        if all(v is None for v in values):
            continue
        plural = f"{name[:-1]}ies" if name.endswith("y") else f"{name}s"
        if _default(method, plural, missing=_MISSING) is _MISSING:
            problems.append(
                f"mergekit config: per-model {name} is not a per-model parameter of "
                f"{short_repr(method)}; give it once in the global `parameters:`"
            )
            continue
        fallback = params.get(name, _default(method, name))
        params[plural] = [fallback if v is None else v for v in values]
    if problems:
        raise ConfigError(problems)
    out: dict[str, Any] = {"method": method, "parameters": params, "models": models}
    if base is not None:
        out["base_model"] = base
    dtype = raw.get("out_dtype") or raw.get("dtype")
    if dtype is not None:
        out["output"] = {"dtype": dtype}
    return out


def _mergekit_defaults(method: Any, params: dict[str, Any]) -> dict[str, Any]:
    """The meaning mergekit gives the global parameters, in starmerge's names.

    ``lambda`` is ``scaling`` where the method has no ``lambda``; ``density`` defaults to 1.0
    (mergekit keeps everything unless told); a ``trim`` parameter is ``local`` (mergekit's top-k
    is per tensor); ``density``/``rescale`` given to a method without them are dropped, as
    mergekit ignores them there (task arithmetic).
    """
    out = dict(params)
    declared = _declared(method)
    if declared is None:
        return out
    if "lambda" in out and "lambda" not in declared and "scaling" in declared:
        out["scaling"] = out.pop("lambda")
    if "density" in declared and "density" not in out:
        out["density"] = 1.0
    if "trim" in declared and "trim" not in out:
        out["trim"] = "local"
    for name in ("density", "rescale"):
        if name in out and name not in declared:
            out.pop(name)
    return out


def _base_name(value: Any, problems: list[str]) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and "+" not in value:
        return value
    problems.append(
        f"mergekit config: base_model must be a plain model path or hub id, got "
        f"{short_repr(value)}; a LoRA on the base model is not a base"
    )
    return None


def _models(
    entries: Any, base: str | None, problems: list[str]
) -> tuple[list[dict[str, Any]], dict[str, list[Any]]]:
    """``models:`` entries, and per-model parameter -> one value per model (None: not given)."""
    if not isinstance(entries, list):
        problems.append(
            f"mergekit config: models must be a list of {{model: ...}}, got {short_repr(entries)}"
        )
        return [], {}
    models: list[dict[str, Any]] = []
    given_all: list[dict[str, Any]] = []
    for i, entry in enumerate(entries):
        where = f"mergekit config: models[{i}]"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("model"), str):
            problems.append(f"{where} must be {{model: PATH-OR-ID}}, got {short_repr(entry)}")
            continue
        name = entry["model"]
        given = dict(entry.get("parameters") or {})
        if name == base and "weight" not in given:
            continue  # the base's own task vector is zero and carries no weight
        spec = _input(name, base, where, problems)
        for label, value in list(given.items()):
            if not _is_number(value):
                problems.append(
                    f"{where}: per-model {label} must be one number (per-model gradients and "
                    f"filters are not supported), got {short_repr(value)}; give the "
                    "gradient in the global `parameters:` instead"
                )
                given.pop(label)
        if "weight" in given:
            spec["weight"] = given.pop("weight")
        models.append(spec)
        given_all.append(given)
    names = sorted({k for g in given_all for k in g})
    return models, {n: [g.get(n) for g in given_all] for n in names}


def _input(name: str, base: str | None, where: str, problems: list[str]) -> dict[str, Any]:
    """``{model: M}`` or, for mergekit's ``B+L`` form, ``{adapter: L}`` (B must be the base)."""
    if "+" not in name:
        return {"model": name}
    model, _, lora = name.partition("+")
    if base is None or model != base:
        problems.append(
            f"{where}: {short_repr(name)} applies a LoRA to {short_repr(model)}, which is not "
            f"the base_model ({short_repr(base)}); starmerge merges LoRAs of the base model: "
            "set base_model to it"
        )
    return {"adapter": lora}


_MISSING = object()


def _declared(method: Any) -> dict[str, Any] | None:
    """``method``'s parameters, or None for an unknown method (reported by validation)."""
    if not isinstance(method, str) or method not in METHODS.names():
        return None
    return METHODS.get(method).all_params


def _default(method: Any, name: str, missing: Any = None) -> Any:
    """The registered default of ``method``'s parameter ``name`` (``missing`` if none)."""
    declared = _declared(method)
    if declared is None or name not in declared:
        return missing
    return declared[name].default


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
