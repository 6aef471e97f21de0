"""Data-driven merges in sweeps: each task's statistics (or trained masks), cached on disk.

For a merge job with ``data`` (its method's ``data(params)`` asks for statistics or trained
masks: mats, fisher_merging, regmean, localize_stitch ``mode: trained``), each task of the job
gets one entry of the statistics cache (``starmerge.stats.cache``), built by
the same code as ``starmerge merge``'s ``data:`` section (``starmerge.stats.gather``):

1. ``data.n_examples`` training examples of the task, never its evaluated rows
   (:mod:`starmerge.suites.training`), tokenized the way the evaluation backend renders prompts
   (Llama/Mistral: the chat template, the answer starting the assistant turn);
2. statistics at the task's individual model, i.e. the loaded base model with that task's vector
   added in place (what the ``individual`` job evaluates; full checkpoints under ``full_keys``),
   or masks trained from the base model;
3. an entry keyed by the suite's task (models, task file), dtype, ``full_keys`` (full
   checkpoints), the training rows and their token ids, the statistic kinds, Fisher variant and
   mask settings, the merged parameter keys, batch size and max length.

Every later job (another task set, another method reading the same kinds, a re-run, a Ray worker
sharing the cache directory) reuses the entry. Jobs record the data each task used.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from starmerge.methods import METHODS
from starmerge.suites import Suite
from starmerge.sweep.jobs import DataOptions, Job, RunOptions, Runtime
from starmerge.tensors.delta import Delta


def model_kind(suite: Suite) -> str:
    """The statistics wrappers' model kind (``starmerge.stats.hf``) of a suite's base model."""
    return "seq2seq" if suite.model_class == "seq2seq" else "causal_lm"


class TaskData:
    """One process's training examples (in memory) and statistics entries (on disk).

    Args:
        suite: The suite.
        options: The run options, resolved (dtype and full_keys key the entries).
        runtime: Data mirror, statistics cache directory and memory budget.
    """

    def __init__(self, suite: Suite, options: RunOptions, runtime: Runtime):
        from starmerge.stats.cache import default_cache_dir

        self.suite, self.options, self.runtime = suite, options, runtime
        self.cache_dir = Path(runtime.stats_dir) if runtime.stats_dir else default_cache_dir()
        self.computed = 0  # entries collected (once per task, data and merged keys)
        self.reused = 0  # entries found in the cache
        self._examples: dict[tuple[str, int, int], tuple[Any, list[Any], dict[str, Any]]] = {}

    def examples(self, task: str, data: DataOptions) -> tuple[Any, list[Any], dict[str, Any]]:
        """The task's training spec, examples and notes (cached per task, n and seed)."""
        key = (task, data.n_examples, data.seed)
        if key not in self._examples:
            from starmerge.suites.training import training_examples

            data_dir = Path(self.runtime.data_dir) if self.runtime.data_dir else None
            self._examples[key] = training_examples(
                self.suite.task(task), data.n_examples, data.seed, data_dir, self.suite.name
            )
        return self._examples[key]

    def check(self, jobs: Sequence[Job]) -> None:
        """Draw every data job's examples now, so a task without enough fails before any job.

        Raises:
            StarmergeError: A task declares no training data or has too few rows.
        """
        for job in jobs:
            if job.data is not None:
                for task in job.tasks:
                    self.examples(task, DataOptions(**job.data))

    def batches(self, backend: Any, task: str, data: DataOptions) -> tuple[list, dict[str, Any]]:
        """The task's training batches (prompts rendered as the backend renders them), notes."""
        from starmerge.stats import hf

        def rendered(text: str) -> list[int]:  # the prompt exactly as the evaluation sees it
            return backend.encode(backend.render(text))

        spec, examples, notes = self.examples(task, data)
        causal = self.suite.model_class == "causal"
        if causal and self.suite.chat_template:  # the answer starts the assistant turn
            spec = replace(spec, target_delimiter="")
        batches = hf.build_batches(
            backend.tokenizer, model_kind(self.suite), spec, examples, data.batch_size,
            data.max_length, data.seed, encode=rendered if causal else None,
        )  # fmt: skip
        return batches, notes

    def prepare(
        self, backend: Any, job: Job, vectors: Mapping[str, Mapping[str, Delta]]
    ) -> tuple[list[Path], dict[str, Any]]:
        """Each task's statistics entry for a data job (collected or reused), in task order.

        Args:
            backend: The evaluation backend around the loaded base model (restored after).
            job: A merge job with ``data``.
            vectors: Each task's vector (the merged keys are their union).

        Returns:
            The entries, and per task the data it used (``rows`` drawn, source, entry key).
        """
        method = METHODS.get(str(job.method))
        assert method.data is not None, "only data jobs get statistics"
        request = method.data(job.params)
        data = DataOptions(**(job.data or {}))
        shapes = {k: d.shape for t in job.tasks for k, d in vectors[t].items()}
        paths, used = [], {}
        for task in job.tasks:
            path, note = self._entry(backend, task, request, data, shapes, vectors[task])
            paths.append(path)
            used[task] = note
        return paths, used

    def _fields(self, task: str, request: Any, data: DataOptions, shapes: Mapping, batches: list,
                notes: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
        """Everything the entry depends on (hashed into its cache key)."""
        from starmerge.stats.cache import FORMAT
        from starmerge.stats.gather import examples_digest

        full = self.suite.task(task).model is not None
        return {
            "format": FORMAT, "suite": self.suite.fingerprint([task]),
            "dtype": self.options.dtype, "full_keys": self.options.full_keys if full else None,
            "train": {k: notes[k] for k in ("source", "transform", "rows")},
            "examples": examples_digest(batches), "model_kind": model_kind(self.suite),
            "kinds": sorted(request.kinds), "fisher": request.fisher,
            "masks": dict(request.masks) if request.masks else None,
            "parameters": hashlib.sha256("\n".join(sorted(shapes)).encode()).hexdigest(),
            "batch_size": data.batch_size, "max_length": data.max_length,
        }  # fmt: skip

    def _entry(self, backend: Any, task: str, request: Any, data: DataOptions,
               shapes: Mapping[str, tuple[int, ...]],
               vector: Mapping[str, Delta]) -> tuple[Path, dict[str, Any]]:  # fmt: skip
        from starmerge.io.writer import parse_size
        from starmerge.stats.cache import StatsWriter, cache_key, entry_path
        from starmerge.stats.gather import NORMALISATION, collect_into, train_into
        from starmerge.suites.models import apply_deltas

        batches, notes = self.batches(backend, task, data)
        fields = self._fields(task, request, data, shapes, batches, notes)
        key = cache_key(fields)
        note = {**notes, "statistics": key}
        found = entry_path(self.cache_dir, key)
        if found is not None:
            self.reused += 1
            return found, note
        meta = {**fields, "task": task, "model": self.suite.task(task).source,
                "n_examples": data.n_examples, "normalisation": NORMALISATION}  # fmt: skip
        model, kind = backend.model, model_kind(self.suite)
        with StatsWriter(self.cache_dir, key, meta) as writer:
            if request.kinds:
                modules = [n for n, m in model.named_modules()
                           if isinstance(m, nn.Linear) and f"{n}.weight" in shapes]  # fmt: skip
                with apply_deltas(model, vector):  # the task's individual model
                    collect_into(writer, model, batches, request, kind, modules,
                                 budget=parse_size(self.runtime.stats_memory),
                                 budget_name="--stats-memory")  # fmt: skip
            if request.masks:  # trained from the base model, theta_0
                train_into(writer, model, batches, request, kind, shapes, vector.get)
        self.computed += 1
        return writer.final, note
