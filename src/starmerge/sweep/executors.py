"""Executors: run the pending jobs of a sweep locally (one process) or as Ray tasks.

Both run the same :class:`~starmerge.sweep.workbench.Workbench` code on the same jobs, and both
leave writing to the driver: each finished job's record is put in the results store as soon as
it arrives, so an interrupted sweep keeps everything that finished. Jobs whose key is already in
the store are never run again.

``local`` keeps one base model in memory for the whole sweep. ``ray`` submits one Ray task per
job with ``num_gpus``/``num_cpus`` declared; each Ray worker process keeps its own workbench
(base model, task vectors, STAR factors) across the tasks it is given, because Ray reuses worker
processes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from starmerge.errors import StarmergeError
from starmerge.suites import Suite, load_suite
from starmerge.sweep.jobs import Job, RunOptions, Runtime, job_key
from starmerge.sweep.store import ResultsStore
from starmerge.sweep.workbench import Workbench

Keyed = tuple[str, Job]
OnDone = Callable[[int, int, dict[str, Any]], None]
EXECUTORS = ("local", "ray")
_KIND_ORDER = {"base": 0, "individual": 1, "merge": 2}


def keyed(suite: Suite, jobs: Sequence[Job], options: RunOptions) -> list[Keyed]:
    """``(key, job)`` for every job, duplicates (same key) dropped, cache-friendly order.

    Bounds first, then merges grouped by method and parameters (so one ``eta`` of STAR runs
    over all its task sets while its per-task factors are cached).
    """
    seen: dict[str, Job] = {}
    for job in jobs:
        seen.setdefault(job_key(suite, job, options), job)

    def order(item: Keyed) -> tuple[Any, ...]:
        job = item[1]
        params = json.dumps(dict(job.params), sort_keys=True, default=str)
        return (_KIND_ORDER[job.kind], job.method or "", params, len(job.tasks), job.tasks)

    return sorted(seen.items(), key=order)


def pending(store: ResultsStore, jobs: Sequence[Keyed]) -> list[Keyed]:
    """The jobs that have no result in ``store`` yet."""
    return [(key, job) for key, job in jobs if not store.has(key)]


def run_local(
    suite: Suite,
    jobs: Sequence[Keyed],
    options: RunOptions,
    runtime: Runtime,
    store: ResultsStore,
    *,
    workbench: Workbench | None = None,
    on_done: OnDone | None = None,
) -> Workbench:
    """Run ``jobs`` one after the other in this process; return the workbench used."""
    bench = workbench or Workbench(suite, options, runtime)
    for i, (key, job) in enumerate(jobs):
        record = bench.run(job, key)
        store.put(record)
        if on_done is not None:
            on_done(i + 1, len(jobs), record)
    return bench


_BENCHES: dict[str, Workbench] = {}  # one per Ray worker process and configuration


def _ray_job(
    suite_ref: str, options: dict[str, Any], runtime: dict[str, Any], job: dict[str, Any], key: str
) -> dict[str, Any]:
    """A Ray task: run one job in this worker's (cached) workbench and return its record."""
    bench_key = json.dumps([suite_ref, options, runtime], sort_keys=True)
    if bench_key not in _BENCHES:
        suite = load_suite(suite_ref)
        _BENCHES[bench_key] = Workbench(suite, RunOptions(**options), Runtime(**runtime))
    return _BENCHES[bench_key].run(Job.from_dict(job), key)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise StarmergeError(
            "--executor ray needs the ray package; pip install 'starmerge[ray]' (or pip install "
            "ray), or use --executor local"
        ) from None
    return ray


def run_ray(
    suite: Suite,
    jobs: Sequence[Keyed],
    options: RunOptions,
    runtime: Runtime,
    store: ResultsStore,
    *,
    address: str | None = None,
    gpus_per_job: float | None = None,
    cpus_per_job: float = 1,
    on_done: OnDone | None = None,
) -> None:
    """Run ``jobs`` as Ray tasks; the driver writes each record as it arrives.

    Args:
        suite: The suite (workers load it from its file).
        jobs: ``(key, job)`` pairs to run.
        options: Options that change results.
        runtime: Device, batch size, data mirror, statistics cache (relative paths are made
            absolute).
        store: Where the driver writes the records.
        address: The Ray cluster (``auto``, ``ray://host:10001``); None starts a local Ray
            unless one is already initialised in this process.
        gpus_per_job: GPUs declared per task; None: 1 when the cluster has GPUs and the device
            is not ``cpu``, else 0.
        cpus_per_job: CPUs declared per task.
        on_done: Called with (finished, total, record) after each record is written.
    """
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, log_to_driver=False)
    try:
        if gpus_per_job is None:
            has_gpu = ray.cluster_resources().get("GPU", 0) > 0
            gpus_per_job = 1 if has_gpu and runtime.device != "cpu" else 0
        data_dir = str(Path(runtime.data_dir).resolve()) if runtime.data_dir else None
        stats_dir = str(Path(runtime.stats_dir).resolve()) if runtime.stats_dir else None
        rt = {**asdict(runtime), "data_dir": data_dir, "stats_dir": stats_dir}
        task = ray.remote(_ray_job).options(num_gpus=gpus_per_job, num_cpus=cpus_per_job)
        refs = {
            task.remote(str(suite.path), asdict(options), rt, job.to_dict(), key): key
            for key, job in jobs
        }
        _collect(ray, refs, store, on_done)
    finally:
        if started:
            ray.shutdown()


def _collect(ray: Any, refs: dict[Any, str], store: ResultsStore, on_done: OnDone | None) -> None:
    total, done_count = len(refs), 0
    try:
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                refs.pop(ref)
                record = ray.get(ref)
                store.put(record)
                done_count += 1
                if on_done is not None:
                    on_done(done_count, total, record)
    finally:
        for ref in refs:  # a failure or an interrupt: stop what is still queued
            ray.cancel(ref, force=True)
