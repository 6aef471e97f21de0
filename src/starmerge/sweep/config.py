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
from typing import Any

from starmerge.errors import ConfigError, StarmergeError, did_you_mean
from starmerge.suites import Suite, load_suite
from starmerge.sweep.jobs import DataOptions, Job, RunOptions, bound_jobs, merge_job
from starmerge.yaml_io import load_yaml

_TOP = ("suite", "methods", "tasks", "search", "bounds", "options", "data")
_TASKS = ("all", "sets", "sizes", "combinations", "pool", "seed")
_SEARCH = ("mode", "samples", "seed")
_OPTIONS = ("dtype", "full_keys", "limit")


@dataclass(frozen=True)
class Sweep:
    """A validated sweep: the suite, the jobs, and the options that key their results."""

    suite: Suite
    jobs: list[Job]
    options: RunOptions
    task_sets: list[tuple[str, ...]] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)


def _unknown(data: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> list[str]:
    return [
        f"unknown key {where}{k!r}.{did_you_mean(str(k), allowed)} Allowed: {', '.join(allowed)}"
        for k in data
        if k not in allowed
    ]


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


def _task_sets(suite: Suite, spec: Mapping[str, Any], problems: list[str]) -> list[tuple[str, ...]]:
    problems += _unknown(spec, _TASKS, "tasks.")
    pool = list(spec.get("pool") or suite.tasks)
    sets = [tuple(sorted(s)) for s in spec.get("sets") or []]
    if spec.get("all", not sets and not spec.get("sizes")):
        sets.append(tuple(sorted(pool)))
    sizes = list(spec.get("sizes") or [])
    too_big = [s for s in sizes if not 2 <= s <= len(pool)]
    if too_big:
        problems.append(f"tasks.sizes must be between 2 and {len(pool)} (the pool), got {too_big}")
    else:
        combos = int(spec.get("combinations", 5))
        sets += random_subsets(pool, sizes, combos, int(spec.get("seed", 0)))
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
            problems.append(f"methods.{name} must be a mapping of parameters, got {params!r}")
            continue
        axes = {k: v if isinstance(v, list) else [v] for k, v in params.items()}
        for values in itertools.product(*axes.values()):
            out.append((str(name), dict(zip(axes, values, strict=True))))
    return out


def _data(data: Mapping[str, Any], problems: list[str]) -> DataOptions:
    try:
        return DataOptions.from_mapping(data.get("data"))
    except ConfigError as err:
        problems += err.problems
        return DataOptions()


def _jobs(data: Mapping[str, Any], sets: list, grid: list, problems: list[str]) -> list[Job]:
    combos = [(m, p, s) for m, p in grid for s in sets]
    search = data.get("search") or {}
    problems += _unknown(search, _SEARCH, "search.")
    mode = search.get("mode", "grid")
    if mode == "random":
        n = int(search.get("samples", 10))
        combos = random.Random(int(search.get("seed", 0))).sample(combos, min(n, len(combos)))
    elif mode != "grid":
        problems.append(f"search.mode must be grid or random, got {mode!r}")
    jobs, options = [], _data(data, problems)
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
    problems = _unknown(data, _TOP, "")
    if not data.get("suite"):
        raise ConfigError([*problems, "missing 'suite' (a built-in suite name or a suite file)"])
    ref = str(data["suite"])
    suite = load_suite(base_dir / ref if (base_dir / ref).exists() else ref)
    methods = data.get("methods") or {}
    if not isinstance(methods, dict) or not methods:
        problems.append(
            "methods must map method names to parameter grids, e.g. {star: {eta: [20, 40]}}"
        )
        methods = {}
    sets = _task_sets(suite, data.get("tasks") or {}, problems)
    jobs = _jobs(data, sets, _method_grid(methods, problems), problems)
    opts = data.get("options") or {}
    problems += _unknown(opts, _OPTIONS, "options.")
    if problems:
        raise ConfigError(problems)
    options = RunOptions(**{k: opts[k] for k in _OPTIONS if k in opts})
    if data.get("bounds", True):
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
