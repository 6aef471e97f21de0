"""PEFT LoRA adapter directories as task deltas (``LowRank``), read lazily.

Per DESIGN.md: the delta of ``<module>.weight`` is ``scale * B @ A``, scale = alpha / r (alpha /
sqrt(r) with ``use_rslora``), r and alpha per module from ``rank_pattern``/``alpha_pattern`` as PEFT
matches them; keys drop ``base_model.model.``. Other features (DoRA, LoRA biases, embedding LoRA,
``modules_to_save``, variants, base-changing inits), unknown tensors, ranks and alphas PEFT would
not read as meant, non-floating factors and empty adapters are refused (``adapter_refusals.py``).
``target_modules``/``layers_to_transform`` need no handling: the modules come from the tensors.

``fan_in_fan_out``: PEFT transposes ``B @ A`` only for a GPT-2 ``Conv1D`` layer, whose weight is
stored (in, out), whatever the flag says (it resets the flag on ``nn.Linear`` and sets it on
``Conv1D``). The layer type is not in the files, so with a base model the base weight's shape
decides: stored (in, out) with in != out -> transposed, (out, in) -> not. A square module cannot
be told by shape: it follows the adapter's non-square modules (one model's adapted layers are all
``Conv1D`` or all ``nn.Linear``), and the flag only when the adapter has none (PEFT saves the
flag it corrected, so a PEFT-saved flag is right). Without a base model the flag decides.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from starmerge.errors import InputError, short_repr
from starmerge.io.adapter_refusals import check_numbers, refuse, refuse_config, refuse_tensors
from starmerge.io.checkpoint import TensorIndex
from starmerge.tensors.delta import LowRank
from starmerge.tensors.finite import FLOAT32_MAX, all_finite

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
# "<module>.lora_A.weight", or "<module>.lora_A.<adapter name>.weight" (older PEFT, raw state dicts)
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def pattern_key(patterns: Iterable[str], name: str) -> str | None:
    """The first of ``patterns`` that matches module ``name``, as PEFT's ``get_pattern_key``.

    A pattern matches when it is a regex for the whole name or for a suffix after a ``.``.

    Example:
        >>> pattern_key(["layers.1.self_attn.q_proj"], "model.layers.1.self_attn.q_proj")
        'layers.1.self_attn.q_proj'
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


@dataclass(frozen=True)
class _Module:
    a_key: str  # lora_A tensor, (r, in)
    b_key: str  # lora_B tensor, (out, r)
    shape: tuple[int, int]  # (out, in), PEFT's layout of B @ A
    rank: int
    scale: float


class LoraAdapter:
    """A PEFT LoRA adapter: one ``LowRank`` delta per adapted ``<module>.weight``.

    Built by :func:`load_adapter`; only headers are read until :meth:`get`.
    """

    def __init__(
        self,
        path: Path,
        config: dict[str, Any],
        index: TensorIndex,
        modules: dict[str, _Module],
        transposed: frozenset[str] = frozenset(),
    ):
        self.path = path
        self.config = config
        self._index = index
        self._modules = modules
        self.transposed = transposed  # keys whose B @ A is transposed to the base's (in, out)

    @property
    def base_model(self) -> str | None:
        """``base_model_name_or_path`` from the adapter config."""
        return self.config.get("base_model_name_or_path")

    @property
    def task_type(self) -> str | None:
        """PEFT ``task_type`` (e.g. ``"CAUSAL_LM"``), or ``None``."""
        return self.config.get("task_type")

    @property
    def fan_in_fan_out(self) -> bool:
        """The config's flag (what was applied per module is :attr:`transposed`)."""
        return bool(self.config.get("fan_in_fan_out", False))

    @property
    def files(self) -> list[Path]:
        """The adapter's weight files."""
        return self._index.files

    def keys(self) -> list[str]:
        """Parameter keys ``<module>.weight``, in file order."""
        return list(self._modules)

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Parameter key -> delta shape in the base weight's layout."""
        return {key: self._shape(key, m) for key, m in self._modules.items()}

    def get(self, key: str) -> LowRank:
        """Read the delta of parameter ``key``, with ``b @ a`` in the base weight's layout.

        Raises:
            KeyError: The adapter does not adapt ``key``.
            InputError: A factor holds NaN or Inf, or the file cannot be read.
        """
        m = self._module(key)
        a, b = self._read(m.a_key), self._read(m.b_key)
        if key in self.transposed:  # base stored (in, out): delta^T = (B A)^T = A^T B^T
            return LowRank(a.T, b.T, m.scale)
        return LowRank(b, a, m.scale)

    def check_finite(self) -> None:
        """Read every factor and raise ``InputError`` at the first NaN or Inf."""
        for m in self._modules.values():
            self._read(m.a_key)
            self._read(m.b_key)

    def __repr__(self) -> str:
        return f"LoraAdapter({str(self.path)!r}, {len(self._modules)} modules)"

    def _shape(self, key: str, m: _Module) -> tuple[int, int]:
        return (m.shape[1], m.shape[0]) if key in self.transposed else m.shape

    def _module(self, key: str) -> _Module:
        try:
            return self._modules[key]
        except KeyError:
            raise KeyError(f"adapter {self.path} does not adapt '{key}'") from None

    def _read(self, tensor_key: str) -> torch.Tensor:
        t = self._index.get(tensor_key)
        if not all_finite(t):
            raise InputError(
                f"adapter {self.path}: tensor '{tensor_key}' contains NaN or Inf values; "
                "re-train or re-export the adapter"
            )
        return t


def load_adapter(path: Path | str, base: TensorIndex | None = None) -> LoraAdapter:
    """Open the PEFT LoRA adapter in local directory ``path`` (headers only).

    Args:
        path: A directory with ``adapter_config.json`` and ``adapter_model.safetensors``
            (or ``adapter_model.bin``).
        base: The base model's index: its weight shapes decide which deltas are transposed
            (``fan_in_fan_out``, see the module docstring); without it the flag decides.

    Returns:
        The adapter.

    Raises:
        InputError: Files are missing or unreadable, ranks or alphas are not what PEFT reads,
            ranks disagree with the tensors, factors are not floating point, or the adapter
            adapts nothing.
        UnsupportedFeatureError: The adapter uses a feature starmerge does not implement.

    Example:
        >>> ad = load_adapter("adapters/news")  # doctest: +SKIP
        >>> ad.get("model.layers.0.self_attn.q_proj.weight").rank  # doctest: +SKIP
        8
    """
    path = Path(path)
    config = _read_config(path)
    refuse_config(config, path)
    check_numbers(config, path)
    weights = next((path / n for n in ADAPTER_WEIGHTS if (path / n).is_file()), None)
    if weights is None:
        raise InputError(
            f"adapter {path} has no adapter_model.safetensors or adapter_model.bin; "
            "save the adapter with PeftModel.save_pretrained"
        )
    index = TensorIndex.open(weights)
    modules = _modules(index, config, path)
    if not modules:
        raise InputError(
            f"adapter {path} adapts nothing: {weights.name} holds no lora_A/lora_B tensors; "
            "give an adapter saved after training (PeftModel.save_pretrained)"
        )
    flag = bool(config.get("fan_in_fan_out", False))
    transposed = _transposed({k: m.shape for k, m in modules.items()}, base, flag)
    return LoraAdapter(path, config, index, modules, transposed)


def _transposed(
    shapes: dict[str, tuple[int, int]], base: TensorIndex | None, flag: bool
) -> frozenset[str]:
    """The keys whose ``(out, in)`` delta goes to the base transposed, as PEFT decides it."""
    if base is None:
        return frozenset(shapes) if flag else frozenset()
    votes: dict[str, bool] = {}  # non-square modules: the base's layout shows the layer type
    for key, (out, inp) in shapes.items():
        stored = tuple(base.shape(key)) if key in base else None
        if out != inp and stored in ((inp, out), (out, inp)):
            votes[key] = stored == (inp, out)
    kinds = set(votes.values())
    square = kinds.pop() if len(kinds) == 1 else flag
    return frozenset(k for k in shapes if votes.get(k, square))


def _read_config(path: Path) -> dict[str, Any]:
    file = path / ADAPTER_CONFIG
    if not file.is_file():
        raise InputError(
            f"adapter {path} has no {ADAPTER_CONFIG}; give a PEFT adapter directory "
            "(saved with PeftModel.save_pretrained)"
        )
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise InputError(f"cannot read {file} ({e}); re-export the adapter") from None
    if not isinstance(config, dict):
        raise InputError(f"{file} holds {type(config).__name__}, not an object; re-export it")
    return config


def _modules(index: TensorIndex, config: dict[str, Any], path: Path) -> dict[str, _Module]:
    pairs: dict[str, dict[str, str]] = {}
    names: set[str | None] = set()
    matches = {key: _LORA_KEY.match(key.removeprefix(PREFIX)) for key in index.keys()}
    unknown = [key for key, m in matches.items() if m is None]
    if unknown:
        raise refuse_tensors(unknown, path)
    for key, m in matches.items():
        names.add(m["adapter"])
        pairs.setdefault(m["module"], {})[m["which"]] = key
    if len(names) > 1:
        raise InputError(
            f"adapter {path} holds several adapters ({sorted(map(str, names))}); "
            "save each adapter to its own directory"
        )
    return {f"{mod}.weight": _module(mod, ab, index, config, path) for mod, ab in pairs.items()}


def _module(
    module: str, ab: dict[str, str], index: TensorIndex, config: dict[str, Any], path: Path
) -> _Module:
    if set(ab) != {"A", "B"}:
        missing = "lora_B" if "A" in ab else "lora_A"
        raise InputError(f"adapter {path}: module '{module}' has no {missing}; re-export it")
    a_shape, b_shape = index.shape(ab["A"]), index.shape(ab["B"])
    if len(a_shape) != 2 or len(b_shape) != 2:
        raise refuse(path, f"conv LoRA (module '{module}', lora_A shape {a_shape})")
    for key in ab.values():
        if not index.dtype(key).is_floating_point:
            raise InputError(
                f"adapter {path}: LoRA factor '{key}' has dtype {index.dtype(key)}, not a "
                "floating-point type; re-export the adapter in float32, bfloat16 or float16"
            )
    r = _pattern_value(config, "rank_pattern", module, config.get("r", 8), path)
    alpha = _pattern_value(config, "alpha_pattern", module, config.get("lora_alpha", 8), path)
    if not (a_shape[0] == b_shape[1] == r) or r <= 0:
        raise InputError(
            f"adapter {path}: module '{module}' has r={r} in {ADAPTER_CONFIG} but lora_A "
            f"{a_shape} and lora_B {b_shape}; fix r/rank_pattern or re-export the adapter"
        )
    try:
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    except OverflowError:  # an int alpha beyond a float's range
        scale = math.inf
    if not scale <= FLOAT32_MAX:
        raise InputError(
            f"adapter {path}: module '{module}' has lora_alpha {short_repr(alpha)} and r {r}, "
            "a scale that overflows float32; fix lora_alpha (or alpha_pattern) in "
            f"{ADAPTER_CONFIG}"
        )
    return _Module(ab["A"], ab["B"], (b_shape[0], a_shape[1]), r, float(scale))


def _pattern_value(
    config: dict[str, Any], field: str, module: str, default: float, path: Path
) -> Any:
    patterns = config.get(field) or {}
    try:
        key = pattern_key(patterns, module)
    except re.error as e:
        raise InputError(
            f"adapter {path}: {field} has a key that is not a valid regex ({e}); fix {field}"
        ) from None
    return default if key is None else patterns[key]
