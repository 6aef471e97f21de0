"""The data step of ``starmerge merge``: each task's statistics from the config's ``data:`` section.

:func:`plan_statistics` is called by the engine before the fit step. When the method's
``data(params)`` asks for data (and the config gives no precomputed ``statistics``), each task
model becomes a :class:`~starmerge.stats.source.TaskSource` (:func:`plan_sources`):
``data.n_examples`` examples drawn from the task's file (seeded), tokenized with the base
model's tokenizer; the task's model is the fine-tune, or the base model with the adapter's
low-rank deltas run as forward hooks; the loss is the HF wrappers' (:mod:`starmerge.stats.hf`);
base and task model are identified by their weight files' sha256. The entries come from
:func:`~starmerge.stats.gather.gather_statistics` and go to the method's fit step (the
validated parameters are never rewritten).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from starmerge.errors import ConfigError
from starmerge.eval.tasks import load_task
from starmerge.io.output_dir import parse_size
from starmerge.methods.contract import STATISTICS, DataRequest
from starmerge.stats import hf
from starmerge.stats.cache import default_cache_dir
from starmerge.stats.gather import gather_statistics
from starmerge.stats.source import HF_LOSS, TaskSource, weights_identity


def plan_statistics(plan: Any, *, device: str = "cpu", progress: bool = False) -> list[Path] | None:
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
    cache_dir = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
    sources = plan_sources(plan, request, device)
    budget = parse_size(data.memory_budget)
    entries = gather_statistics(request, sources, cache_dir, budget=budget, progress=progress)
    return [e.path for e in entries]


def plan_sources(plan: Any, request: DataRequest, device: str = "cpu") -> Iterator[TaskSource]:
    """One source per task model of ``plan``, built as it is consumed (the base loads once).

    Example:
        >>> sources = list(plan_sources(plan, DataRequest(("gram_in",))))  # doctest: +SKIP
    """
    data = plan.config.data
    kind = hf.model_kind(plan.base_path)
    tokenizer = hf.load_tokenizer(plan.base_path)
    base_id = weights_identity(plan.base.files)
    loaded: dict[str, nn.Module] = {}

    def base_model() -> nn.Module:
        if "base" not in loaded:
            loaded["base"] = hf.load_model(plan.base_path, kind, device)
        return loaded["base"]

    for i, task in enumerate(plan.tasks):
        spec, examples = _examples(data, i)
        batches = hf.build_batches(
            tokenizer, kind, spec, examples, data.batch_size, data.max_length, data.seed
        )
        yield TaskSource(
            base=base_id,
            model=weights_identity(task.source.files),
            model_kind=kind,
            loss_kind=HF_LOSS,
            batches=batches,
            make_loss=lambda fisher: hf.make_loss_fn(kind, fisher),
            shapes=plan.shapes,
            task_model=_task_model(task, kind, device, base_model),
            base_model=base_model,
            tau=lambda key, task=task: task.source.get(key) if key in task.shapes else None,
            meta={"task": data.tasks[i], "model_source": task.spec.source},
        )


def _task_model(task: Any, kind: str, device: str, base_model: Any) -> Any:
    """The task's model: its fine-tune (loaded, freed after), or the base with adapter hooks."""

    @contextmanager
    def opened() -> Iterator[nn.Module]:
        if task.spec.kind == "model":
            yield hf.load_model(task.path, kind, device)
            return
        model = base_model()
        with hf.lowrank_deltas(model, {k: task.source.get(k) for k in task.shapes}):
            yield model

    return opened


def _examples(data: Any, i: int) -> tuple[Any, list[Any]]:
    """Task ``i``'s spec and its seeded sample of ``n_examples`` examples."""
    spec = load_task(data.tasks[i])
    sampling = dataclasses.replace(spec.sampling, n=data.n_examples, seed=data.seed)
    spec = dataclasses.replace(spec, sampling=sampling)
    return spec, spec.examples()
