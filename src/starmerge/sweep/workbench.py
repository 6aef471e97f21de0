"""Run jobs in one process: the base model is loaded once, task vectors and task transforms cached.

A :class:`Workbench` holds one loaded base model and its backend. For each job it builds the
deltas (none for ``base``; the task's own task vector for ``individual``; a merge otherwise),
adds them to the model's weights in place, evaluates, and restores the weights. Across the jobs
it runs, it keeps each task's examples and task vector, and, for a *separable* method (its
registry entry declares the merge as the mean or sum of a per-task transform: STAR, simple
averaging, task arithmetic), each task's transform per method and parameters: a merge of any
task set is then the combination of cached parts (exact in factor space for STAR), so an
``eta`` sweep over many task subsets does each task's spectral work once. Data-driven merges get
each task's statistics (or trained masks) from :class:`~starmerge.sweep.data.SuiteStatistics`,
cached on disk across jobs, runs and workers.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from starmerge.api import merge_deltas
from starmerge.eval.results import library_versions
from starmerge.methods import METHODS
from starmerge.pipeline import Part, combine_tasks, transform_task
from starmerge.suites import Suite
from starmerge.suites.data import build_examples, load_task_rows
from starmerge.suites.models import (
    apply_deltas,
    load_base,
    make_backend,
    resolve_device,
    task_vector,
)
from starmerge.suites.scoring import evaluate_suite_task
from starmerge.sweep.data import SuiteStatistics
from starmerge.sweep.jobs import SCHEMA, Job, RunOptions, Runtime, job_key
from starmerge.tensors.delta import Delta


def _slim(predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-example predictions without the prompt text (reproducible from the task file)."""
    return [{k: v for k, v in p.items() if k != "input"} for p in predictions]


_COST = ("seconds", "peak_bytes")  # cost fields of a statistics entry's meta


class Workbench:
    """One process's base model, caches and job runner.

    Args:
        suite: The suite.
        options: Options that change results (keyed).
        runtime: Device, batch size, data mirror.

    Example:
        >>> suite = load_suite("flan-t5-large")
        >>> bench = Workbench(suite, RunOptions(), Runtime())  # doctest: +SKIP
        >>> record = bench.run(merge_job("star", {"eta": 40}, ["mnli", "qqp"]))  # doctest: +SKIP
    """

    def __init__(self, suite: Suite, options: RunOptions, runtime: Runtime):
        self.suite = suite
        self.options = options.resolved(suite)
        self.runtime = runtime
        self.device = resolve_device(runtime.device)
        self.model_loads = 0
        self.vector_loads = 0  # task vectors read (once per task)
        self.transforms = 0  # per-task transforms (once per task, method and parameters)
        self._backend: Any = None
        self._examples: dict[str, tuple[Any, list[Any], dict[str, Any]]] = {}
        self._vectors: dict[str, dict[str, Delta]] = {}
        self._parts: dict[tuple[str, str, str], dict[str, Part]] = {}
        self.data = SuiteStatistics(suite, self.options, runtime)

    @property
    def backend(self) -> Any:
        """The evaluation backend around the base model (loaded on first use, once)."""
        if self._backend is None:
            model, tokenizer = load_base(self.suite, str(self.options.dtype), self.device)
            self.model_loads += 1
            batch = self.runtime.batch_size or self.suite.batch_size
            self._backend = make_backend(self.suite, model, tokenizer, batch)
        return self._backend

    def examples(self, task: str) -> tuple[Any, list[Any], dict[str, Any]]:
        """The task's spec, sampled examples and notes (cached)."""
        if task not in self._examples:
            spec = self.suite.task(task).spec()
            data_dir = Path(self.runtime.data_dir) if self.runtime.data_dir else None
            rows = load_task_rows(spec, data_dir)
            self._examples[task] = build_examples(spec, rows, self.options.limit)
        return self._examples[task]

    def task_vector(self, task: str) -> dict[str, Delta]:
        """The task's delta per parameter key (cached)."""
        if task not in self._vectors:
            self._vectors[task] = task_vector(
                self.suite, self.suite.task(task), self.options.full_keys
            )
            self.vector_loads += 1
        return self._vectors[task]

    def task_part(self, job: Job, index: int) -> dict[str, Part]:
        """A separable method's transform of task ``job.tasks[index]``.

        Cached per task, method and the task's own parameters (its entry of a per-task list).
        """
        method, n_tasks = METHODS.get(job.method or ""), len(job.tasks)
        assert method.separable is not None
        kernel = method.kernel_args(job.params)
        own = method.separable.task_params(method.name, kernel, index, n_tasks)
        key = (job.tasks[index], method.name, json.dumps(own, sort_keys=True, default=str))
        if key not in self._parts:
            vector = self.task_vector(job.tasks[index])
            self._parts[key] = transform_task(method, job.params, vector, index, n_tasks)
            self.transforms += 1
        return self._parts[key]

    def deltas(self, job: Job) -> tuple[dict[str, Delta], dict[str, Any]]:
        """The deltas a job applies to the base model, and merge statistics."""
        if job.kind == "base":
            return {}, {}
        if job.kind == "individual":
            return self.task_vector(job.tasks[0]), {}
        method = METHODS.get(job.method or "")
        if method.separable is not None and job.data is None:  # cached per-task parts
            parts = [self.task_part(job, i) for i in range(len(job.tasks))]
            merged, per_param = combine_tasks(method, job.params, parts)
            return merged, {"state": {}, "per_parameter": per_param}
        vectors = [self.task_vector(t) for t in job.tasks]
        if job.data is None:
            merged = merge_deltas(job.method or "", vectors, job.params, device=self.device)
            return merged.deltas, merged.stats
        by_task = dict(zip(job.tasks, vectors, strict=True))
        paths, used = self.data.entries(self.backend, job, by_task)
        params = {**job.params, "statistics": [str(p) for p in paths]}
        merged = merge_deltas(job.method or "", vectors, params, device=self.device)
        state = dict(merged.stats.get("state") or {})
        if "statistics" in state:  # cache entries by key, not by where this process keeps them
            state["statistics"] = [p.name for p in paths]
        if "meta" in state:  # what writing an entry cost varies by run and worker: not a result
            state["meta"] = {k: v for k, v in state["meta"].items() if k not in _COST}
        return merged.deltas, {**merged.stats, "state": state, "data": used}

    def run(self, job: Job, key: str | None = None) -> dict[str, Any]:
        """Build, apply, evaluate and restore; the job's record for the results store."""
        start = time.perf_counter()
        backend = self.backend
        deltas, stats = self.deltas(job)
        results = {}
        with apply_deltas(backend.model, deltas):
            for task in job.tasks:
                spec, examples, notes = self.examples(task)
                torch.manual_seed(0)
                res = evaluate_suite_task(backend, spec, examples)
                results[task] = {
                    "metric": res.metric,
                    "score": res.score,
                    "n": res.n,
                    "version": spec.version,
                    **notes,
                    "predictions": _slim(res.predictions),
                }
        return {
            "key": key or job_key(self.suite, job, self.options),
            "schema": SCHEMA,
            "suite": self.suite.name,
            "job": job.to_dict(),
            "options": asdict(self.options),
            "fingerprint": self.suite.fingerprint(job.tasks),
            "results": results,
            "merge_stats": stats,
            "wall_s": round(time.perf_counter() - start, 3),
            "device": self.device,
            "versions": library_versions(),
            "created": datetime.now(timezone.utc).isoformat(),
        }
