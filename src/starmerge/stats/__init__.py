"""Statistics from task data for the data-driven methods (MaTS, Fisher, RegMean, L&S masks).

``collect_statistics`` (model-agnostic hooks), ``train_masks`` (Localize-and-Stitch), the on-disk
cache, and ``prepare(plan)``, which the engine calls to fill a data method's ``statistics``.
Nothing here imports ``transformers`` until the HF wrappers (``stats.hf``) are used.
"""

from starmerge.stats.collect import ByteCounter, collect_statistics
from starmerge.stats.reader import StatsFile


def prepare(plan, *, device: str = "cpu", progress: bool = False):
    """Collect or reuse each task's statistics; see :func:`starmerge.stats.gather.prepare`."""
    from starmerge.stats.gather import prepare as _prepare

    return _prepare(plan, device=device, progress=progress)


__all__ = ["ByteCounter", "StatsFile", "collect_statistics", "prepare"]
