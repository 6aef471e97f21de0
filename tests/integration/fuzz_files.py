"""Fuzz mutations of input files: merge configs' YAML, adapter configs, safetensors files.

Each mutator takes a ``random.Random`` and a file, changes the file in place and returns a short
description of what it did, which the fuzz test prints when a case fails. A safetensors file is
an 8-byte little-endian header length N, N bytes of JSON header, then the tensor data.
"""

from __future__ import annotations

import json
import math
import random
import struct
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

NAN, INF = math.nan, math.inf
# Values a hostile user may put anywhere (JSON or YAML): wrong types, extremes, odd text.
_SCALARS = [None, True, False, 0, -1, 1, 2.5, 1e308, NAN, INF, -INF, 10**30]
HOSTILE = [*_SCALARS, "8", "", "x", "ŝtår-ṁërgé 🚀", "a" * 5000, [8], [], {}, ["q_proj"]]
# adapter_config.json fields with values PEFT users write, valid or not.
ADAPTER_FIELDS = {
    "r": [1, 2, 8, 64, 0, -4, 4.0, 4.5, "4", 10**9],
    "lora_alpha": [8, 16.0, 0, -8, "8", None, [8], NAN, INF, 1e308, True],
    "target_modules": [["q_proj"], "q_proj", ".*q_proj", "all-linear", [], None, ["nope"]],
    "rank_pattern": [{"q_proj": 2}, {"q_proj": "x"}, ["q_proj"], {"q_proj": 0}, "q_proj"]
    + [{"q_proj": 100}, {"model.layers.0.self_attn.q_proj": 2}, {"q_proj": 2.5}],
    "alpha_pattern": [{"q_proj": 32}, {"q_proj": "x"}, ["q_proj"], {"q_proj": NAN}, "q_proj"]
    + [{"v_proj": -8}, {"v_proj": 1e308}],
    "use_rslora": [True, "yes", 1, None],
    "fan_in_fan_out": [True, "true", 1],
    "peft_type": ["LORA", "lora", "LOHA", "IA3", None, 5, "PROMPT_TUNING"],
    "bias": ["all", "lora_only", "none", None],
    "modules_to_save": [["lm_head"], "lm_head", []],
    "use_dora": [True, 1],
    "init_lora_weights": ["pissa", "gaussian", "olora", False, "eva"],
    "base_model_name_or_path": ["someone/other-model", "", None, 5],
    "layers_to_transform": [[0], 0, [5], "x"],
    "layers_pattern": ["layers", ["layers"], 5],
    "lora_dropout": [0.1, -1, "x"],
    "task_type": ["SEQ_CLS", None, "x"],
    "use_magic": [True],
    "magic_config": [{"a": 1}],
}
FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
ALL_DTYPES = [*"F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL F8_E4M3 F8_E5M2 C64 XYZ".split(), "", 5]


def mutate_adapter_config(rng: random.Random, path: Path) -> str:
    """Change one field of ``adapter_config.json`` (set, retype, delete) or break the file."""
    roll = rng.random()
    try:
        config = json.loads(path.read_text())
    except (ValueError, RecursionError):  # an earlier mutation broke the file already
        config, roll = None, 0.0
    if not isinstance(config, dict):
        roll = 0.0
    if roll < 0.12:
        return _corrupt_text(rng, path)
    field = rng.choice(sorted(ADAPTER_FIELDS))
    if roll < 0.22:
        config.pop(field, None)
        what = f"deleted {field}"
    else:
        pool = ADAPTER_FIELDS[field] if rng.random() < 0.75 else HOSTILE
        config[field] = rng.choice(pool)
        what = f"{field}={brief(config[field])}"
    path.write_text(json.dumps(config))  # NaN/Infinity as Python's json writes (and PEFT reads)
    return f"{path.parent.name}/{path.name}: {what}"


def _corrupt_text(rng: random.Random, path: Path) -> str:
    data = path.read_bytes()
    kind = rng.choice(["truncate", "not json", "list", "latin-1", "empty", "deep", "bom"])
    new = {
        "truncate": data[: rng.randrange(len(data) + 1)],
        "not json": b"r: 4\nlora_alpha: 8\n",
        "list": b"[" + data + b"]",
        "latin-1": data.replace(b'"LORA"', '"LORA\u00e9"'.encode("latin-1")),
        "empty": b"",
        "deep": b"[" * 100_000 + b"]" * 100_000,
        "bom": b"\xef\xbb\xbf" + data,
    }[kind]
    path.write_bytes(new)
    return f"{path.parent.name}/{path.name}: {kind}"


def mutate_safetensors(rng: random.Random, path: Path) -> str:
    """Corrupt a safetensors file (length prefix, JSON header, data) or a shard index."""
    ops = [_prefix, _header_bytes, _header_json, _truncate, _data_flip, _nonfinite, _huge]
    op = rng.choice([*ops, _retype, _empty, _append])
    op = _index if path.name.endswith(".index.json") else op
    try:
        what = op(rng, path)
    except Exception:  # noqa: BLE001 - an earlier mutation broke the file; break it further
        what = _append(rng, path)
    return f"{path.parent.name}/{path.name}: {what}"


def _index(rng: random.Random, path: Path) -> str:
    """Point a ``weight_map`` entry of a shard index elsewhere (outside, missing) or break it."""
    index = json.loads(path.read_text())
    key = rng.choice(sorted(index["weight_map"]))
    outside = ["../plain/adapter_model.safetensors", "/etc/passwd", "../../../../../etc/hostname"]
    odd = ["missing.safetensors", "model-00001-of-00002.safetensors", ".", "", 5, None]
    roll = rng.random()
    if roll < 0.15:
        index["weight_map"] = new = rng.choice([[key], None, "x"])
    elif roll < 0.3:
        new = index["weight_map"].pop(key) and "removed"
    else:
        index["weight_map"][key] = new = rng.choice(outside + odd)
    path.write_text(json.dumps(index))
    return f"weight_map[{key!r}] -> {brief(new)}"


def _split(path: Path) -> tuple[int, bytes, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, raw[8 : 8 + n], raw[8 + n :]


def _prefix(rng: random.Random, path: Path) -> str:
    n, header, data = _split(path)
    if rng.random() < 0.5:
        raw = bytearray(path.read_bytes())
        bit = rng.randrange(64)
        raw[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(raw))
        return f"flipped bit {bit} of the header length"
    size = len(header) + len(data) + 8
    new = rng.choice([0, 1, 2, n - 1, n + 1, size, 2**63, 2**64 - 1, 100_000_001])
    path.write_bytes(struct.pack("<Q", new) + header + data)
    return f"header length {n} -> {new}"


def _header_bytes(rng: random.Random, path: Path) -> str:
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    where = [8 + rng.randrange(n) for _ in range(rng.randint(1, 3))]
    for i in where:
        raw[i] = rng.randrange(256)
    path.write_bytes(bytes(raw))
    return f"random bytes at header offsets {where}"


def _header_json(rng: random.Random, path: Path) -> str:
    _, header, data = _split(path)
    meta = json.loads(header)
    name = rng.choice([k for k in meta if k != "__metadata__"])
    entry = meta[name]
    field = rng.choice(["dtype", "shape", "data_offsets", "delete", "metadata", "rename"])
    if field == "dtype":
        entry["dtype"] = rng.choice(ALL_DTYPES)
    elif field == "shape":
        entry["shape"] = rng.choice([[], [0], [-1, 4], [2**40, 2], entry["shape"][::-1], ["4"]])
    elif field == "data_offsets":
        a, b = entry["data_offsets"]
        entry["data_offsets"] = rng.choice(
            [[b, a], [a, b + 4], [a + 4, b + 4], [-4, b], [0, 0], [a, 2**62], [a], "x"]
        )
    elif field == "delete":
        del meta[name]
    elif field == "metadata":
        meta["__metadata__"] = rng.choice([{"format": 5}, [1], "pt", {"x": {"y": 1}}])
    else:
        meta[rng.choice(["../../escape", "", "x" * 5000, name + ".lora_C.weight"])] = entry
        del meta[name]
    new = json.dumps(meta).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + data)
    return f"header of {name}: {field} -> {brief(meta.get(name, 'removed'))}"


def _truncate(rng: random.Random, path: Path) -> str:
    raw = path.read_bytes()
    cut = rng.randrange(len(raw) + 1)
    path.write_bytes(raw[:cut])
    return f"truncated to {cut} of {len(raw)} bytes"


def _append(rng: random.Random, path: Path) -> str:
    path.write_bytes(path.read_bytes() + bytes(rng.randrange(256) for _ in range(17)))
    return "17 bytes appended"


def _data_flip(rng: random.Random, path: Path) -> str:
    n, header, data = _split(path)
    raw = bytearray(data)
    where = [rng.randrange(len(raw)) for _ in range(rng.randint(1, 8))]
    for i in where:
        raw[i] ^= 1 << rng.randrange(8)
    path.write_bytes(struct.pack("<Q", n) + header + bytes(raw))
    return f"flipped data bits at {where}"


def _float_entry(rng: random.Random, path: Path) -> tuple[str, dict, int]:
    n, header, _ = _split(path)
    meta = json.loads(header)
    names = [k for k, v in meta.items() if k != "__metadata__" and v["dtype"] in FLOAT_DTYPES]
    name = rng.choice(sorted(names))
    return name, meta[name], 8 + n


def _nonfinite(rng: random.Random, path: Path) -> str:
    name, entry, start = _float_entry(rng, path)
    value = rng.choice([NAN, INF, -INF])
    dtype = FLOAT_DTYPES[entry["dtype"]]
    count = (entry["data_offsets"][1] - entry["data_offsets"][0]) // np.dtype(dtype).itemsize
    offset = start + entry["data_offsets"][0] + rng.randrange(count) * np.dtype(dtype).itemsize
    raw = bytearray(path.read_bytes())
    raw[offset : offset + np.dtype(dtype).itemsize] = np.array([value], dtype=dtype).tobytes()
    path.write_bytes(bytes(raw))
    return f"{value} written into {name}"


def _huge(rng: random.Random, path: Path) -> str:
    """Finite entries whose merge overflows float32 (or a float16/bfloat16 output)."""
    name, entry, start = _float_entry(rng, path)
    dtype = FLOAT_DTYPES[entry["dtype"]]
    value = rng.choice([3e38, -3e38, 1e30, 7e4]) if dtype != np.float16 else 6e4
    a, b = entry["data_offsets"]
    raw = bytearray(path.read_bytes())
    raw[start + a : start + b] = np.full(
        (b - a) // np.dtype(dtype).itemsize, value, dtype
    ).tobytes()
    path.write_bytes(bytes(raw))
    return f"every entry of {name} set to {value}"


def _retype(rng: random.Random, path: Path) -> str:
    dtype = getattr(torch, rng.choice("int32 int64 int8 bool float16 bfloat16 float64".split()))
    tensors = load_file(path)
    name = rng.choice(sorted(tensors))
    tensors[name] = (tensors[name] * 10).to(dtype)
    save_file(tensors, path, metadata={"format": "pt"})
    return f"{name} stored as {dtype}"


def _empty(rng: random.Random, path: Path) -> str:
    tensors = load_file(path)
    keep = {} if rng.random() < 0.5 else {k: v for k, v in tensors.items() if "lora_A" in k}
    save_file(keep, path, metadata={"format": "pt"})
    return "no tensors" if not keep else "only the lora_A factors"


def mutate_yaml(rng: random.Random, text: str, canary: Path) -> tuple[str | bytes, str]:
    """Break a config's YAML text: duplicate keys, bad bytes, tags, deep nesting, small bombs.

    Returns the new text and what was done; a ``!!python`` tag would create ``canary``.
    """
    op = rng.choice("duplicate latin-1 truncate flip tag tab deep bomb bom document".split())
    return _yaml_op(rng, text, canary, op), f"YAML text: {op}"


def _yaml_op(rng: random.Random, text: str, canary: Path, op: str) -> str | bytes:
    if op == "duplicate":
        return text + rng.choice(["method: ties\n", "output: {format: model}\n", "models: []\n"])
    if op == "latin-1":
        return ("# modèle\n" + text).encode("latin-1", errors="replace")
    if op == "truncate":
        return text[: rng.randrange(len(text))]
    if op == "flip":
        raw = bytearray(text.encode())
        for _ in range(rng.randint(1, 3)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw)
    if op == "tag":
        bad = f"!!python/object/apply:os.system ['touch {canary}']"
        return text.replace("method: ", f"method: {bad}\n_was: ", 1)
    if op == "tab":
        return text.replace("  ", "\t", 1)
    if op == "deep":
        depth = rng.choice([200, 3000])
        return text + "deep: " + "[" * depth + "1" + "]" * depth + "\n"
    if op == "bomb":  # small enough to expand in-process; the big one runs in a subprocess
        return alias_bomb(text, levels=rng.randint(2, 4), key=rng.choice(["parameters", "models"]))
    if op == "bom":
        return "\ufeff" + text
    return text + "---\nmethod: star\n"


def alias_bomb(text: str, levels: int, key: str) -> str:
    """``text`` with ``key`` replaced by a billion-laughs alias chain of ``levels`` levels."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    kept = yaml.safe_load(text) if isinstance(text, str) else {}
    kept = {k: v for k, v in (kept or {}).items() if k != key}
    body = yaml.safe_dump(kept, sort_keys=False)
    return "\n".join(lines) + f"\n{body}{key}: *a{levels}\n"


def brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
