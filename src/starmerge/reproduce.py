"""Reproduce the STAR paper's tables: lower bound, upper bound, and each method, per task set.

``starmerge reproduce flan-t5-large`` evaluates the base model (lower bound) and every task's
own model (upper bound) on each task, merges each seed table's task set with every method (the
seed's hyperparameters are the methods' defaults: STAR eta=40, TIES density 0.2 with global trim,
TALL-masks lambda=alpha=0.4, MetaGPT, simple averaging), evaluates the merges, and writes one
results file and one Markdown table per task set, in the seed README's layout with the seed's
own numbers beside ours. Everything goes through the sweep machinery: results are stored per job
under ``OUT/jobs`` and a re-run (or a later sweep into the same directory) reuses them. The
data-driven methods (``--methods mats,fisher_merging,regmean``) collect their statistics from each
task's training rows (``starmerge.sweep.data``), cached across runs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from starmerge.errors import ConfigError
from starmerge.suites import Suite, load_suite
from starmerge.sweep.collate import ordered_tasks, seed_markdown
from starmerge.sweep.jobs import DataOptions, Job, RunOptions, Runtime, bound_jobs, merge_job
from starmerge.sweep.run import Echo, Outcome, execute, set_name, write_results
from starmerge.sweep.store import ResultsStore

#: The seed paper's methods (simple averaging: the row its README dropped in b5c06311).
DEFAULT_METHODS = ("simple_average", "ties", "tall_masks", "metagpt", "star")
NOTE = (
    "Cells: ours (seed README). Scores x100; STS-B is Spearman x100. The seed's numbers were "
    "measured with its evaluation bugs (docs/reproducing.md lists them and their effect), so "
    "differences are expected where a fix applies."
)


def task_sets(suite: Suite, tasks: Sequence[str] | None) -> list[list[str]]:
    """The task sets to merge: ``tasks`` when given, else every seed table's (else all)."""
    if tasks:
        unknown = [t for t in tasks if t not in suite.tasks]
        if unknown:
            for t in unknown:
                suite.task(t)  # raises with a did-you-mean
        return [ordered_tasks(suite, list(dict.fromkeys(tasks)))]
    sets = [list(t.tasks) for t in suite.seed_tables]
    return sets or [list(suite.tasks)]


def reproduce_jobs(
    suite: Suite,
    sets: Sequence[Sequence[str]],
    methods: Sequence[str] = DEFAULT_METHODS,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    data: DataOptions | None = None,
) -> list[Job]:
    """Bounds on every task used, plus each method on each set (of two or more tasks).

    Data-driven methods (``mats``, ``fisher_merging``, ``regmean``, ``localize_stitch`` with
    ``mode: trained``) draw ``data`` (default :class:`DataOptions`) from each task's training rows.
    """
    params = params or {}
    unknown = [m for m in params if m not in methods]
    if unknown:
        raise ConfigError([f"parameters given for method(s) {unknown} that are not run"])
    used = ordered_tasks(suite, [t for s in sets for t in s])
    merges = [
        merge_job(m, params.get(m, {}), s, data) for s in sets if len(s) >= 2 for m in methods
    ]
    return bound_jobs(used) + merges


def reproduce(
    suite_ref: str | Path,
    out_dir: str | Path,
    *,
    tasks: Sequence[str] | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    options: RunOptions | None = None,
    data: DataOptions | None = None,
    runtime: Runtime | None = None,
    executor: str = "local",
    address: str | None = None,
    gpus_per_job: float | None = None,
    dry_run: bool = False,
    echo: Echo = print,
) -> Outcome:
    """Run a suite's reproduction into ``out_dir`` and write its tables.

    Args:
        suite_ref: A built-in suite name (``flan-t5-large``) or a suite file.
        out_dir: Results directory (``jobs/``, ``results/``, one ``<suite>-<set>.md`` per set).
        tasks: One task set to run instead of the seed tables' sets.
        methods: Merge methods (registry names).
        params: Per-method parameter overrides (``{"star": {"eta": 20}}``).
        options: Options that change results (dtype, full_keys, limit); default: the suite's.
        data: Training examples per task for the data-driven methods (default: 32, seed 0).
        runtime: Device, batch size, data mirror; default: ``Runtime()``.
        executor: ``local`` or ``ray``.
        address: Ray cluster address.
        gpus_per_job: Ray GPUs per job.
        dry_run: Only describe the jobs, models, datasets, memory and downloads.
        echo: Where progress and tables are printed.

    Returns:
        What ran and what was written.

    Example:
        >>> out = reproduce("flan-t5-large", "results/flan", dry_run=True)  # doctest: +SKIP
    """
    suite = load_suite(suite_ref)
    sets = task_sets(suite, tasks)
    jobs = reproduce_jobs(suite, sets, methods, params, data)
    out_dir = Path(out_dir)
    store = ResultsStore(out_dir)
    options = options or RunOptions()
    outcome = execute(
        suite,
        jobs,
        options,
        runtime or Runtime(),
        store,
        executor=executor,
        address=address,
        gpus_per_job=gpus_per_job,
        dry_run=dry_run,
        echo=echo,
    )
    if dry_run:
        return outcome
    written = write_results(suite, sets, outcome.jobs, store, options, out_dir, methods)
    for name, (path, data) in written.items():
        seed = next((t for t in suite.seed_tables if t.name == name), None)
        text = f"# {suite.name}: {name} ({len(data['tasks'])} tasks)\n\n"
        text += seed_markdown(data, seed) + "\n\n" + (NOTE if seed else "Scores x100.") + "\n"
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{suite.name}-{set_name(suite, data['tasks'])}")
        table = out_dir / f"{stem}.md"
        table.write_text(text)
        outcome.results[name], outcome.tables[name], outcome.data[name] = path, table, data
        echo(text)
        echo(f"results: {path}\ntable: {table}")
    return outcome
