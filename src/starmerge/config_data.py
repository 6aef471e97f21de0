"""The ``data:`` section of a merge config: task data for the data-driven methods.

:func:`parse_data` validates the section into a :class:`DataSpec` (through
:func:`starmerge.schema.parse_section`); :func:`data_checks` says when a method (with its
parameters) needs the section and a base model. Both append to the caller's list of problems,
so ``starmerge.config.parse_config`` still reports every error at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from starmerge.io.output_dir import parse_size
from starmerge.methods import METHODS
from starmerge.schema import count, option, parse_section


def size_check(value: str | int) -> None:
    """A ``schema.option`` check for a byte size (``"5GB"``); raises ``InputError`` when bad."""
    parse_size(value)


def _task_files(tasks: tuple[str, ...]) -> str | None:
    return None if all(tasks) else "must name a task file in every entry"


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

    tasks: tuple[str, ...] = option(check=_task_files, expect="a list of task files, one per model")
    n_examples: int = count(64, 1)
    seed: int = count(0, 0)
    batch_size: int = count(8, 1)
    max_length: int = count(512, 1)
    memory_budget: str | int = option("4GB", check=size_check, expect="a size such as 4GB")
    cache_dir: str | None = option(None, expect="a path")


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
    data = parse_section(DataSpec, raw, "data", problems)
    if data is None:
        return None
    if len(data.tasks) != n_models:
        problems.append(
            f"data.tasks must name one task file per model ({n_models}), got {len(data.tasks)}"
        )
    return replace(data, memory_budget=str(data.memory_budget))


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
