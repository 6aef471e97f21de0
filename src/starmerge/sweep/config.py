"""Sweep files: methods x parameter grids x task subsets, expanded into jobs.

::

    suite: flan-t5-large          # a built-in suite, or a suite file
    methods:                      # method -> parameters; a list is a grid axis
      star: {eta: [20, 40, 60]}
      ties: {density: [0.1, 0.2]}
      simple_average: {}
    tasks:
      all: true                   # the full task set (default when nothing else is given)
      sets: [[mnli, qqp, sst2]]   # explicit task sets
      sizes: [6, 9, 10, 12]       # random subsets of each size ...
      combinations: 5             # ... this many per size (all of them when fewer exist)
      pool: [mnli, qqp, ...]      # draw from these (default: every task of the suite)
      seed: 0
    search: {mode: grid}          # grid: every combination; random: `samples` of them
    bounds: true                  # base + individual job of every task used
    options: {dtype: null, full_keys: qv, limit: null}
    data: {n_examples: 32, seed: 0, batch_size: 8, max_length: 512}   # data-driven methods only

Every problem is reported at once (:class:`~starmerge.errors.ConfigError`).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from starmerge.errors import ConfigError, StarmergeError, short_repr
from starmerge.schema import at_least, option, parse_section
from starmerge.suites import Suite, load_suite
from starmerge.sweep.jobs import DataOptions, Job, RunOptions, bound_jobs, merge_job
from starmerge.yaml_io import load_yaml


@dataclass(frozen=True)
class SweepKeys:
    """The top level of a sweep file as written (see the module docstring)."""

    suite: str = option(fix="name a built-in suite or a suite file")
    methods: dict[str, Any] = option(
        factory=dict, expect="a mapping of method names to parameter grids"
    )
    tasks: dict[str, Any] = option(factory=dict)
    search: dict[str, Any] = option(factory=dict)
    bounds: bool = True
    options: dict[str, Any] = option(factory=dict)
    data: dict[str, Any] | None = None


@dataclass(frozen=True)
class TaskSelection:
    """``tasks:``: the full task set, explicit sets, or random subsets of given sizes."""

    all: bool | None = None
    sets: list[list[str]] = option(factory=list)
    sizes: list[int] = option(factory=list)
    combinations: int = option(5, check=at_least(1))
    pool: list[str] | None = None
    seed: int = 0


@dataclass(frozen=True)
class Search:
    """``search:``: every combination (``grid``) or ``samples`` random ones."""

    mode: Literal["grid", "random"] = "grid"
    samples: int = option(10, check=at_least(1))
    seed: int = 0


@dataclass(frozen=True)
class Sweep:
    """A validated sweep: the suite, the jobs, and the options that key their results."""

    suite: Suite
    jobs: list[Job]
    options: RunOptions
    task_sets: list[tuple[str, ...]] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)


def random_subsets(
    pool: list[str], sizes: list[int], combinations: int, seed: int
) -> list[tuple[str, ...]]:
    """``combinations`` distinct random subsets of ``pool`` per size (all when fewer exist).

    Example:
        >>> random_subsets(["a", "b", "c"], [2], 5, 0)
        [('a', 'b'), ('a', 'c'), ('b', 'c')]
    """
    rng, out = random.Random(seed), []
    for size in sizes:
        if math.comb(len(pool), size) <= combinations:
            out += [tuple(c) for c in itertools.combinations(sorted(pool), size)]
            continue
        picked: set[tuple[str, ...]] = set()
        while len(picked) < combinations:
            picked.add(tuple(sorted(rng.sample(pool, size))))
        out += sorted(picked)
    return out


def _task_sets(suite: Suite, spec: TaskSelection, problems: list[str]) -> list[tuple[str, ...]]:
    pool = list(spec.pool or suite.tasks)
    sets = [tuple(sorted(s)) for s in spec.sets]
    if spec.all if spec.all is not None else not sets and not spec.sizes:
        sets.append(tuple(sorted(pool)))
    too_big = [s for s in spec.sizes if not 2 <= s <= len(pool)]
    if too_big:
        problems.append(f"tasks.sizes must be between 2 and {len(pool)} (the pool), got {too_big}")
    else:
        sets += random_subsets(pool, spec.sizes, spec.combinations, spec.seed)
    for s in sets:
        unknown = [t for t in s if t not in suite.tasks]
        if unknown:
            problems.append(
                f"unknown task(s) {unknown} in tasks; the suite has {list(suite.tasks)}"
            )
    return list(dict.fromkeys(sets))


def _method_grid(methods: Mapping[str, Any], problems: list[str]) -> list[tuple[str, dict]]:
    out = []
    for name, params in methods.items():
        params = params or {}
        if not isinstance(params, dict):
            problems.append(
                f"methods.{name} must be a mapping of parameters, got {short_repr(params)}"
            )
            continue
        axes = {k: v if isinstance(v, list) else [v] for k, v in params.items()}
        for values in itertools.product(*axes.values()):
            out.append((str(name), dict(zip(axes, values, strict=True))))
    return out


def _jobs(search: Search, combos: list, data: Any, problems: list[str]) -> list[Job]:
    if search.mode == "random":
        rng = random.Random(search.seed)
        combos = rng.sample(combos, min(search.samples, len(combos)))
    try:
        options = DataOptions.from_mapping(data)
    except ConfigError as err:
        problems += err.problems
        options = DataOptions()
    jobs = []
    for method, params, tasks in combos:
        try:
            jobs.append(merge_job(method, params, tasks, options))
        except StarmergeError as err:
            problems.append(str(err))
    return jobs


def sweep_from_dict(data: Mapping[str, Any], base_dir: Path = Path(".")) -> Sweep:
    """Validate a sweep mapping (the YAML content) and expand it into jobs.

    Raises:
        ConfigError: Every problem at once.
    """
    problems: list[str] = []
    keys = parse_section(SweepKeys, {k: v for k, v in data.items() if v is not None}, "", problems)
    if keys is None:
        raise ConfigError(problems)
    suite = load_suite(base_dir / keys.suite if (base_dir / keys.suite).exists() else keys.suite)
    if not keys.methods:
        problems.append(
            "methods must map method names to parameter grids, e.g. {star: {eta: [20, 40]}}"
        )
    selection = parse_section(TaskSelection, keys.tasks, "tasks", problems)
    sets = _task_sets(suite, selection, problems) if selection is not None else []
    grid = _method_grid(keys.methods, problems)
    search = parse_section(Search, keys.search, "search", problems)
    combos = [(m, p, s) for m, p in grid for s in sets]
    jobs = _jobs(search, combos, keys.data, problems) if search is not None else []
    options = parse_section(RunOptions, keys.options, "options", problems)
    if problems:
        raise ConfigError(problems)
    if keys.bounds:
        used = sorted({t for job in jobs for t in job.tasks})
        jobs = bound_jobs(used) + jobs
    return Sweep(suite, jobs, options, sets, dict(data))


def load_sweep(path: str | Path) -> Sweep:
    """Read and expand a sweep file (a relative ``suite:`` path starts at the file)."""
    path = Path(path)
    data = load_yaml(path, what="sweep file") or {}
    if not isinstance(data, dict):
        raise ConfigError(
            [
                f"{path}: a sweep file must be a mapping (suite:, methods:, ...), got a "
                f"{type(data).__name__}"
            ]
        )
    return sweep_from_dict(data, path.parent)
