"""Score a suite task: the harness runner, plus the seed's three non-classification scorers.

Most suite tasks are harness tasks (``label_words`` matched on whole words after greedy
generation, or STS-B's Spearman) and go through :func:`starmerge.eval.runner.evaluate_task`.
``metadata.scorer`` selects a scorer the harness does not have:

- ``contains_gold`` (Mistral ncbi, gap): correct when the gold answer occurs in the output as
  whole words (the seed: as a lower-cased substring);
- ``token_f1`` (Mistral qasc): F1 between the output's and the gold answer's word sets (the seed
  built the gold "words" from the characters of the gold string);
- ``metadata.clip: [lo, hi]`` on a Spearman task (Llama STS-B): predictions clipped to the range,
  as the seed does.

Both are means of a per-example value, so their confidence intervals bootstrap like accuracy
(:func:`bootstrap_samples`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from starmerge.eval.matching import parse_number, words
from starmerge.eval.metrics import spearman
from starmerge.eval.runner import TaskResult, evaluate_task
from starmerge.eval.tasks import Example, TaskSpec


def contains_words(text: str, gold: str) -> bool:
    """Whether ``gold``'s words occur as a contiguous run of ``text``'s words.

    Example:
        >>> contains_words("Diseases: breast cancer.", "Breast Cancer"), contains_words("a", "")
        (True, False)
    """
    hay, needle = words(text), words(gold)
    n = len(needle)
    return n > 0 and any(hay[i : i + n] == needle for i in range(len(hay) - n + 1))


def word_f1(pred: str, gold: str) -> float:
    """F1 of the word sets of ``pred`` and ``gold`` (0 when either is empty).

    Example:
        >>> round(word_f1("the cat sat", "cat sat down"), 4)
        0.6667
    """
    p, g = set(words(pred)), set(words(gold))
    common = len(p & g)
    if not p or not g or not common:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


#: Scorers whose task score is the mean of a per-example value (its key in the predictions).
PER_EXAMPLE = {"contains_gold": "correct", "token_f1": "f1"}


def bootstrap_samples(result: TaskResult) -> Any:
    """The per-task input of the bootstrap CI.

    Per-example values for this module's scorers (their mean is the score), else the harness's
    ``TaskResult.samples()``.
    """
    key = PER_EXAMPLE.get(result.metric)
    if key is None:
        return result.samples()
    return [float(p[key]) for p in result.predictions]


def _generated(backend: Any, spec: TaskSpec, examples: Sequence[Example]) -> list[str]:
    return backend.generate([ex.input for ex in examples], spec.max_new_tokens)


def _text_scorer(backend: Any, spec: TaskSpec, examples: Sequence[Example], name: str):
    outputs = _generated(backend, spec, examples)
    golds = [ex.target or "" for ex in examples]
    if name == "contains_gold":
        per = [float(contains_words(o, g)) for o, g in zip(outputs, golds, strict=True)]
    else:
        per = [word_f1(o, g) for o, g in zip(outputs, golds, strict=True)]
    key = PER_EXAMPLE[name]
    preds = [
        {"index": ex.index, "input": ex.input, "gold": g, "pred": o, "output": o, key: v}
        for ex, g, o, v in zip(examples, golds, outputs, per, strict=True)
    ]
    return TaskResult(name, float(np.mean(per)), len(examples), preds)


def _clipped_spearman(backend: Any, spec: TaskSpec, examples: Sequence[Example]) -> TaskResult:
    lo, hi = spec.metadata["clip"]
    outputs = _generated(backend, spec, examples)
    numbers = [parse_number(o) for o in outputs]
    preds = [0.0 if x is None else min(hi, max(lo, x)) for x in numbers]
    golds = [float(ex.label) for ex in examples]  # type: ignore[arg-type]
    rows = [
        {
            "index": ex.index,
            "input": ex.input,
            "gold": g,
            "pred": p,
            "output": o,
            "parsed": x is not None,
            "abs_error": abs(p - g),
        }
        for ex, g, p, o, x in zip(examples, golds, preds, outputs, numbers, strict=True)
    ]
    return TaskResult("spearman", spearman(preds, golds), len(examples), rows)


def evaluate_suite_task(backend: Any, spec: TaskSpec, examples: Sequence[Example]) -> TaskResult:
    """Evaluate one suite task on ``examples`` (already sampled).

    Example:
        >>> result = evaluate_suite_task(backend, spec, examples)  # doctest: +SKIP
        >>> result.metric, result.n
        ('accuracy', 1200)
    """
    scorer = spec.metadata.get("scorer")
    if scorer in ("contains_gold", "token_f1"):
        return _text_scorer(backend, spec, examples, scorer)
    if scorer is not None:
        raise ValueError(f"task {spec.name!r}: unknown metadata.scorer {scorer!r}")
    if spec.metric == "spearman" and spec.metadata.get("clip"):
        return _clipped_spearman(backend, spec, examples)
    return evaluate_task(backend, spec, examples)
