"""Paths of a merge: the relative-path rule, and the inputs an output directory must avoid.

The one rule for paths in a config: a relative path starts at the config file's directory. It
holds for ``base_model``, ``models[].adapter`` / ``models[].model``, ``data.tasks``,
``data.cache_dir`` and ``parameters.statistics`` of merge configs, and for CLI overrides of them
(``models.0.adapter=...`` is relative to the config file too). A string that names no existing
path is kept as written: it may be a Hugging Face Hub id or a built-in task name. See
``docs/paths.md``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from starmerge.config import RunConfig
from starmerge.io.hub import local_path
from starmerge.methods.contract import STATISTICS


def with_absolute_paths(config: RunConfig, base_dir: Path | None) -> RunConfig:
    """``config`` with every local path made absolute, starting at ``base_dir``.

    Args:
        config: A validated config.
        base_dir: The config file's directory (the working directory when ``None``).

    Returns:
        The same config; paths that exist are absolute, Hub ids and names are kept.

    Example:
        >>> with_absolute_paths(cfg, Path("configs")).models[0].source  # doctest: +SKIP
        '/work/configs/adapters/a'
    """

    def local(ref: str) -> str:
        path = local_path(ref, base_dir)
        return ref if path is None else str(path)

    params = dict(config.parameters)
    if isinstance(params.get(STATISTICS), (list, tuple)):
        params[STATISTICS] = [local(p) if isinstance(p, str) else p for p in params[STATISTICS]]
    data = config.data
    if data is not None:
        cache = data.cache_dir  # an output location: made absolute whether or not it exists
        if cache is not None:
            cache = str((Path(base_dir or ".") / Path(cache).expanduser()).absolute())
        data = replace(data, tasks=tuple(local(t) for t in data.tasks), cache_dir=cache)
    return replace(
        config,
        parameters=params,
        base_model=None if config.base_model is None else local(config.base_model),
        models=tuple(replace(m, source=local(m.source)) for m in config.models),
        data=data,
    )
