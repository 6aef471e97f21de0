"""Seeded fuzz cases for ``starmerge merge``: a valid config on tiny inputs, then mutations.

:func:`make_case` copies a pristine set of inputs (a tiny llama base, a full fine-tune of it and
three LoRA adapters) into a case directory, writes a valid merge config for them and applies one
to three random mutations: of the config's values, of its YAML text, of the CLI overrides, of an
adapter config, of a safetensors file, or of the output directory. Every random choice comes
from ``random.Random(f"{seed}:{index}")``, so a case is rebuilt exactly from its seed and index.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from tests.integration.fuzz_files import (
    HOSTILE,
    brief,
    mutate_adapter_config,
    mutate_safetensors,
    mutate_yaml,
)

ADAPTERS = ("plain", "rslora", "patterns")
# Methods that merge the tiny inputs without task data, with valid parameters to start from.
METHODS = {
    "simple_average": lambda r: {},
    "task_arithmetic": lambda r: {"scaling": round(r.uniform(0.1, 2), 3)},
    "ties": lambda r: {
        "density": round(r.uniform(0.1, 1), 3),
        "trim": r.choice(["global", "local"]),
    },
    "tall_masks": lambda r: {},
    "consensus": lambda r: {"alpha": round(r.uniform(0.1, 2), 3)},
    "metagpt": lambda r: {},
    "star": lambda r: {"eta": round(r.uniform(5, 100), 2)},
}
# Mutation families, weighted by repetition.
KINDS = "value value text override adapter adapter safetensors safetensors safetensors out".split()
LOWRANK_OUTPUT = {"simple_average", "task_arithmetic", "metagpt", "star"}
OVERRIDES = [
    *"parameters.eta=20 parameters.eta=[1 models.x=1 parameters.eta.x=1 =1 noequals".split(),
    *"output.dtype=float64 parameters.scaling=.nan parameters.scaling=.inf models=[]".split(),
    *"base_model=null output=1 parameters=[1] a.b.c.d=1 ŝtår=1 parameters.eta=1e999".split(),
    *"output.max_shard_size=0 method.density=2 models.0.weight=.nan method=".split(),
    "method=!!python/object/apply:os.system ['true']",
]


@dataclass
class Case:
    """One fuzz case: the CLI arguments, the paths to check, and what was done to the inputs."""

    argv: list[str]
    inputs: Path  # the copies of the pristine inputs
    out: Path
    canary: Path  # a file that exists only if a YAML tag ran code
    protected: list[Path] = field(default_factory=list)  # what the config reads
    log: list[str] = field(default_factory=list)


def build_pristine(root: Path, base: Path, adapters: list[Path]) -> Path:
    """Copy the tiny llama and its three adapters under ``root``; add a full fine-tune."""
    shutil.copytree(base, root / "base")
    for name, adapter in zip(ADAPTERS, adapters, strict=True):
        shutil.copytree(adapter, root / name)
    shutil.copytree(base, root / "ft")
    tensors = load_file(root / "ft" / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    for key, value in tensors.items():
        if key.endswith(("q_proj.weight", "v_proj.weight", "up_proj.weight")):
            tensors[key] = value + 0.05 * torch.randn(value.shape, generator=gen)
    save_file(tensors, root / "ft" / "model.safetensors", metadata={"format": "pt"})
    _shard(root / "base", root / "sharded")
    return root


def _shard(model: Path, out: Path) -> None:
    """The model at ``model`` saved as two safetensors shards with an index."""
    out.mkdir()
    shutil.copy(model / "config.json", out)
    tensors = load_file(model / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": 4 * sum(t.numel() for t in tensors.values())}}
    (out / "model.safetensors.index.json").write_text(
        json.dumps({**index, "weight_map": weight_map})
    )


def valid_config(rng: random.Random, inputs: Path) -> dict:
    """A config that merges: a method with valid parameters, 2-3 inputs, an output section."""
    method = rng.choice(sorted(METHODS))
    names = rng.sample(ADAPTERS, rng.randint(2, 3))
    fmt = rng.choice(["model", "adapter"])
    models = [{"adapter": str(inputs / n)} for n in names]
    if fmt == "model" and rng.random() < 0.4:
        models[0] = {"model": str(inputs / "ft")}
    params = METHODS[method](rng)
    if method == "task_arithmetic" and rng.random() < 0.5:
        for m in models:
            m["weight"] = round(rng.uniform(-1, 2), 3)
    output: dict = {"format": fmt}
    if fmt == "adapter" and method not in LOWRANK_OUTPUT:
        output["rank"] = rng.choice([2, 4, 8])
    if rng.random() < 0.3:
        output["dtype"] = rng.choice(["float32", "bfloat16", "float16"])
    if fmt == "model" and rng.random() < 0.2:
        output["max_shard_size"] = "20KB"
    return {
        "method": method,
        "parameters": params,
        "base_model": str(inputs / rng.choice(["base", "base", "sharded"])),
        "models": models,
        "output": output,
    }


def make_case(seed: int, index: int, case_dir: Path, pristine: Path, mutations: int = -1) -> Case:
    """Build case ``index`` of ``seed`` in ``case_dir`` (``mutations=0``: the valid config)."""
    rng = random.Random(f"{seed}:{index}")
    inputs = case_dir / "in"
    shutil.copytree(pristine, inputs, symlinks=True)
    config = valid_config(rng, inputs)
    case = Case([], inputs, case_dir / "out", case_dir / "PWNED")
    cfg_path = inputs / "c.yaml"
    broken_text = out_trick = False
    overrides: list[str] = []
    flags = ["--quiet"]
    count = rng.choice([1, 1, 1, 2, 3]) if mutations < 0 else mutations
    for _ in range(count):
        kind = rng.choice(KINDS)
        if kind == "value":
            case.log.append(mutate_value(rng, config, inputs))
        elif kind == "text":
            broken_text = True
        elif kind == "override":
            overrides.append(rng.choice(OVERRIDES))
            case.log.append(f"override {overrides[-1]!r}")
        elif kind == "adapter":
            name = rng.choice(_used(config, inputs, "adapter") or ADAPTERS)
            case.log.append(mutate_adapter_config(rng, inputs / name / "adapter_config.json"))
        elif kind == "safetensors":
            case.log.append(mutate_safetensors(rng, _weights_file(rng, inputs, config)))
        else:
            out_trick = True
    case.protected = _protected(config, inputs, overrides)
    if out_trick:  # last, so that it aims at what the mutated config reads
        case.out, extra = mutate_out(rng, case_dir, case.protected, case.log)
        flags += extra
    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    if broken_text:  # after the value mutations, which edit the config before it is written
        text, what = mutate_yaml(rng, text, case.canary)
        case.log.append(what)
    cfg_path.write_bytes(text if isinstance(text, bytes) else text.encode())
    flags += ["--dry-run"] if rng.random() < 0.05 else []
    command = "validate" if rng.random() < 0.08 else "merge"
    out = [str(case.out)] if command == "merge" else []
    case.argv = [command, str(cfg_path), *out, *overrides, *(flags if out else [])]
    return case


def _protected(config: dict, inputs: Path, overrides: list[str]) -> list[Path]:
    """The config file and every pristine input that the config names (absolute or relative)."""
    named: set[Path] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            node = [
                v
                for k, v in node.items()
                if not (k == "base_model" and "base_model=null" in overrides)
            ]
        if isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str) and node.strip() and len(node) < 200:
            named.add((inputs / Path(node).expanduser()).resolve())

    walk(config)
    return [inputs / "c.yaml"] + [p for p in sorted(inputs.iterdir()) if p.resolve() in named]


def _used(config: dict, inputs: Path, kind: str) -> list[str]:
    """The names of the pristine inputs of ``kind`` that the (valid) config merges."""
    models = config.get("models") if isinstance(config.get("models"), list) else []
    paths = [m.get(kind) for m in models if isinstance(m, dict)]
    return [p.name for p in inputs.iterdir() if str(p) in paths]


def _weights_file(rng: random.Random, inputs: Path, config: dict) -> Path:
    """A weights file the config reads: an adapter's, the full fine-tune's or the base's."""
    base = Path(str(config.get("base_model"))).name
    names = _used(config, inputs, "adapter") * 2 + _used(config, inputs, "model") + [base]
    name = rng.choice([n for n in names if (inputs / n).is_dir()] or ["base"])
    if name in ("base", "ft"):
        return inputs / name / "model.safetensors"
    if name == "sharded":
        return rng.choice(sorted((inputs / name).glob("model*")))
    return inputs / name / "adapter_model.safetensors"


def mutate_value(rng: random.Random, config: dict, inputs: Path) -> str:
    """Delete, retype, add or perturb one value somewhere in the config tree."""
    path, parent, key = _pick(rng, config)
    op = rng.choice("delete hostile hostile number unknown wrap path method".split())
    if op == "method":
        names = "tie STAR ştar fisher_merging mats localize_stitch regmean".split()
        config["method"] = rng.choice([*names, "", *METHODS])
        return f"method -> {config['method']!r}"
    if op == "delete":
        del parent[key]
        return f"deleted {path}"
    if op == "unknown":
        target = parent[key] if isinstance(parent[key], dict) else config
        target[rng.choice(["outptu", "weights", "ëxtra", "x" * 300])] = 1
        return f"unknown key under {path if target is not config else 'top level'}"
    old = parent[key]
    if op == "number":
        parent[key] = rng.choice(
            [-1, 0, 1e308, -1e308, float("nan"), float("inf"), 10**400, 1e-320, True, "40", "1e3"]
        )
    elif op == "wrap":
        parent[key] = [old] if rng.random() < 0.5 else {"value": old}
    elif op == "path":
        parent[key] = rng.choice(_odd_paths(inputs))
    else:
        parent[key] = rng.choice(HOSTILE)
    return f"{path}: {brief(old)} -> {brief(parent[key])}"


def _pick(rng: random.Random, config: dict) -> tuple[str, dict | list, object]:
    """A random (path, parent, key) in the config tree."""
    spots: list[tuple[str, object, object]] = []

    def walk(node: object, where: str) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in list(items):
            spots.append((f"{where}.{k}".lstrip("."), node, k))
            if isinstance(v, (dict, list)):
                walk(v, f"{where}.{k}")

    walk(config, "")
    return rng.choice(spots)


def _odd_paths(inputs: Path) -> list[str]:
    near = ["nope", "c.yaml", "base", "ft", "plain", "plain/adapter_model.safetensors", "sharded"]
    odd = "plain ./base ~/nope / /dev/null someone/not-here".split()
    return [*(str(inputs / n) for n in near), str(inputs), str(inputs / "plain") + "/", *odd, " "]


def mutate_out(rng: random.Random, case_dir: Path, protected: list[Path], log: list[str]):
    """An output directory that is an input, holds one, lies inside one, or is otherwise odd."""
    op = rng.choice("input input holder inside symlink nonempty file long toolong empty".split())
    overwrite = ["--overwrite"] if rng.random() < 0.7 else []
    target = rng.choice(protected)
    what = f"{op} {target.name}" if op in ("input", "inside", "symlink") else op
    log.append(f"OUT_DIR: {what}{' --overwrite' if overwrite else ''}")
    if op == "input":
        return target, overwrite
    if op == "holder":
        return target.parent, overwrite
    if op == "inside":
        return target / "merged", overwrite
    if op == "symlink":
        (case_dir / "link").symlink_to(target)
        return case_dir / "link", overwrite
    out = case_dir / {"long": "o" * 250, "toolong": "o" * 300}.get(op, "out")
    if op in ("nonempty", "empty"):
        out.mkdir()
        if op == "nonempty":
            (out / "keep.txt").write_text("mine")
    elif op == "file":
        out.write_text("a file")
    return out, overwrite
