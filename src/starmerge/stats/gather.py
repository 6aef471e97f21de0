"""The fit step's data part: collect (or reuse) each task's statistics before the merge.

``prepare(plan)`` is called by the engine before the fit step. When the method's ``data(params)``
asks for data, for each task model it draws ``data.n_examples`` examples from the task's file,
runs the base model with that task's adapter (or the fine-tuned model) and collects the
statistics the request names (or trains Localize-and-Stitch masks), caching them by a hash of
the model files, the examples and the settings; it returns the per-task cache entries, which
the engine hands to the method's fit step (the validated parameters are never rewritten).

:func:`collect_into` and :func:`train_into` are the per-task steps; sweeps and reproductions over
the seed suites call them too (``starmerge.sweep.data``), with examples from each suite task's
training rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from starmerge.errors import ConfigError
from starmerge.methods.contract import STATISTICS, DataRequest
from starmerge.stats.cache import FORMAT, StatsWriter, cache_key, default_cache_dir, entry_path

NORMALISATION = (
    "example loss = mean cross-entropy over its answer tokens; fisher = mean over examples of the "
    "squared per-example gradient; gram_in/gram_out = sum over non-pad tokens / their count"
)


def prepare(plan: Any, *, device: str = "cpu", progress: bool = False) -> list[Path] | None:
    """Each task's statistics entry from the config's ``data:`` section (collected or cached).

    Args:
        plan: The merge plan (``starmerge.plan.Plan``).
        device: Where the models run.
        progress: Show progress bars.

    Returns:
        The per-task statistics entries, or None when the method asks for no data with these
        parameters or the config gives them (``parameters.statistics``).

    Raises:
        ConfigError: The method needs data but the config has no ``data:`` section.
        StarmergeError: A task file, its data or the tokenizer is missing.
    """
    request = plan.method.data(plan.params) if plan.method.data is not None else None
    if request is None or plan.params.get(STATISTICS) is not None:
        return None
    data = plan.config.data
    if data is None or plan.base_path is None:
        raise ConfigError([f"{plan.method.name} needs a `data:` section and base_model"])
    from starmerge.io.hashing import hash_files
    from starmerge.io.writer import parse_size
    from starmerge.stats import hf

    kind = hf.model_kind(plan.base_path)
    tokenizer = hf.load_tokenizer(plan.base_path)
    cache_dir = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
    base_hash = hash_files(plan.base.files)
    budget = parse_size(data.memory_budget)
    base_model: nn.Module | None = None
    paths = []
    for i, task in enumerate(plan.tasks):
        spec, examples = _examples(data, i)
        batches = hf.build_batches(tokenizer, kind, spec, examples, data.batch_size,
                                   data.max_length, data.seed)  # fmt: skip
        fields = _fields(plan, task, request, data, kind, base_hash, batches)
        key = cache_key(fields)
        found = entry_path(cache_dir, key)
        if found is not None:
            paths.append(found)
            continue
        meta = {**fields, "task": data.tasks[i], "model": task.spec.source,
                "n_examples": len(examples), "normalisation": NORMALISATION}  # fmt: skip
        if task.spec.kind == "model" and not request.masks:
            model = hf.load_model(task.path, kind, device)
        else:
            base_model = base_model or hf.load_model(plan.base_path, kind, device)
            model = base_model
        with StatsWriter(cache_dir, key, meta) as writer:
            if request.kinds:
                _collect(plan, task, model, batches, request, kind, budget, writer, progress)
            if request.masks:
                _train(plan, task, model, batches, request, kind, writer)
        paths.append(writer.final)
        del model  # a fine-tuned model is freed before the next one loads
    return paths


def _examples(data: Any, i: int) -> tuple[Any, list[Any]]:
    """Task ``i``'s spec and its seeded sample of ``n_examples`` examples."""
    from starmerge.eval.tasks import load_task

    spec = load_task(data.tasks[i])
    sampling = dataclasses.replace(spec.sampling, n=data.n_examples, seed=data.seed)
    spec = dataclasses.replace(spec, sampling=sampling)
    return spec, spec.examples()


def examples_digest(batches: list) -> str:
    """sha256 of the tokenized batches (input ids, attention masks, labels)."""
    digest = hashlib.sha256()
    for b in batches:
        for name in ("input_ids", "attention_mask", "labels"):
            digest.update(json.dumps(b[name].tolist()).encode())
    return digest.hexdigest()


def _fields(
    plan: Any, task: Any, request: DataRequest, data: Any, kind: str, base: dict, batches: list
) -> dict[str, Any]:
    """Everything the statistics depend on (hashed into the cache key)."""
    from starmerge.io.hashing import hash_files

    return {
        "format": FORMAT, "base": sorted(base.values()),
        "task_model": sorted(hash_files(task.source.files).values()),
        "task_kind": task.spec.kind, "examples": examples_digest(batches), "model_kind": kind,
        "kinds": sorted(request.kinds), "fisher": request.fisher,
        "masks": dict(request.masks) if request.masks else None,
        "parameters": hashlib.sha256("\n".join(plan.shapes).encode()).hexdigest(),
        "batch_size": data.batch_size, "max_length": data.max_length,
    }  # fmt: skip


def linear_modules(keys: Iterable[str], model: nn.Module) -> list[str]:
    """The ``nn.Linear`` modules whose weights are among ``keys``, in the order of ``keys``."""
    names = []
    for key in keys:
        name = key.removesuffix(".weight")
        if key.endswith(".weight") and isinstance(_get(model, name), nn.Linear):
            names.append(name)
    return names


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _collect(
    plan: Any, task: Any, model: nn.Module, batches: list, request: DataRequest, kind: str,
    budget: int, writer: StatsWriter, progress: bool,
) -> None:  # fmt: skip
    """Collect the statistics of one task model (base + adapter hooks, or the fine-tune)."""
    modules = linear_modules(plan.shapes, model)
    deltas = {}
    if task.spec.kind == "adapter":
        adapted = [k for k in task.shapes if k.removesuffix(".weight") in modules]
        deltas = {k: task.source.get(k) for k in adapted}
    collect_into(writer, model, batches, request, kind, modules, deltas=deltas, budget=budget,
                 progress=progress)  # fmt: skip


def collect_into(
    sink: Callable[[dict[str, Tensor]], None], model: nn.Module, batches: list,
    request: DataRequest, kind: str, modules: Sequence[str], *,
    deltas: Mapping[str, Any] | None = None, budget: int | None = None,
    budget_name: str = "data.memory_budget", progress: bool = False,
) -> None:  # fmt: skip
    """Collect ``request.kinds`` on ``modules`` of one task model and hand them to ``sink``.

    ``model`` is the task's model (the fine-tune, or the base with the task's weights added),
    or the base with ``deltas`` (``LowRank`` adapter factors) run as forward hooks. The output
    embedding (``lm_head``) gets no output-gradient Gram (vocabulary^2), as in MaTS.

    Args:
        sink: Receives each finished group of statistics (a :class:`StatsWriter`).
        model: An HF model of ``kind``.
        batches: From :func:`starmerge.stats.hf.build_batches`.
        request: The statistic kinds and Fisher variant.
        kind: ``causal_lm``, ``seq2seq`` or ``classifier``.
        modules: Linear module names, in the order to group them.
        deltas: Low-rank task deltas run as hooks (None: the model is the task model).
        budget: Bytes the accumulators of one group may take.
        budget_name: What errors call the budget (sweeps and reproductions: ``--stats-memory``).
        progress: Show a progress bar.

    Example:
        >>> collect_into(writer, model, batches, DataRequest(("gram_in",)), "seq2seq",
        ...              ["encoder.block.0.layer.0.SelfAttention.q"])  # doctest: +SKIP
    """
    from starmerge.stats import hf
    from starmerge.stats.collect import collect_statistics

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = [n for n in modules if head is not None and _get(model, n) is head]
    groups = [([n for n in modules if n not in heads], set(request.kinds))]
    if heads:
        groups.append((heads, set(request.kinds) - {"gram_out"} or {"gram_in"}))
    loss_fn, mask_fn = hf.make_loss_fn(kind, request.fisher), hf.make_mask_fn(kind)
    with hf.lowrank_deltas(model, deltas or {}):
        for names, kinds in groups:
            if names:
                collect_statistics(
                    model, batches, loss_fn, names, kinds, mask_fn=mask_fn,
                    memory_budget=budget, budget_name=budget_name, sink=sink, progress=progress,
                )  # fmt: skip


def _train(
    plan: Any, task: Any, model: nn.Module, batches: list, request: DataRequest, kind: str,
    writer: StatsWriter,
) -> None:  # fmt: skip
    """Train one task's Localize-and-Stitch masks on the base model and write them."""

    def tau(key: str) -> Any:
        return task.source.get(key) if key in task.shapes else None

    train_into(writer, model, batches, request, kind, plan.shapes, tau)


def train_into(
    writer: StatsWriter, model: nn.Module, batches: list, request: DataRequest, kind: str,
    shapes: Mapping[str, tuple[int, ...]], tau: Callable[[str], Any],
) -> None:  # fmt: skip
    """Train one task's Localize-and-Stitch masks on the base ``model`` into ``writer``.

    Args:
        writer: The cache entry being written (gets ``<key>::mask`` and ``mask_losses``).
        model: The pretrained (base) model, theta_0.
        batches: The task's batches.
        request: ``request.masks`` holds the training settings (and ``parameter_set``, which
            only keys the cache); ``request.covers`` says which keys are in P.
        kind: The model kind (for the loss).
        shapes: Every merged parameter key -> shape; masks cover those in P.
        tau: The task's delta of a key, or None where the task has none (a zero delta).
    """
    from starmerge.stats import hf
    from starmerge.stats.masks import train_masks

    settings = dict(request.masks or {})
    settings.pop("parameter_set", None)
    taus = {}
    for key, shape in shapes.items():
        if request.covers is None or request.covers(key):
            delta = tau(key)
            taus[key] = torch.zeros(shape) if delta is None else delta.to_dense(torch.float32)
    result = train_masks(model, taus, batches, hf.make_loss_fn(kind), **settings)
    writer({f"{k}::mask": m for k, m in result.masks.items()})
    writer.meta["mask_losses"] = result.losses
