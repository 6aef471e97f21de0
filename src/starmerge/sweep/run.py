"""Execute keyed jobs (local or Ray), then write results files and tables per task set.

Shared by ``starmerge sweep`` and ``starmerge reproduce``: both are a list of jobs over one
suite; the results store under ``OUT/jobs`` is shared, so a reproduction after a sweep (or a
second sweep) reuses every job already done.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starmerge.errors import ConfigError
from starmerge.suites import Suite
from starmerge.suites.models import DTYPES, FULL_KEYS
from starmerge.sweep.collate import build_results, summary_markdown, summary_rows
from starmerge.sweep.config import Sweep
from starmerge.sweep.executors import EXECUTORS, Keyed, keyed, pending, run_local, run_ray
from starmerge.sweep.jobs import Job, RunOptions, Runtime
from starmerge.sweep.plan import describe
from starmerge.sweep.store import ResultsStore
from starmerge.sweep.workbench import Workbench

Echo = Callable[[str], None]


@dataclass
class Outcome:
    """What a sweep or reproduction did and wrote."""

    jobs: list[Keyed]
    ran: list[str]
    results: dict[str, Path] = field(default_factory=dict)  # task-set name -> results file
    tables: dict[str, Path] = field(default_factory=dict)
    data: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> results JSON
    model_loads: int = 0
    cache: dict[str, int] = field(default_factory=dict)  # local executor: what was computed


def _progress(echo: Echo) -> Callable[[int, int, dict[str, Any]], None]:
    def done(i: int, total: int, record: dict[str, Any]) -> None:
        job = Job.from_dict(record["job"])
        scores = ", ".join(f"{t} {r['score']:.3f}" for t, r in record["results"].items())
        echo(f"[{i}/{total}] {job.label}: {scores} ({record['wall_s']:.1f} s)")

    return done


def execute(
    suite: Suite,
    jobs: Sequence[Job],
    options: RunOptions,
    runtime: Runtime,
    store: ResultsStore,
    *,
    executor: str = "local",
    address: str | None = None,
    gpus_per_job: float | None = None,
    dry_run: bool = False,
    echo: Echo = print,
) -> Outcome:
    """Run the jobs that have no result yet (or describe them with ``dry_run``)."""
    if executor not in EXECUTORS:
        raise ConfigError([f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}"])
    _check_options(options)
    all_jobs = keyed(suite, jobs, options)
    todo = pending(store, all_jobs)
    if dry_run:
        done = {k for k, _ in all_jobs if store.has(k)}
        echo(describe(suite, all_jobs, done, options, runtime))
        return Outcome(all_jobs, [])
    echo(f"{len(all_jobs)} jobs, {len(all_jobs) - len(todo)} already done, {len(todo)} to run")
    on_done = _progress(echo) if runtime.progress else None
    outcome = Outcome(all_jobs, [k for k, _ in todo])
    bench = Workbench(suite, options, runtime)  # loads nothing until a job runs
    bench.data.check([job for _, job in todo])  # training data of data jobs: fail before any job
    if todo and executor == "local":
        run_local(suite, todo, options, runtime, store, workbench=bench, on_done=on_done)
        outcome.model_loads = bench.model_loads
        outcome.cache = {
            "task_vectors": bench.vector_loads,
            "task_transforms": bench.transforms,
            "statistics_computed": bench.data.computed,
            "statistics_reused": bench.data.reused,
        }
    elif todo:
        run_ray(
            suite,
            todo,
            options,
            runtime,
            store,
            address=address,
            gpus_per_job=gpus_per_job,
            on_done=on_done,
        )
    return outcome


def _check_options(options: RunOptions) -> None:
    problems = []
    if options.dtype is not None and options.dtype not in DTYPES:
        problems.append(f"dtype must be one of {', '.join(DTYPES)}, got {options.dtype!r}")
    if options.full_keys not in FULL_KEYS:
        problems.append(
            f"full_keys must be one of {', '.join(FULL_KEYS)}, got {options.full_keys!r}"
        )
    if options.limit is not None and (not isinstance(options.limit, int) or options.limit < 1):
        problems.append(f"limit must be a positive integer, got {options.limit!r}")
    if problems:
        raise ConfigError(problems)


def set_name(suite: Suite, tasks: Sequence[str]) -> str:
    """A seed table's name for its task set, else ``<n>-tasks-<hash>``; file-name safe."""
    for table in suite.seed_tables:
        if set(table.tasks) == set(tasks):
            return table.name
    if set(tasks) == set(suite.tasks):
        return f"all-{len(tasks)}"
    digest = hashlib.sha256(",".join(sorted(tasks)).encode()).hexdigest()[:8]
    return f"{len(tasks)}-tasks-{digest}"


def write_results(
    suite: Suite,
    task_sets: Sequence[Sequence[str]],
    jobs: Sequence[Keyed],
    store: ResultsStore,
    options: RunOptions,
    out_dir: Path,
    methods: Sequence[str] = (),
) -> dict[str, tuple[Path, dict[str, Any]]]:
    """One results file per task set (jobs without a result are left out).

    Merge rows come in the order of ``methods``.
    """
    pairs = [(job, store.get(key)) for key, job in jobs if store.has(key)]
    written = {}
    for tasks in task_sets:
        name = set_name(suite, tasks)
        res = build_results(suite, tasks, pairs, options, methods)
        if not res.tasks:  # nothing finished for this set yet
            continue
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{suite.name}-{name}")
        path = res.write(out_dir / "results", stem)
        written[name] = (path, res.to_json())
    return written


def run_sweep(
    sweep: Sweep,
    out_dir: str | Path,
    runtime: Runtime | None = None,
    *,
    executor: str = "local",
    address: str | None = None,
    gpus_per_job: float | None = None,
    dry_run: bool = False,
    echo: Echo = print,
) -> Outcome:
    """Run a sweep into ``out_dir`` (resuming), then write results files and ``summary.md``.

    Example:
        >>> from starmerge.sweep import load_sweep, run_sweep
        >>> outcome = run_sweep(load_sweep("sweep.yaml"), "results/sweep")  # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    store = ResultsStore(out_dir)
    outcome = execute(
        sweep.suite,
        sweep.jobs,
        sweep.options,
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
    methods = list(sweep.source.get("methods") or {})
    written = write_results(
        sweep.suite, sweep.task_sets, outcome.jobs, store, sweep.options, out_dir, methods
    )
    outcome.results = {name: path for name, (path, _) in written.items()}
    outcome.data = {name: data for name, (_, data) in written.items()}
    rows = summary_rows(list(outcome.data.values()))
    summary = out_dir / "summary.md"
    summary.write_text("# Sweep summary\n\n" + summary_markdown(rows) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    outcome.tables["summary"] = summary
    echo(summary_markdown(rows))
    echo(f"results: {out_dir / 'results'}; summary: {summary}")
    return outcome
