"""Evaluation harness: tasks as YAML data, model backends, runner, metrics, results files.

Names are re-exported lazily, so ``import starmerge.eval.metrics`` stays numpy-only and
nothing here imports ``transformers`` (backends take already-built models and tokenizers).

Example:
    >>> from starmerge.eval import load_task, normalized_score
    >>> normalized_score({"a": 0.9}, {"a": 1.0})
    90.0
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "starmerge.eval.tasks": ["Example", "TaskSpec", "list_tasks", "load_task", "task_from_dict"],
    "starmerge.eval.sources": ["Sampling", "Source", "load_rows", "sample_indices"],
    "starmerge.eval.metrics": [
        "METRICS",
        "accuracy",
        "bootstrap_ci",
        "exact_match",
        "macro_f1",
        "normalized_score",
        "spearman",
    ],
    "starmerge.eval.matching": ["match_choice", "match_label", "parse_number"],
    "starmerge.eval.backends": [
        "Backend",
        "CausalLMBackend",
        "ClassifierBackend",
        "ClassifierHeadBackend",
        "Seq2SeqBackend",
    ],
    "starmerge.eval.runner": ["TaskResult", "evaluate", "evaluate_task"],
    "starmerge.eval.results": ["Results", "load_results", "validate_results"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'starmerge.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)


def __dir__() -> list[str]:
    return __all__
