"""Run jobs in one process: the base model is loaded once, task vectors and STAR factors cached.

A :class:`Workbench` holds one loaded base model and its backend. For each job it builds the
deltas (none for ``base``; the task's own task vector for ``individual``; a merge otherwise),
adds them to the model's weights in place, evaluates, and restores the weights. Across the jobs
it runs, it keeps each task's examples, task vector, and STAR factorization per ``eta``: STAR
truncates and rescales every task on its own, so a STAR merge of any task set is the average of
cached per-task factors (exact in factor space), and an ``eta`` sweep over many task subsets does
each task's spectral work once. Data-driven merges get each task's statistics (or trained masks)
from :class:`~starmerge.sweep.data.TaskData`, cached on disk across jobs, runs and workers.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any

import torch

from starmerge.suites import Suite
from starmerge.sweep.data import TaskData
from starmerge.sweep.jobs import SCHEMA, Job, RunOptions, Runtime, job_key
from starmerge.tensors.delta import Delta, LowRank
from starmerge.tensors.spectral import star_dense, star_factored

_SMALL = 1 << 16  # as methods/star.py: matrices this small get a float64 SVD


def star_task(deltas: dict[str, Delta], eta: float) -> tuple[dict[str, Delta], dict[str, int]]:
    """STAR's truncate-and-rescale on one task's deltas, each kept as rank-k factors.

    The STAR merge of tasks is the simple average of these (STAR's own final step), so they can
    be cached per task and ``eta`` and reused for every task set. Non-matrix deltas are kept
    as they are (STAR averages them).

    Returns:
        The processed deltas (``LowRank`` for matrices) and the kept rank per matrix key.
    """
    out: dict[str, Delta] = {}
    kept: dict[str, int] = {}
    for key, d in deltas.items():
        if isinstance(d, LowRank) and d.rank == 0:
            out[key] = d
            continue
        if isinstance(d, LowRank):
            scale = torch.tensor([float(d.scale)], dtype=torch.float64)
            b_hat, a_hat, k = star_factored(d.b[None], d.a[None], scale, eta)
        elif d.tensor.ndim == 2:
            small = d.numel() <= _SMALL or d.dtype == torch.float64
            x = d.to_dense(torch.float64 if small else torch.float32)[None]
            b_hat, a_hat, k = star_dense(x, eta, d.dtype)
        else:
            out[key] = d
            continue
        kept[key] = int(k[0])
        dtype = torch.float64 if d.dtype == torch.float64 else torch.float32
        out[key] = LowRank(b_hat[0, :, : kept[key]].to(dtype), a_hat[0, : kept[key]].to(dtype), 1.0)
    return out, kept


def _slim(predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-example predictions without the prompt text (reproducible from the task file)."""
    return [{k: v for k, v in p.items() if k != "input"} for p in predictions]


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
        from starmerge.suites.models import resolve_device

        self.suite = suite
        self.options = options.resolved(suite)
        self.runtime = runtime
        self.device = resolve_device(runtime.device)
        self.model_loads = 0
        self.vector_loads = 0  # task vectors read (once per task)
        self.star_computations = 0  # per-task STAR factorizations (once per task and eta)
        self._backend: Any = None
        self._examples: dict[str, tuple[Any, list[Any], dict[str, Any]]] = {}
        self._vectors: dict[str, dict[str, Delta]] = {}
        self._stars: dict[tuple[str, float], tuple[dict[str, Delta], dict[str, int]]] = {}
        self.data = TaskData(suite, self.options, runtime)

    @property
    def backend(self) -> Any:
        """The evaluation backend around the base model (loaded on first use, once)."""
        if self._backend is None:
            from starmerge.suites.models import load_base, make_backend

            model, tokenizer = load_base(self.suite, str(self.options.dtype), self.device)
            self.model_loads += 1
            batch = self.runtime.batch_size or self.suite.batch_size
            self._backend = make_backend(self.suite, model, tokenizer, batch)
        return self._backend

    def examples(self, task: str) -> tuple[Any, list[Any], dict[str, Any]]:
        """The task's spec, sampled examples and notes (cached)."""
        if task not in self._examples:
            from pathlib import Path

            from starmerge.suites.data import build_examples, load_task_rows

            spec = self.suite.task(task).spec()
            data_dir = Path(self.runtime.data_dir) if self.runtime.data_dir else None
            rows = load_task_rows(spec, data_dir)
            self._examples[task] = build_examples(spec, rows, self.options.limit)
        return self._examples[task]

    def task_vector(self, task: str) -> dict[str, Delta]:
        """The task's delta per parameter key (cached)."""
        if task not in self._vectors:
            from starmerge.suites.models import task_vector

            self._vectors[task] = task_vector(
                self.suite, self.suite.task(task), self.options.full_keys
            )
            self.vector_loads += 1
        return self._vectors[task]

    def star_factors(self, task: str, eta: float) -> tuple[dict[str, Delta], dict[str, int]]:
        """STAR's processed deltas of one task at ``eta`` (cached)."""
        if (task, eta) not in self._stars:
            self._stars[(task, eta)] = star_task(self.task_vector(task), eta)
            self.star_computations += 1
        return self._stars[(task, eta)]

    def deltas(self, job: Job) -> tuple[dict[str, Delta], dict[str, Any]]:
        """The deltas a job applies to the base model, and merge statistics."""
        from starmerge.api import merge_deltas

        if job.kind == "base":
            return {}, {}
        if job.kind == "individual":
            return self.task_vector(job.tasks[0]), {}
        if job.method == "star":
            parts = [self.star_factors(t, float(job.params["eta"])) for t in job.tasks]
            merged = merge_deltas("simple_average", [p for p, _ in parts], device=self.device)
            ranks = {key: [kept.get(key, 0) for _, kept in parts] for key in merged.deltas}
            return merged.deltas, {"kept_ranks": ranks}
        vectors = [self.task_vector(t) for t in job.tasks]
        if job.data is None:
            merged = merge_deltas(job.method or "", vectors, job.params, device=self.device)
            return merged.deltas, merged.stats
        by_task = dict(zip(job.tasks, vectors, strict=True))
        paths, used = self.data.prepare(self.backend, job, by_task)
        params = {**job.params, "statistics": [str(p) for p in paths]}
        merged = merge_deltas(job.method or "", vectors, params, device=self.device)
        state = dict(merged.stats.get("state") or {})
        if "statistics" in state:  # cache entries by key, not by where this process keeps them
            state["statistics"] = [p.name for p in paths]
        return merged.deltas, {**merged.stats, "state": state, "data": used}

    def run(self, job: Job, key: str | None = None) -> dict[str, Any]:
        """Build, apply, evaluate and restore; the job's record for the results store."""
        from starmerge.eval.results import library_versions
        from starmerge.suites.models import apply_deltas
        from starmerge.suites.scoring import evaluate_suite_task

        start = time.perf_counter()
        backend = self.backend
        deltas, stats = self.deltas(job)
        results = {}
        with apply_deltas(backend.model, deltas):
            for task in job.tasks:
                spec, examples, notes = self.examples(task)
                torch.manual_seed(0)
                res = evaluate_suite_task(backend, spec, examples)
                results[task] = {"metric": res.metric, "score": res.score, "n": res.n,
                                 "version": spec.version, **notes,
                                 "predictions": _slim(res.predictions)}  # fmt: skip
        return {
            "key": key or job_key(self.suite, job, self.options), "schema": SCHEMA,
            "suite": self.suite.name, "job": job.to_dict(), "options": asdict(self.options),
            "fingerprint": self.suite.fingerprint(job.tasks), "results": results,
            "merge_stats": stats, "wall_s": round(time.perf_counter() - start, 3),
            "device": self.device, "versions": library_versions(),
            "created": datetime.now(timezone.utc).isoformat(),
        }  # fmt: skip
