"""mergekit configs, read as they are: a ``merge_method:`` YAML becomes a starmerge config.

``starmerge merge``/``validate`` recognise it by its top-level ``merge_method`` and translate it
here, before validation. ``docs/mergekit.md`` has the full table and the checks against mergekit:

=============================  =============================================================
mergekit                       starmerge
=============================  =============================================================
``merge_method``, base_model   ``method`` (same names), ``base_model``
``models[].model: M`` / B+L    ``models[].model: M`` / ``models[].adapter: L`` (not folded)
the base listed in ``models``  left out (mergekit ignores its weight); a method with no base
                               role (``base_counts_as_model``) keeps or adds it, weighted
no ``base_model``              no base role: the first model is the base; else refused
per-model / global ``weight``  ``models[].weight`` (the global one fills models lacking one)
per-model ``X`` (``density``)  ``parameters.Xs`` (the global ``X`` or the default fills gaps)
``lambda`` / no ``density``    ``scaling`` where there is no ``lambda`` / ``density: 1.0``
global ``parameters``          the same, gradients and ``filter`` lists included (settings.py)
``out_dtype``, else ``dtype``  ``output.dtype`` (computed in float32)
per-tensor top-k               ``trim: local`` where the method has ``trim`` (TIES)
=============================  =============================================================

Refused by name: ``slices``/``modules`` (``passthrough`` stacking), ``tokenizer_source`` other
than ``base``, ``tokenizer``, ``chat_template``, ``int8_mask: true``, ``@revision`` pins, keys
mergekit lacks (it ignores misspelt ones), per-model gradients, per-model parameters without a
per-model list, an unweighted model among weighted ones of a no-base-role method.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starmerge.errors import ConfigError, did_you_mean, short_repr
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
_INT8 = "int8_mask (a mergekit memory saving) is not supported; remove it: starmerge streams"
_TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype")
_TOP_KEYS += ("tokenizer_source", *_REFUSED_TOP)  # mergekit's MergeConfiguration fields
_MODEL_KEYS = ("model", "parameters")  # mergekit's InputModelDefinition
_MISSING = object()


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
    problems = _unknown_keys(raw, _TOP_KEYS, "mergekit config:")
    problems += [f"mergekit config: {w}" for k, w in _REFUSED_TOP.items() if k in raw]
    source = raw.get("tokenizer_source")
    if source not in (None, "base"):
        problems.append(
            f"mergekit config: tokenizer_source {short_repr(source)} is not supported; use "
            "`tokenizer_source: base` (the base model's tokenizer is copied)"
        )
    method = raw.get("merge_method")
    params = dict(raw.get("parameters") or {})
    if params.pop("int8_mask", False):  # false is mergekit's default: nothing to refuse
        problems.append(f"mergekit config: {_INT8} one parameter at a time in float32")
    no_base_role = _declared(method) is not None and METHODS.get(method).base_counts_as_model
    weight = _global_weight(method, params, problems)
    base = _base_name(raw.get("base_model"), problems)
    models, per_model = _models(raw.get("models"), base, no_base_role, weight, problems)
    if no_base_role:
        base, per_model = _base_as_model(method, base, weight, models, per_model, problems)
    if base is None and models:
        problems.append(
            f"mergekit config: {short_repr(method)} needs base_model here (starmerge merges task "
            "vectors, model - base_model): give base_model, the models' common base"
        )
    params = _mergekit_defaults(method, params)
    _per_model_lists(method, params, per_model, problems)
    if problems:
        raise ConfigError(problems)
    out: dict[str, Any] = {"method": method, "parameters": params, "models": models}
    if base is not None:
        out["base_model"] = base
    dtype = raw.get("out_dtype") or raw.get("dtype")
    if dtype is not None:
        out["output"] = {"dtype": dtype}
    return out


def _unknown_keys(raw: Mapping[str, Any], known: tuple[str, ...], where: str) -> list[str]:
    """One problem per key mergekit does not have (mergekit would silently ignore it)."""
    return [
        f"{where} unknown key {short_repr(key)}.{did_you_mean(str(key), known)} A mergekit "
        f"config takes: {', '.join(known)}"
        for key in raw
        if key not in known
    ]


def _global_weight(method: Any, params: dict[str, Any], problems: list[str]) -> Any:
    """The global ``weight`` (every model's default in mergekit), taken out of ``params``."""
    if "weights" not in (_declared(method) or {}) or params.get("weight") is None:
        return None
    weight = params.pop("weight")
    if _is_number(weight):
        return weight
    problems.append(
        f"mergekit config: a global weight must be one number here (starmerge's per-model "
        f"weights are numbers), got {short_repr(weight)}; give each model its weight"
    )
    return None


def _base_as_model(
    method: str,
    base: str | None,
    weight: Any,
    models: list[dict[str, Any]],
    per_model: dict[str, list[Any]],
    problems: list[str],
) -> tuple[str | None, dict[str, list[Any]]]:
    """The base of a method with no base role in mergekit; ``per_model`` aligned to ``models``.

    No ``base_model``: the first model is the base (a zero delta, still a model). A base that
    ``models`` lacks is added, as mergekit adds it. Among weighted models, one without a weight
    is refused (mergekit needs each one) rather than given starmerge's default 1.0.
    """
    if base is None:
        return (models[0]["model"] if models and "model" in models[0] else None), per_model
    if not any(m.get("model") == base for m in models):
        models.insert(0, {"model": base} | ({} if weight is None else {"weight": weight}))
        per_model = {k: [None, *v] for k, v in per_model.items()}
    weighted = "weights" in METHODS.get(method).params and any("weight" in m for m in models)
    for m in models if weighted else []:
        if "weight" not in m:
            name = m.get("model", m.get("adapter"))
            added = " (mergekit adds base_model to the models)" if name == base else ""
            problems.append(
                f"mergekit config: {method} merges {short_repr(name)} as a model{added}, and "
                "mergekit needs a weight for each model; give it parameters: {weight: W}"
                + (" (or leave base_model out)" if added else "")
            )
    return base, per_model


def _per_model_lists(
    method: Any, params: dict[str, Any], per_model: dict[str, list[Any]], problems: list[str]
) -> None:
    """Per-model ``X`` values into the list parameter ``Xs``, in place.

    A model without its own value takes the global ``X``, else the method's default.
    """
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
        if any(v is None for v in values) and not _is_number(fallback):
            problems.append(
                f"mergekit config: {name} is given per model for some models and as a "
                f"gradient or filter list for the others ({short_repr(fallback)}); starmerge's "
                f"per-model {plural} are numbers: give every model its own {name}, or none"
            )
            continue
        params[plural] = [fallback if v is None else v for v in values]


def _mergekit_defaults(method: Any, params: dict[str, Any]) -> dict[str, Any]:
    """The global parameters as mergekit means them, in starmerge's names (see the table).

    ``density``/``rescale`` given to a method without them are dropped, as mergekit ignores
    them there (task arithmetic).
    """
    out, declared = dict(params), _declared(method) or {}
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
        _check_name(value, "mergekit config: base_model", problems)
        return value
    problems.append(
        f"mergekit config: base_model must be a plain model path or hub id, got "
        f"{short_repr(value)}; a LoRA on the base model is not a base"
    )
    return None


def _models(
    entries: Any, base: str | None, keep_base: bool, weight: Any, problems: list[str]
) -> tuple[list[dict[str, Any]], dict[str, list[Any]]]:
    """``models:`` entries, and per-model parameter -> one value per model (None: not given).

    A listed base is left out (a zero task vector; mergekit ignores its weight) unless
    ``keep_base`` (no base role). ``weight``: the global default weight, or None.
    """
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
        problems += _unknown_keys(entry, _MODEL_KEYS, f"{where}:")
        name, given = entry["model"], dict(entry.get("parameters") or {})
        if weight is not None:
            given.setdefault("weight", weight)
        if name == base and not keep_base:
            continue
        spec = _input(name, base, where, problems)
        for label, value in list(given.items()):
            if not _is_number(value):
                problems.append(
                    f"{where}: per-model {label} must be one number (per-model gradients and "
                    f"filters are not supported), got {short_repr(value)}; give the gradient in "
                    "the global `parameters:` instead"
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
    _check_name(name, where, problems)
    if "+" not in name:
        return {"model": name}
    model, _, lora = name.partition("+")
    if base is None or model != base:
        problems.append(
            f"{where}: {short_repr(name)} applies a LoRA to {short_repr(model)}, not to the "
            f"base_model ({short_repr(base)}); starmerge merges LoRAs of the base: set base_model"
        )
    return {"adapter": lora}


def _check_name(name: str, where: str, problems: list[str]) -> None:
    """Refuses mergekit's ``PATH@REVISION`` pins by name."""
    if "@" in name:
        problems.append(
            f"{where}: {short_repr(name)} pins a revision (mergekit's PATH@REVISION), which "
            "starmerge does not read; give that revision's local directory"
        )


def _declared(method: Any) -> dict[str, Any] | None:
    """``method``'s parameters, or None for an unknown method (reported by validation)."""
    known = isinstance(method, str) and method in METHODS.names()
    return METHODS.get(method).all_params if known else None


def _default(method: Any, name: str, missing: Any = None) -> Any:
    """The registered default of ``method``'s parameter ``name`` (``missing`` if none)."""
    declared = _declared(method) or {}
    return declared[name].default if name in declared else missing


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
