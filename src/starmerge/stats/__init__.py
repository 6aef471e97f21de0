"""Statistics from task data for the data-driven methods (MaTS, Fisher, RegMean, L&S masks).

One pipeline: each caller describes a task as a :class:`TaskSource` (how to run its model, and
what identifies the result) and :func:`gather_statistics` returns its cache entry, reused or
written (``collect_statistics`` with model-agnostic hooks, or ``train_masks`` for
Localize-and-Stitch), keyed by one recipe (:func:`entry_fields`). ``plan_statistics(plan)`` is
the engine's data step (the sources of a merge config's ``data:`` section); entries are read
back through :class:`starmerge.io.statistics.StatsFile`.
Nothing here imports ``transformers`` until the HF wrappers (``stats.hf``) are used.
"""

from starmerge.stats.collect import ByteCounter, collect_statistics
from starmerge.stats.gather import Entry, gather_statistics
from starmerge.stats.plan_data import plan_statistics
from starmerge.stats.source import TaskSource, entry_fields

__all__ = [
    "ByteCounter",
    "Entry",
    "TaskSource",
    "collect_statistics",
    "entry_fields",
    "gather_statistics",
    "plan_statistics",
]
