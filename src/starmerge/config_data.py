"""The ``data:`` section of a merge config: task data for the data-driven methods.

:func:`parse_data` validates the section into a :class:`DataSpec`; :func:`data_checks` says when
a method (with its parameters) needs the section and a base model. Both append to the caller's
list of problems, so ``starmerge.config.parse_config`` still reports every error at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starmerge.errors import StarmergeError, did_you_mean, short_repr

DATA_KEYS = (
    "tasks", "n_examples", "seed", "batch_size", "max_length", "memory_budget", "cache_dir",
)  # fmt: skip


@dataclass(frozen=True)
class DataSpec:
    """Task data for data-driven methods (statistics, trained masks); see docs/data_methods.md.

    Args:
        tasks: One task file (or built-in task name) per model, in ``models`` order.
        n_examples: Examples drawn per task (seeded; overrides the task's ``sampling.n``).
        seed: Sampling seed (overrides the task's ``sampling.seed``).
        batch_size: Examples per forward/backward pass.
        max_length: Tokens per example (the prompt is cut from the left).
        memory_budget: Bytes the statistics accumulators may take at once (``"4GB"``); the data
            is re-run once per group of layers that fits.
        cache_dir: Where statistics are cached (default ``~/.cache/starmerge/stats``).
    """

    tasks: tuple[str, ...]
    n_examples: int = 64
    seed: int = 0
    batch_size: int = 8
    max_length: int = 512
    memory_budget: str = "4GB"
    cache_dir: str | None = None


def parse_data(raw: Any, n_models: int, problems: list[str]) -> DataSpec | None:
    """Validate the ``data:`` mapping (None when absent), appending each problem to ``problems``.

    Args:
        raw: The section as parsed YAML, or None.
        n_models: How many ``models`` the config lists (one task file each).
        problems: Collects every problem found.

    Returns:
        The section, or None when it is absent or unusable.

    Example:
        >>> parse_data({"tasks": ["news.yaml"]}, 1, []).n_examples
        64
    """
    if raw is None:
        return None
    if not isinstance(raw, dict):
        problems.append(
            f"data must be a mapping with keys {', '.join(DATA_KEYS)}, got {short_repr(raw)}"
        )
        return None
    problems.extend(
        f"unknown key {short_repr(key)} in data.{did_you_mean(str(key), DATA_KEYS)} "
        f"Allowed: {', '.join(DATA_KEYS)}"
        for key in raw
        if key not in DATA_KEYS
    )
    tasks = raw.get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, str) and t for t in tasks):
        problems.append(
            f"data.tasks must be a list of task files, one per model, got {short_repr(tasks)}"
        )
        return None
    if len(tasks) != n_models:
        problems.append(
            f"data.tasks must name one task file per model ({n_models}), got {len(tasks)}"
        )
    ints = {"n_examples": 64, "seed": 0, "batch_size": 8, "max_length": 512}
    values = {k: raw.get(k, d) for k, d in ints.items()}
    for key, value in values.items():
        low = 0 if key == "seed" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            problems.append(f"data.{key} must be an integer >= {low}, got {short_repr(value)}")
    budget = str(raw.get("memory_budget", "4GB"))
    try:
        from starmerge.io.writer import parse_size

        parse_size(budget)
    except StarmergeError as exc:
        problems.append(f"data.memory_budget: {exc}")
    cache = raw.get("cache_dir")
    if cache is not None and not isinstance(cache, str):
        problems.append(f"data.cache_dir must be a path, got {short_repr(cache)}")
    return DataSpec(tuple(tasks), **values, memory_budget=budget, cache_dir=cache)


def data_checks(
    method: str | None,
    params: Mapping[str, Any],
    data: DataSpec | None,
    base: str | None,
    problems: list[str],
) -> None:
    """A method whose ``data(params)`` asks for data needs a `data:` section and a base model.

    Precomputed ``parameters.statistics`` replace the section (the plan checks the files).
    """
    from starmerge.methods import METHODS

    if method not in METHODS or params.get("statistics") is not None:
        return
    spec = METHODS.get(method)
    values = {k: params.get(k, p.default) for k, p in spec.all_params.items()}  # if unresolved
    try:
        request = spec.data(values) if spec.data is not None else None
    except (KeyError, TypeError):  # invalid parameters are reported by the method check
        return
    if request is None:
        return
    if data is None:
        problems.append(
            f"{method} needs task data ({request.reason}): add a `data:` section "
            "(tasks: one task file per model, n_examples: N) or set parameters.statistics"
        )
    elif base is None:
        problems.append(f"{method} collects statistics on the base model; add base_model")
