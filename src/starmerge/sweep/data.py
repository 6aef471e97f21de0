"""Data-driven merges in sweeps: each task's statistics (or trained masks), cached on disk.

For a merge job with ``data`` (its method's ``data(params)`` asks for statistics or trained
masks: mats, fisher_merging, regmean, localize_stitch ``mode: trained``), each task of the job
gets one entry of the statistics cache through the same pipeline and key recipe as
``starmerge merge``'s ``data:`` section and the demo
(:func:`starmerge.stats.gather.gather_statistics`); the task is described as a
:class:`~starmerge.stats.source.TaskSource`:

1. ``data.n_examples`` training examples of the task, never its evaluated rows
   (:mod:`starmerge.suites.training`), tokenized the way the evaluation backend renders prompts
   (Llama/Mistral: the chat template, the answer starting the assistant turn);
2. statistics at the task's individual model, i.e. the loaded base model with that task's vector
   added in place (what the ``individual`` job evaluates; full checkpoints under ``full_keys``),
   or masks trained from the base model;
3. identified by the suite's base model (how it is loaded, its dtype) and the task's model
   (adapter or checkpoint, ``full_keys``), the batches' tokens, the statistic kinds, Fisher
   labels and mask settings, and the merged parameter keys.

Every later job (another task set, another method reading the same kinds, a re-run, a Ray worker
sharing the cache directory) reuses the entry. Jobs record the data each task used.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from starmerge.io.output_dir import parse_size
from starmerge.methods import METHODS
from starmerge.methods.contract import DataRequest
from starmerge.stats import hf
from starmerge.stats.cache import default_cache_dir
from starmerge.stats.gather import gather_statistics
from starmerge.stats.source import HF_LOSS, TaskSource
from starmerge.suites import Suite
from starmerge.suites.models import apply_deltas
from starmerge.suites.training import training_examples
from starmerge.sweep.jobs import DataOptions, Job, RunOptions, Runtime
from starmerge.tensors.delta import Delta


def _model_kind(suite: Suite) -> str:
    """The statistics wrappers' model kind (``starmerge.stats.hf``) of a suite's base model."""
    return "seq2seq" if suite.model_class == "seq2seq" else "causal_lm"


class SuiteStatistics:
    """One process's training examples (in memory) and statistics entries (on disk).

    Args:
        suite: The suite.
        options: The run options, resolved (dtype and full_keys identify the models).
        runtime: Data mirror, statistics cache directory and memory budget.
    """

    def __init__(self, suite: Suite, options: RunOptions, runtime: Runtime):
        self.suite, self.options, self.runtime = suite, options, runtime
        self.cache_dir = Path(runtime.stats_dir) if runtime.stats_dir else default_cache_dir()
        self.computed = 0  # entries collected (once per task, data and merged keys)
        self.reused = 0  # entries found in the cache
        self._examples: dict[tuple[str, int, int], tuple[Any, list[Any], dict[str, Any]]] = {}

    def examples(self, task: str, data: DataOptions) -> tuple[Any, list[Any], dict[str, Any]]:
        """The task's training spec, examples and notes (cached per task, n and seed)."""
        key = (task, data.n_examples, data.seed)
        if key not in self._examples:
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

        def rendered(text: str) -> list[int]:  # the prompt exactly as the evaluation sees it
            return backend.encode(backend.render(text))

        spec, examples, notes = self.examples(task, data)
        causal = self.suite.model_class == "causal"
        if causal and self.suite.chat_template:  # the answer starts the assistant turn
            spec = replace(spec, target_delimiter="")
        batches = hf.build_batches(
            backend.tokenizer,
            _model_kind(self.suite),
            spec,
            examples,
            data.batch_size,
            data.max_length,
            data.seed,
            encode=rendered if causal else None,
        )
        return batches, notes

    def entries(
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
        request: DataRequest = method.data(job.params)
        data = DataOptions(**(job.data or {}))
        shapes = {k: d.shape for t in job.tasks for k, d in vectors[t].items()}
        drawn = {t: self.batches(backend, t, data) for t in job.tasks}  # (batches, notes)
        sources = [self._source(backend, t, shapes, vectors[t], drawn[t][0]) for t in job.tasks]
        found = gather_statistics(
            request,
            sources,
            self.cache_dir,
            budget=parse_size(self.runtime.stats_memory),
            budget_name="--stats-memory",
        )
        self.computed += sum(e.computed for e in found)
        self.reused += sum(not e.computed for e in found)
        used = {
            t: {**drawn[t][1], "statistics": e.key} for t, e in zip(job.tasks, found, strict=True)
        }
        return [e.path for e in found], used

    def _source(
        self,
        backend: Any,
        task: str,
        shapes: Mapping[str, tuple[int, ...]],
        vector: Mapping[str, Delta],
        batches: list,
    ) -> TaskSource:
        """The task at its individual model (the base with the task's vector added in place)."""
        fingerprint = self.suite.fingerprint([task])
        own = fingerprint.pop("tasks")[task]
        full = self.suite.task(task).model is not None
        kind = _model_kind(self.suite)

        @contextmanager
        def individual() -> Iterator[nn.Module]:
            with apply_deltas(backend.model, vector):
                yield backend.model

        return TaskSource(
            base={**fingerprint, "dtype": self.options.dtype},
            model={
                "adapter": own["adapter"],
                "model": own["model"],
                "full_keys": self.options.full_keys if full else None,
            },
            model_kind=kind,
            loss_kind=HF_LOSS,
            batches=batches,
            make_loss=lambda fisher: hf.make_loss_fn(kind, fisher),
            shapes=shapes,
            task_model=individual,
            base_model=lambda: backend.model,
            tau=vector.get,
            meta={"task": task, "model_source": self.suite.task(task).source},
        )
