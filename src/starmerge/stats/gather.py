"""The data step's one pipeline: each task's statistics entry, found in the cache or written.

:func:`gather_statistics` is what ``starmerge merge`` (``starmerge.stats.plan_data``),
``starmerge reproduce``/``sweep`` (``starmerge.sweep.data``) and the demo
(``starmerge.demo.statistics``) call with the method's request (``method.data(params)``) and one
:class:`~starmerge.stats.source.TaskSource` per task. For each task it computes the cache key
(:func:`~starmerge.stats.source.entry_fields`, hashed by
:func:`~starmerge.stats.cache.cache_key`), reuses the entry when it exists, and otherwise
collects the request's statistic kinds on the task's model (:func:`collect_into`) and/or trains
its Localize-and-Stitch masks from the base model
(:func:`~starmerge.stats.masks_entry.train_into`), writing the entry with the same ``meta`` for
every caller: the key's fields, the caller's description, the number of examples, the
normalisation, and the cost (``seconds``, ``peak_bytes``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from starmerge.methods.contract import DataRequest
from starmerge.stats import hf
from starmerge.stats.cache import StatsWriter, cache_key, entry_path
from starmerge.stats.collect import ByteCounter, collect_statistics
from starmerge.stats.masks_entry import train_into
from starmerge.stats.source import TaskSource, entry_fields

NORMALISATION = (
    "example loss = loss_kind's (starmerge.stats.hf: mean cross-entropy over its answer tokens); "
    "fisher = mean over examples of the squared per-example gradient; gram_in/gram_out = sum "
    "over non-pad tokens / their count"
)


@dataclass(frozen=True)
class Entry:
    """One task's statistics entry.

    Args:
        path: The entry directory (read it with :class:`starmerge.io.statistics.StatsFile`).
        key: Its cache key (the directory's name).
        computed: Collected or trained by this call (False: found in the cache).
        seconds: What writing it took (0 when it was found in the cache).
        peak_bytes: The largest memory it took to write (0 when found in the cache).
    """

    path: Path
    key: str
    computed: bool
    seconds: float = 0.0
    peak_bytes: int = 0


def gather_statistics(
    request: DataRequest,
    sources: Iterable[TaskSource],
    cache_dir: Path | str,
    *,
    budget: int | None = None,
    budget_name: str = "data.memory_budget",
    progress: bool = False,
) -> list[Entry]:
    """Each task's statistics entry for ``request`` (reused from ``cache_dir`` or written there).

    Args:
        request: What the method's ``data(params)`` asks for (statistic kinds, mask settings).
        sources: One per task, in task order (built lazily: a generator is consumed one
            task at a time).
        cache_dir: The statistics cache root.
        budget: Bytes the accumulators of one module group may take (None: no limit).
        budget_name: What errors call the budget (``data.memory_budget``, ``--stats-memory``).
        progress: Show progress bars.

    Returns:
        The entries, in task order.

    Raises:
        StarmergeError: One module's statistics alone exceed ``budget``.

    Example:
        >>> (entry,) = gather_statistics(DataRequest(("gram_in",)), [source], tmp)  # doctest: +SKIP
        >>> entry.computed
        True
    """
    entries = []
    for source in sources:
        fields = entry_fields(request, source)
        key = cache_key(fields)
        found = entry_path(Path(cache_dir), key)
        if found is not None:
            entries.append(Entry(found, key, computed=False))
            continue
        n = sum(len(b["input_ids"]) for b in source.batches)
        meta = {**source.meta, **fields, "n": n, "normalisation": NORMALISATION}
        start = time.perf_counter()
        with StatsWriter(Path(cache_dir), key, meta) as writer:
            peak = 0
            if request.kinds:
                counter = ByteCounter()
                with source.task_model() as model:
                    collect_into(
                        writer,
                        model,
                        source,
                        request,
                        budget=budget,
                        budget_name=budget_name,
                        progress=progress,
                        counter=counter,
                    )
                peak = counter.peak
            if request.masks is not None:
                peak = max(peak, train_into(writer, writer.meta, source, request))
            seconds = round(time.perf_counter() - start, 3)
            writer.meta.update(seconds=seconds, peak_bytes=peak)
        entries.append(Entry(writer.final, key, True, seconds, peak))
    return entries


def linear_modules(keys: Iterable[str], model: nn.Module) -> list[str]:
    """The ``nn.Linear`` modules whose weights are among ``keys``, in the model's order."""
    wanted = set(keys)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and f"{name}.weight" in wanted
    ]


def collect_into(
    sink: Callable[[dict[str, Tensor]], None],
    model: nn.Module,
    source: TaskSource,
    request: DataRequest,
    *,
    budget: int | None = None,
    budget_name: str = "data.memory_budget",
    progress: bool = False,
    counter: ByteCounter | None = None,
) -> None:
    """Collect ``request.kinds`` on the task's model over its batches and hand them to ``sink``.

    The modules are the ``nn.Linear`` ones among ``source.shapes``. The output embedding
    (``lm_head``) gets no output-gradient Gram (vocabulary^2), as in MaTS.

    Args:
        sink: Receives each finished group of statistics (a :class:`StatsWriter`).
        model: The task's model (from ``source.task_model()``).
        source: The task (batches, loss, model kind, parameters).
        request: The statistic kinds and Fisher labels.
        budget: Bytes the accumulators of one group may take.
        budget_name: What errors call the budget.
        progress: Show a progress bar.
        counter: Tracks the accumulators' bytes (its ``peak`` is the entry's cost).
    """
    modules = linear_modules(source.shapes, model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = [n for n in modules if head is not None and model.get_submodule(n) is head]
    groups: list[tuple[Sequence[str], set[str]]] = [
        ([n for n in modules if n not in heads], set(request.kinds))
    ]
    if heads:
        groups.append((heads, set(request.kinds) - {"gram_out"} or {"gram_in"}))
    loss_fn, mask_fn = source.make_loss(request.fisher), hf.make_mask_fn(source.model_kind)
    for names, kinds in groups:
        if names:
            collect_statistics(
                model,
                source.batches,
                loss_fn,
                names,
                kinds,
                mask_fn=mask_fn,
                memory_budget=budget,
                budget_name=budget_name,
                sink=sink,
                counter=counter,
                progress=progress,
            )
