"""Statistics from task data for the data-driven methods (MaTS, Fisher, RegMean, L&S masks).

``collect_statistics`` (model-agnostic hooks), ``train_masks`` (Localize-and-Stitch), the on-disk
cache, and ``prepare(plan)``, which the engine calls for the entries a method's ``data(params)``
asks for (read back through :class:`starmerge.io.statistics.StatsFile`).
Nothing here imports ``transformers`` until the HF wrappers (``stats.hf``) are used.
"""

from starmerge.stats.collect import ByteCounter, collect_statistics
from starmerge.stats.gather import prepare

__all__ = ["ByteCounter", "collect_statistics", "prepare"]
