"""Task metrics, the normalized score and its bootstrap confidence interval (numpy only).

Every metric is a pure function ``metric(preds, golds) -> float`` on the 0..1 scale (Spearman:
-1..1). ``accuracy`` and ``exact_match`` are means of per-example 0/1 scores, so their bootstrap
is vectorized; ``macro_f1`` and ``spearman`` are recomputed on every resample.

The normalized score (STAR paper, README tables) is ``100 * mean_t(merged_t / individual_t)``,
where ``individual_t`` is task t's own fine-tuned model on task t. It is not clipped: a merged
model that beats the individual model on a task scores above 100 there.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from starmerge.errors import StarmergeError
from starmerge.registry import Registry

Metric = Callable[[Sequence[Any], Sequence[Any]], float]

#: Per-task bootstrap input: per-example scores whose mean is the metric (accuracy, exact
#: match), or ``(metric_name, preds, golds)`` for metrics recomputed on each resample.
TaskSample = Sequence[float] | np.ndarray | tuple[str, Sequence[Any], Sequence[Any]]


def _check_lengths(preds: Sequence[Any], golds: Sequence[Any]) -> None:
    if len(preds) != len(golds):
        raise ValueError(f"got {len(preds)} predictions for {len(golds)} gold labels")
    if len(golds) == 0:
        raise ValueError("a metric needs at least one example, got 0")


def accuracy(preds: Sequence[Any], golds: Sequence[Any]) -> float:
    """Fraction of predictions equal to their gold label (``None`` never matches).

    Example:
        >>> accuracy(["a", "b", None], ["a", "a", "b"])
        0.3333333333333333
    """
    _check_lengths(preds, golds)
    return float(np.mean([p is not None and p == g for p, g in zip(preds, golds, strict=True)]))


def macro_f1(
    preds: Sequence[Any], golds: Sequence[Any], labels: Sequence[Any] | None = None
) -> float:
    """Unweighted mean over classes of the per-class F1 score.

    Args:
        preds: Predicted labels; ``None`` (an unmatched output) is wrong for every class.
        golds: Gold labels.
        labels: The classes to average over. Default: the gold classes, so a prediction outside
            them only costs recall (it is not a class of its own). A class with no gold and no
            predicted example has F1 0.

    Example:
        >>> round(macro_f1([0, 0, 1, 2], [0, 1, 1, 2]), 4)
        0.7778
    """
    _check_lengths(preds, golds)
    classes = list(dict.fromkeys(golds)) if labels is None else list(labels)
    f1s = []
    for c in classes:
        tp = sum(p == c and g == c for p, g in zip(preds, golds, strict=True))
        n_pred = sum(p == c for p in preds)
        n_gold = sum(g == c for g in golds)
        f1s.append(2 * tp / (n_pred + n_gold) if n_pred + n_gold else 0.0)
    return float(np.mean(f1s))


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lower case, drop punctuation and articles, squeeze whitespace."""
    text = _ARTICLES.sub(" ", str(text).lower().translate(_PUNCT))
    return " ".join(text.split())


def exact_match(preds: Sequence[Any], golds: Sequence[Any], normalize: bool = True) -> float:
    """Fraction of predictions equal to the gold string.

    Args:
        preds: Generated strings (``None`` never matches).
        golds: Gold strings.
        normalize: Compare after :func:`normalize_answer` (SQuAD style); else compare
            whitespace-stripped strings exactly.

    Example:
        >>> exact_match(["The Cat.", "dog"], ["cat", "dogs"])
        0.5
    """
    _check_lengths(preds, golds)
    fix = normalize_answer if normalize else (lambda s: str(s).strip())
    return float(
        np.mean([p is not None and fix(p) == fix(g) for p, g in zip(preds, golds, strict=True)])
    )


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Start index of each run of equal values, then the average rank of each run.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(preds: Sequence[float], golds: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks).

    Returns 0.0 when either side is constant (the correlation is undefined there; the seed code
    does the same, so a model that always outputs one number scores 0, not NaN).

    Example:
        >>> spearman([1.0, 2.0, 3.0], [2.0, 4.0, 9.0])
        1.0
    """
    _check_lengths(preds, golds)
    p, g = np.asarray(preds, dtype=float), np.asarray(golds, dtype=float)
    if np.all(p == p[0]) or np.all(g == g[0]):
        return 0.0
    rp, rg = _ranks(p) - (len(p) + 1) / 2, _ranks(g) - (len(g) + 1) / 2
    return float(np.sum(rp * rg) / np.sqrt(np.sum(rp**2) * np.sum(rg**2)))


METRICS: Registry[Metric] = Registry("metric")
METRICS.add("accuracy", accuracy)
METRICS.add("macro_f1", macro_f1)
METRICS.add("exact_match", exact_match)
METRICS.add("spearman", spearman)

#: Metrics that are the mean of per-example 0/1 scores.
MEAN_METRICS = frozenset({"accuracy", "exact_match"})


def normalized_score(merged: Mapping[str, float], individual: Mapping[str, float]) -> float:
    """``100 * mean over merged's tasks of merged[t] / individual[t]`` (no clipping).

    Raises:
        StarmergeError: A task of ``merged`` has no individual score, or it is 0.

    Example:
        >>> normalized_score({"a": 0.9, "b": 0.5}, {"a": 0.9, "b": 1.0})
        75.0
    """
    if not merged:
        raise StarmergeError("normalized score: no task scores were given")
    ratios = []
    for task, score in merged.items():
        if task not in individual:
            raise StarmergeError(
                f"normalized score: task {task!r} has no individual score "
                f"(individual tasks: {', '.join(individual) or 'none'}); evaluate the "
                "individual fine-tuned model on it first"
            )
        if individual[task] == 0:
            raise StarmergeError(
                f"normalized score: the individual score of task {task!r} is 0, so "
                "merged/individual is undefined; check that task's evaluation"
            )
        ratios.append(score / individual[task])
    return float(100.0 * np.mean(ratios))


def _resampled_scores(sample: TaskSample, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """The task metric on ``n_boot`` resamples of its examples, shape (n_boot,)."""
    if isinstance(sample, tuple) and len(sample) == 3 and isinstance(sample[0], str):
        name, preds, golds = sample
        metric = METRICS.get(name)
        preds_a, golds_a = np.asarray(preds, dtype=object), np.asarray(golds, dtype=object)
        idx = rng.integers(0, len(golds_a), size=(n_boot, len(golds_a)))  # (n_boot, n)
        return np.array([metric(list(preds_a[i]), list(golds_a[i])) for i in idx])
    x = np.asarray(sample, dtype=float)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"per-example scores must be a non-empty 1-D array, got shape {x.shape}")
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))  # (n_boot, n)
    return x[idx].mean(axis=1)


def bootstrap_ci(
    samples: Mapping[str, TaskSample],
    individual: Mapping[str, float] | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the normalized score (or of the mean task score).

    Each task's examples are resampled independently (tasks are separate test sets) and the
    task metric is recomputed for the merged model. The individual scores are held fixed as
    denominators: the interval is the sampling uncertainty of the merged model's evaluation
    given the individual reference, which is how the normalized score is read (a ratio to a
    fixed reference). Resampling the denominators too would widen it.

    Args:
        samples: Per task, per-example 0/1 (or any per-example scores whose mean is the
            metric), or ``(metric_name, preds, golds)`` for ``macro_f1`` / ``spearman``.
        individual: Fixed individual scores; with them the interval is of the normalized score
            (0..100+ scale), without them of the plain mean task score (metric scale).
        n_boot: Number of bootstrap resamples.
        seed: Seed of the resampling.
        level: Coverage of the interval.

    Returns:
        ``(lo, hi)``.

    Example:
        >>> lo, hi = bootstrap_ci({"a": [1, 0, 1, 1]}, {"a": 0.8}, n_boot=200)
        >>> lo <= 93.75 <= hi
        True
    """
    if not samples:
        raise ValueError("bootstrap_ci needs at least one task")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_ci: level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    per_task = []
    for task in sorted(samples):  # sorted: the interval must not depend on dict order
        scores = _resampled_scores(samples[task], n_boot, rng)
        if individual is not None:
            ref = individual.get(task)
            if not ref:
                raise StarmergeError(f"bootstrap_ci: task {task!r} has no nonzero individual score")
            scores = 100.0 * scores / ref
        per_task.append(scores)
    total = np.mean(per_task, axis=0)  # (n_boot,)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(total, [alpha, 1.0 - alpha])
    return float(lo), float(hi)
