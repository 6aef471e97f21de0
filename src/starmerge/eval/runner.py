"""Run tasks against a backend: score label words, or generate and match, then the metric.

How each task is scored (decided by the task file, never by the backend):

- ``label_words`` with ``scoring: loglikelihood`` (default): every label's first word is
  scored as a continuation of the prompt (``target_delimiter`` + word); the prediction is the
  argmax of the summed log-likelihood, or of the log-likelihood per UTF-8 byte of the
  continuation with ``length_normalized: true`` (lm-eval's ``acc_norm``).
- ``label_words`` with ``scoring: generate``: greedy generation, then :func:`match_choice`
  on whole words over every accepted word of every label (no match: wrong).
- ``metric: exact_match``: generation compared with ``target_column`` (SQuAD normalization).
- ``metric: spearman``: generation, the first number in it (0.0 when there is none, flagged
  ``parsed: false`` in the predictions), against the numeric ``label_column``.
- A :class:`ClassifierBackend` (encoder + head) predicts class indices; index i is the i-th
  key of ``label_words`` in file order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from starmerge.errors import StarmergeError
from starmerge.eval.backends import Backend, ClassifierBackend
from starmerge.eval.matching import match_choice, parse_number
from starmerge.eval.metrics import MEAN_METRICS, METRICS, TaskSample, exact_match
from starmerge.eval.tasks import Example, TaskSpec


@dataclass(frozen=True)
class TaskResult:
    """One task's outcome.

    Args:
        metric: The metric name (``accuracy``, ``macro_f1``, ``exact_match``, ``spearman``).
        score: The metric on the task's examples (0..1; Spearman -1..1).
        n: Number of examples.
        predictions: Per example: ``index``, ``input``, ``gold``, ``pred``, ``correct`` (0/1;
            ``abs_error`` for Spearman) and, by mode, ``scores`` (per label, in label_words
            order), ``output`` (generated text) or ``class`` (classifier index).
    """

    metric: str
    score: float
    n: int
    predictions: list[dict[str, Any]] = field(default_factory=list)

    def samples(self) -> TaskSample:
        """The per-example input of :func:`~starmerge.eval.metrics.bootstrap_ci`."""
        if self.metric in MEAN_METRICS:
            return [float(p["correct"]) for p in self.predictions]
        preds = [p["pred"] for p in self.predictions]
        return (self.metric, preds, [p["gold"] for p in self.predictions])


def _by_loglikelihood(backend: Backend, task: TaskSpec, inputs: list[str]) -> list[dict]:
    keys = list(task.label_words or {})
    choices = [task.target_delimiter + task.label_words[k][0] for k in keys]  # type: ignore[index]
    scores = backend.score_choices(inputs, [choices] * len(inputs))
    if task.length_normalized:
        sizes = [max(1, len(c.encode("utf-8"))) for c in choices]
        scores = [[s / z for s, z in zip(row, sizes, strict=True)] for row in scores]
    return [
        {"pred": keys[max(range(len(keys)), key=row.__getitem__)], "scores": row} for row in scores
    ]


def _by_generation(backend: Backend, task: TaskSpec, inputs: list[str]) -> list[dict]:
    outputs = backend.generate(inputs, task.max_new_tokens)
    if task.label_words is not None:
        keys = list(task.label_words)
        variants = [task.label_words[k] for k in keys]
        hits = [match_choice(o, variants) for o in outputs]
        return [
            {"pred": None if h is None else keys[h], "output": o}
            for h, o in zip(hits, outputs, strict=True)
        ]
    if task.metric == "spearman":
        numbers = [parse_number(o) for o in outputs]
        return [
            {"pred": 0.0 if x is None else x, "output": o, "parsed": x is not None}
            for x, o in zip(numbers, outputs, strict=True)
        ]
    return [{"pred": o, "output": o} for o in outputs]


def _by_classifier(backend: ClassifierBackend, task: TaskSpec, inputs: list[str]) -> list[dict]:
    if task.label_words is None:
        raise StarmergeError(f"task {task.name!r}: a classifier backend needs label_words")
    keys = list(task.label_words)
    classes = backend.predict(task.name, inputs)
    return [{"pred": keys[c] if 0 <= c < len(keys) else None, "class": c} for c in classes]


def _predict(backend: Any, task: TaskSpec, inputs: list[str]) -> list[dict]:
    """Per-example ``pred`` (plus mode details) for the task's scoring mode."""
    if not isinstance(backend, Backend) and isinstance(backend, ClassifierBackend):
        return _by_classifier(backend, task, inputs)
    if task.label_words is not None and task.scoring == "loglikelihood":
        return _by_loglikelihood(backend, task, inputs)
    return _by_generation(backend, task, inputs)


def _per_example(task: TaskSpec, pred: Any, gold: Any) -> dict[str, float]:
    """``correct`` (0/1; bootstrapped for mean metrics), or ``abs_error`` for Spearman."""
    if task.metric == "spearman":
        return {"abs_error": abs(float(pred) - float(gold))}  # Spearman is not per example
    if task.metric == "exact_match":
        return {"correct": exact_match([pred], [gold])}
    return {"correct": float(pred is not None and pred == gold)}


def evaluate_task(
    backend: Any, task: TaskSpec, examples: Sequence[Example] | None = None
) -> TaskResult:
    """Evaluate one task; ``examples`` defaults to ``task.examples()`` (loaded from its source)."""
    examples = list(task.examples() if examples is None else examples)
    if not examples:
        raise StarmergeError(f"task {task.name!r} has no examples to evaluate")
    inputs = [ex.input for ex in examples]
    golds = [ex.target if task.metric == "exact_match" else ex.label for ex in examples]
    details = _predict(backend, task, inputs)
    preds = [d["pred"] for d in details]
    metric: Callable[[Sequence[Any], Sequence[Any]], float] = METRICS.get(task.metric)
    predictions = [
        {
            "index": ex.index,
            "input": ex.input,
            "gold": gold,
            **d,
            **_per_example(task, d["pred"], gold),
        }
        for ex, gold, d in zip(examples, golds, details, strict=True)
    ]
    return TaskResult(task.metric, metric(preds, golds), len(examples), predictions)


def evaluate(
    backend: Any,
    tasks: Sequence[TaskSpec],
    *,
    batch_size: int | None = None,
    seed: int = 0,
) -> dict[str, TaskResult]:
    """Evaluate every task with one backend.

    Args:
        backend: A :class:`Backend` (``CausalLMBackend``, ``Seq2SeqBackend``) or a
            :class:`ClassifierBackend` (``ClassifierHeadBackend``).
        tasks: The tasks; names must be unique.
        batch_size: Overrides ``backend.batch_size`` for this call when given.
        seed: Seeds torch before each task. Greedy decoding and scoring do not depend on it;
            it is there for backends that sample. Which examples are drawn is the task's
            ``sampling.seed``, part of the task's definition.

    Returns:
        Task name -> :class:`TaskResult`, in task order.

    Example:
        >>> results = evaluate(backend, [load_task("example_sst2")])  # doctest: +SKIP
        >>> results["example_sst2"].score  # doctest: +SKIP
        0.5
    """
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise StarmergeError(f"task names must be unique, got {names}")
    saved = getattr(backend, "batch_size", None)
    if batch_size is not None:
        backend.batch_size = batch_size
    try:
        results = {}
        for task in tasks:
            torch.manual_seed(seed)
            results[task.name] = evaluate_task(backend, task)
        return results
    finally:
        if batch_size is not None:
            backend.batch_size = saved
