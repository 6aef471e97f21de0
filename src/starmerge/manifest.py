"""The run manifest (``starmerge.json``) and the model card."""

from __future__ import annotations

import json
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from starmerge.io.hashing import hash_files
from starmerge.io.output_dir import write_guard
from starmerge.memory import max_rss_bytes
from starmerge.plan import Plan
from starmerge.settings import PerKey


def versions() -> dict[str, str | None]:
    """Versions of Python and the libraries that shape a result."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("starmerge", "torch", "safetensors", "numpy", "transformers", "peft"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def input_paths(plan: Plan) -> list[tuple[str, Path]]:
    """Every input directory and weight file with a label for messages, e.g. ``adapter models[0]``.

    The output directory must avoid all of them (``io.output_dir.check_outside_inputs``).
    """
    out: list[tuple[str, Path]] = []
    if plan.config_path is not None:
        out.append(("config file", plan.config_path))
    if plan.base is not None:
        out += [("base model", p) for p in (plan.base_path, *plan.base.files)]
    for i, t in enumerate(plan.tasks):
        label = f"{'adapter' if t.spec.kind == 'adapter' else 'fine-tuned model'} models[{i}]"
        out += [(label, p) for p in (t.path, *t.source.files)]
    return out


def input_hashes(plan: Plan) -> dict[str, dict[str, str]]:
    """sha256 of every input's weight files: ``{"base": {...}, "0": {...}, "1": ...}``."""
    out = {str(i): hash_files(t.source.files) for i, t in enumerate(plan.tasks)}
    if plan.base is not None:
        out["base"] = hash_files(plan.base.files)
    return out


def layout_stats(plan: Plan) -> dict[str, Any]:
    """Per adapter input, the ``fan_in_fan_out`` flag and the modules whose delta was transposed.

    Empty when no adapter sets the flag or is transposed (see ``io.adapter`` for the rule).
    """
    out = {}
    for i, t in enumerate(plan.tasks):
        transposed = sorted(getattr(t.source, "transposed", ()))
        flag = bool(getattr(t.source, "fan_in_fan_out", False))
        if flag or transposed:
            out[f"models[{i}]"] = {"flag": flag, "transposed": transposed}
    return {"fan_in_fan_out": out} if out else {}


def space_summary(space: str, per_parameter: dict[str, dict]) -> dict[str, Any]:
    """The merge space and, for ``core``/``knots``, the sizes of the coordinates.

    Each parameter's ``core_shape`` ``[p, q]`` is in its per-parameter statistics; this gives
    their range over the merge (``rows``: p, ``cols``: q; min, max, mean).

    Example:
        >>> space_summary("core", {"w": {"core_shape": [8, 6]}})["rows"]
        {'min': 8, 'max': 8, 'mean': 8.0}
    """
    shapes = [st["core_shape"] for st in per_parameter.values() if "core_shape" in st]
    if space == "full" or not shapes:
        return {"name": space}
    out: dict[str, Any] = {"name": space, "parameters": len(shapes)}
    for axis, label in enumerate(("rows", "cols")):
        sizes = [s[axis] for s in shapes]
        out[label] = {"min": min(sizes), "max": max(sizes), "mean": sum(sizes) / len(sizes)}
    return out


def build_manifest(
    plan: Plan, state: Any, stats: dict, wall_s: float, memory: Any, hashes: dict[str, dict]
) -> dict:
    """Resolved config, inputs with hashes, method statistics, versions, time and memory."""
    inputs = [
        {
            "kind": t.spec.kind,
            "source": t.spec.source,
            "path": str(t.path),
            "weight": t.spec.weight,
            "sha256": hashes[str(i)],
            "n_parameters_changed": len(t.shapes),
        }
        for i, t in enumerate(plan.tasks)
    ]
    base = None
    if plan.base is not None:
        base = {
            "source": plan.config.base_model,
            "path": str(plan.base_path),
            "sha256": hashes["base"],
        }
    config = plan.config.to_dict()
    params = {k: v.describe() if isinstance(v, PerKey) else v for k, v in plan.params.items()}
    config["parameters"] = params
    return {
        "format": "starmerge-manifest/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": config,
        "method": {"name": plan.method.name, "parameters": params, "paper": plan.method.paper},
        "space": space_summary(plan.config.space, stats.get("per_parameter", {})),
        "base_model": base,
        "inputs": inputs,
        "missing_modules": plan.missing,
        "statistics": {"state": state.summary() if state is not None else {}, **stats},
        "versions": versions(),
        "wall_time_s": round(wall_s, 3),
        # Anonymous memory (tensors, buffers), sampled during the run; the max RSS also counts
        # the page cache of the memory-mapped checkpoints.
        "peak_memory_bytes": memory.peak,
        "max_rss_bytes": max_rss_bytes(),
        "predicted_peak_bytes": plan.predicted_peak_bytes,
    }


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    """Write ``starmerge.json``.

    Raises:
        OutputError: The disk is full or the file cannot be written (no partial file is left).
    """
    path = out_dir / "starmerge.json"
    text = json.dumps(manifest, indent=2, default=str) + "\n"
    with write_guard(path):
        path.write_text(text)
    return path


def write_model_card(out_dir: Path, manifest: dict) -> Path:
    """Write a short ``README.md`` model card describing the merge.

    Raises:
        OutputError: The disk is full or the file cannot be written (no partial file is left).
    """
    method = manifest["method"]
    params = ", ".join(f"{k}={v}" for k, v in method["parameters"].items()) or "none"
    space = manifest.get("space", {}).get("name", "full")
    where = "" if space == "full" else f" in {space} space"
    lines = [
        "---",
        "tags: [merge, starmerge]",
        "---",
        f"# Merged model ({method['name']})",
        "",
        f"Made with starmerge {manifest['versions'].get('starmerge')} using `{method['name']}` "
        f"({params}){where}; paper: {method['paper'] or 'n/a'}.",
        "",
        f"Base model: `{(manifest['base_model'] or {}).get('source')}`",
        "",
        "Merged task models:",
        "",
        *[f"- `{i['source']}` ({i['kind']})" for i in manifest["inputs"]],
        "",
        "The full recipe, input hashes and statistics are in `starmerge.json`.",
        "",
    ]
    path = out_dir / "README.md"
    with write_guard(path):
        path.write_text("\n".join(lines))
    return path
