"""``starmerge extract``: a LoRA adapter from a full fine-tune, one truncated SVD per module.

For each adapted module with weight ``W_base`` (out, in) and fine-tuned ``W_ft``, the task
vector ``D = W_ft - W_base`` has the SVD ``U diag(s) V^T``; the adapter keeps its ``k`` leading
triplets, ``lora_B = U_k diag(sqrt(s_k))`` and ``lora_A = diag(sqrt(s_k)) V_k^T`` (the scale
split evenly, as mergekit-extract-lora's ``--distribute-scale``), with ``lora_alpha = r`` so
PEFT's scaling is 1 and ``B A`` is the best rank-``k`` approximation of ``D`` (Eckart-Young).
``k`` is ``--rank R`` capped at ``min(out, in)``, or, with ``--energy e``, the smallest ``k``
with ``sum(s[:k]^2) >= e * sum(s^2)`` (capped by ``--max-rank``). The SVD runs in float32.

Targets, the flags for what a LoRA cannot hold (norms, biases, embeddings) and the manifest:
``docs/extract.md``. The checkpoints are read lazily, one parameter of each model at a time,
and only the factors are kept: the peak is a few times the largest matrix (its delta, ``U``,
``V^T``) on top of the adapter being built.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from starmerge.errors import InputError
from starmerge.io.checkpoint import TensorIndex
from starmerge.io.full import FullFineTune
from starmerge.io.hub import MODEL_PATTERNS, looks_like_hub_id, resolve
from starmerge.tensors.delta import LowRank
from starmerge.tensors.finite import all_finite

NonMatrix = Literal["refuse", "save", "skip"]
#: Module names (last component) that are embeddings or an LM head, never LoRA targets.
EMBEDDING_NAMES = frozenset({"wte", "wpe", "shared", "lm_head", "relative_attention_bias"})
#: ``model_type``s whose adapted layers are GPT-2 ``Conv1D`` (weights stored (in, out)).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt"})


@dataclass(frozen=True)
class ExtractOptions:
    """What ``starmerge extract`` was asked for (the CLI's flags).

    Args:
        rank: Fixed rank per module (``--rank``); exactly one of ``rank`` and ``energy``.
        energy: Fraction of ``sum(s^2)`` to keep per module, in (0, 1] (``--energy``).
        max_rank: Upper bound on the energy-chosen rank (``--max-rank``, energy only).
        target_modules: Module names (a full name or its last components, as PEFT matches
            ``target_modules``) to restrict the LoRA targets to; None: every 2-D weight.
        non_matrix: What to do with changed parameters a LoRA cannot hold.
        dtype: Of the stored factors; None: the fine-tune's most common float dtype.
        device: Where the SVDs run (``cpu`` or ``cuda``).
    """

    rank: int | None = None
    energy: float | None = None
    max_rank: int | None = None
    target_modules: tuple[str, ...] | None = None
    non_matrix: NonMatrix = "refuse"
    dtype: str | None = None
    device: str = "cpu"

    def check(self) -> None:
        """Refuse contradictory or out-of-range options (one error naming the flag).

        Raises:
            InputError: Not exactly one of rank/energy, a value out of range, or
                ``max_rank`` without ``energy``.
        """
        if (self.rank is None) == (self.energy is None):
            raise InputError(
                "give exactly one of --rank R (a fixed rank) and --energy E (the fraction of "
                f"each module's sum(s^2) to keep), got rank={self.rank}, energy={self.energy}"
            )
        if self.rank is not None and self.rank < 1:
            raise InputError(f"--rank must be a positive integer, got {self.rank!r}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise InputError(f"--energy must be in (0, 1], got {self.energy!r}; e.g. 0.9")
        if self.max_rank is not None and (self.energy is None or self.max_rank < 1):
            raise InputError(
                f"--max-rank (got {self.max_rank!r}) caps the rank that --energy chooses: give "
                "it as a positive integer together with --energy, or use --rank alone"
            )


def choose_rank(s: torch.Tensor, options: ExtractOptions) -> int:
    """How many leading singular values ``s`` (descending) to keep.

    ``options.rank`` (at most ``len(s)``), or the smallest ``k`` with ``sum(s[:k]^2) >=
    options.energy * sum(s^2)``, at most ``options.max_rank``.

    Example:
        >>> choose_rank(torch.tensor([4.0, 3.0, 2.0, 1.0]), ExtractOptions(energy=0.8))
        2
    """
    if options.rank is not None:
        return min(options.rank, s.numel())
    cum = torch.cumsum(s.cpu().to(torch.float64) ** 2, 0)  # tiny: on the CPU whatever the device
    k = min(int(torch.searchsorted(cum, options.energy * cum[-1])) + 1, s.numel())
    return k if options.max_rank is None else min(k, options.max_rank)


def extract_matrix(delta: torch.Tensor, options: ExtractOptions) -> tuple[LowRank, float]:
    """The truncated SVD of one matrix as ``LowRank`` factors, and the energy it keeps.

    Args:
        delta: ``(out, in)`` matrix, not all zero.
        options: How many singular triplets to keep (:func:`choose_rank`).

    Returns:
        ``LowRank(U_k sqrt(s_k), sqrt(s_k) V_k^T, 1.0)`` in float32 on ``delta``'s device, and
        ``sum(s[:k]^2) / sum(s^2)``.

    Example:
        >>> low, kept = extract_matrix(torch.diag(torch.tensor([3.0, 1.0])), ExtractOptions(rank=1))
        >>> low.rank, round(kept, 2)
        (1, 0.9)
    """
    u, s, vh = torch.linalg.svd(delta.to(torch.float32), full_matrices=False)
    k = choose_rank(s, options)
    sq = (s.to(torch.float64) ** 2).cpu()
    root = s[:k].sqrt()
    return LowRank(u[:, :k] * root, root[:, None] * vh[:k], 1.0), float(sq[:k].sum() / sq.sum())


@dataclass(frozen=True)
class Inputs:
    """The two checkpoints, opened lazily, and what their configs say about module types."""

    base_source: str
    base_path: Path
    ft_source: str
    ft_path: Path
    task: FullFineTune
    vocab_size: int | None
    fan_in_fan_out: bool
    task_type: str | None
    tied: bool

    def paths(self) -> list[tuple[str, Path]]:
        """Every input directory and weight file, labelled, for the output-overlap check."""
        base = [("base model", p) for p in (self.base_path, *self.task.base.files)]
        return base + [("fine-tuned model", p) for p in (self.ft_path, *self.task.files)]

    def default_dtype(self) -> torch.dtype:
        """The fine-tune's most common floating-point dtype (the factors' default dtype)."""
        floats = [self.task.ft.dtype(k) for k in self.task.keys()]
        return max(set(floats), key=floats.count) if floats else torch.float32

    def unchanged(self, key: str) -> bool:
        """Whether ``key`` is equal in both models, compared as stored (no float32 copies).

        Raises:
            InputError: Either tensor holds NaN or Inf.
        """
        ft, base = self.task.ft.get(key), self.task.base.get(key)
        for tensor, what in ((ft, f"model {self.ft_path}"), (base, f"base model {self.base_path}")):
            if not all_finite(tensor):
                raise InputError(
                    f"{what}: tensor '{key}' contains NaN or Inf values; give a checkpoint with "
                    "finite weights (re-export or re-train it)"
                )
        if ft.dtype != base.dtype:
            ft, base = ft.to(torch.float32), base.to(torch.float32)
        return torch.equal(ft, base)

    def base_name(self) -> str:
        """``base_model_name_or_path`` for the adapter: the Hub id, or the absolute path."""
        return self.base_source if looks_like_hub_id(self.base_source) else str(self.base_path)


def open_inputs(base: str, model: str) -> Inputs:
    """Resolve and index both checkpoints (headers only) and read the base's ``config.json``.

    Raises:
        InputError: A path does not exist, holds no weights, or the fine-tune has a parameter
            the base lacks or shapes that differ.
    """
    base_path = resolve(base, what="base model", allow_patterns=MODEL_PATTERNS)
    ft_path = resolve(model, what="fine-tuned model", allow_patterns=MODEL_PATTERNS)
    task = FullFineTune(TensorIndex.open(base_path), TensorIndex.open(ft_path), "fine-tuned")
    config = _model_config(base_path)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    vocab = config.get("vocab_size", text.get("vocab_size"))
    arch = (config.get("architectures") or [""])[0]
    causal = isinstance(arch, str) and arch.endswith(("ForCausalLM", "LMHeadModel"))
    return Inputs(
        base_source=base,
        base_path=base_path,
        ft_source=model,
        ft_path=ft_path,
        task=task,
        vocab_size=vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None,
        fan_in_fan_out=config.get("model_type") in CONV1D_MODEL_TYPES,
        task_type="CAUSAL_LM" if causal else None,
        tied=config.get("tie_word_embeddings") is True,
    )


def _model_config(path: Path) -> dict:
    """The base's ``config.json`` (an empty dict when there is none or it is unreadable)."""
    file = (path if path.is_dir() else path.parent) / "config.json"
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


@dataclass
class Layout:
    """Every floating-point parameter of the fine-tune, sorted by what extraction does with it.

    ``targets``: 2-D weights extracted as LoRA. ``other``: key -> why a LoRA cannot hold it
    (``not a 2-D matrix``, ``embedding``). ``excluded``: 2-D weights outside ``--target-modules``.
    """

    targets: list[str]
    other: dict[str, str]
    excluded: list[str]


def layout(inputs: Inputs, target_modules: tuple[str, ...] | None) -> Layout:
    """Sort the fine-tune's parameters into LoRA targets, others and excluded (headers only).

    Example:
        >>> layout(inputs, ("q_proj",)).targets[:1]  # doctest: +SKIP
        ['model.layers.0.self_attn.q_proj.weight']
    """
    out = Layout([], {}, [])
    for key, shape in inputs.task.shapes().items():
        module, _, leaf = key.rpartition(".")
        if leaf != "weight" or len(shape) != 2 or not module:
            out.other[key] = "not a 2-D matrix"
        elif _is_embedding(module, shape, inputs.vocab_size):
            out.other[key] = "embedding"
        elif target_modules is None or any(_matches(module, t) for t in target_modules):
            out.targets.append(key)
        else:
            out.excluded.append(key)
    return out


def _is_embedding(module: str, shape: tuple[int, ...], vocab_size: int | None) -> bool:
    name = module.rpartition(".")[2]
    # an output projection to (or an embedding of) the vocabulary: its leading dimension
    return name in EMBEDDING_NAMES or "embed" in name or shape[0] == vocab_size


def _matches(module: str, target: str) -> bool:
    """PEFT's ``target_modules`` rule for a list: the full name or a suffix after a dot."""
    return module == target or module.endswith("." + target)


def modules_to_save(inputs: Inputs, changed: dict[str, str]) -> dict[str, str]:
    """The modules that own the changed parameters, checked to be matched alone by PEFT.

    With tied embeddings (``tie_word_embeddings``) and no ``lm_head.weight`` stored, a saved
    input embedding is saved as ``lm_head`` too: PEFT copies each module, so it would untie them.

    Returns:
        Adapter module -> the fine-tune module whose parameters it holds (mostly itself).

    Raises:
        InputError: A parameter owned by no submodule, or a module whose name ends another
            module's name (PEFT's ``modules_to_save`` matches names by suffix).
    """
    saved = {m: m for m in sorted({key.rpartition(".")[0] for key in changed})}
    if "" in saved:
        raise InputError(
            f"parameters {[k for k in changed if '.' not in k]} belong to the model itself, not "
            "to a submodule, so PEFT's modules_to_save cannot hold them; pass --skip-non-matrix"
        )
    names = {k.rsplit(".", i)[0] for k in inputs.task.keys() for i in range(1, k.count(".") + 1)}
    for module in saved:
        clash = sorted(n for n in names if n != module and n.endswith(module))
        if clash:
            raise InputError(
                f"module {module} cannot go into modules_to_save: PEFT matches its name by "
                f"suffix, so it would also replace {clash[0]}; pass --skip-non-matrix instead"
            )
    shapes = inputs.task.shapes()
    vocab = [k for k in changed if changed[k] == "embedding" and shapes[k][0] == inputs.vocab_size]
    if inputs.tied and "lm_head.weight" not in shapes and len(vocab) == 1:
        saved["lm_head"] = vocab[0].rpartition(".")[0]
    return saved


def check_stored(modules: dict[str, LowRank], dtype: torch.dtype) -> None:
    """Refuse factors that are not finite in the stored ``dtype`` (float16 overflows at 65504).

    Raises:
        InputError: Naming the first such module and the fix.
    """
    for key, low in modules.items():
        if not (all_finite(low.b.to(dtype)) and all_finite(low.a.to(dtype))):
            raise InputError(
                f"the factors of {key} overflow {str(dtype).removeprefix('torch.')}; "
                "pass --dtype float32 (or bfloat16)"
            )
