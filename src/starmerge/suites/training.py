"""A suite task's training examples, for the data-driven methods (statistics, trained masks).

The suite file says where each task's training data lies (``train:``, see
:class:`~starmerge.suites.SuiteTask`): overrides of the task file's ``source`` (``path``,
``config``, ``split``), ``revision`` and ``metadata.transform``, e.g. ``{split: train}`` or, for
GLUE MNLI whose evaluated ``mnli_matched`` config has no training split, ``{config: mnli, split:
train}``. The rows go through the task's transform (or the one ``train:`` names), then ``n``
of them are drawn uniformly with ``random.Random(seed)`` and rendered with the task's prompt.

Rows the evaluation uses are never drawn: when the training rows come from the very split the
task is evaluated on (same path, config, split and revision; e.g. ``financial_phrasebank``, whose
only split the seed cuts 90/10), every row of the evaluation sample (its full size, whatever
``--limit``) is held out, and each row is tracked by its index in the raw split through the
transforms.

Example:
    >>> spec, examples, notes = training_examples(suite.task("mnli"), 32, 0)  # doctest: +SKIP
    >>> notes["source"]
    {'path': 'nyu-mll/glue', 'config': 'mnli', 'split': 'train', 'revision': None}
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from starmerge.errors import StarmergeError
from starmerge.eval.tasks import Example, TaskSpec
from starmerge.suites import SuiteTask
from starmerge.suites.data import _eval_sample, _example, _transformed, load_task_rows

ROW = "__row__"  # a raw row's index in its split, carried through the transforms


def train_spec(spec: TaskSpec, train: Mapping[str, Any]) -> TaskSpec:
    """``spec`` with its source, revision and transform pointed at the training rows."""
    where = {k: train[k] for k in ("path", "config", "split") if k in train}
    source = replace(spec.source, **where)
    metadata = dict(spec.metadata)
    metadata.update({k: train[k] for k in ("revision", "transform") if k in train})
    return replace(spec, source=source, metadata=metadata)


def _where(spec: TaskSpec) -> tuple[Any, ...]:
    src = spec.source
    return (src.type, src.path, src.config, src.split, spec.metadata.get("revision"))


def _describe(spec: TaskSpec) -> str:
    src = spec.source
    return f"{src.path}" + (f" ({src.config})" if src.config else "") + f" [{src.split}]"


def training_examples(
    task: SuiteTask, n: int, seed: int, data_dir: Path | None = None, suite: str = ""
) -> tuple[TaskSpec, list[Example], dict[str, Any]]:
    """``n`` seeded training examples of a suite task, disjoint from its evaluated rows.

    Args:
        task: The suite task (its task file and ``train:`` definition).
        n: Examples to draw.
        seed: Sampling seed.
        data_dir: A local mirror of the hub datasets (as for evaluation).
        suite: The suite's name, for errors.

    Returns:
        The training spec (with any extra labels), the examples (``index`` = the row's index in
        the raw training split), and notes for the results: ``source``, ``transform``,
        ``rows_available``, ``held_out``, ``n_examples``, ``seed``, ``rows``.

    Raises:
        StarmergeError: The suite declares no training data for the task, or it has fewer than
            ``n`` usable rows.
    """
    if task.train is None:
        raise StarmergeError(
            f"suite {suite!r} task {task.name!r} declares no training data for the data-driven "
            "methods; add `train: {split: train}` (the split its model was trained on) to the "
            "task or the suite file"
        )
    spec = task.spec()
    tspec = train_spec(spec, task.train)
    raw = [{**r, ROW: i} for i, r in enumerate(load_task_rows(tspec, data_dir))]
    held_out: set[int] = set()
    if raw and _where(tspec) == _where(spec):  # no separate split: hold the evaluated rows out
        espec, erows, _ = _transformed(spec, raw)
        held_out = {erows[i][ROW] for i in _eval_sample(espec, erows)}
    tspec, rows, _ = _transformed(tspec, raw)
    pool = [i for i, r in enumerate(rows) if r[ROW] not in held_out]
    if len(pool) < n:
        after = f" after holding out the {len(held_out)} evaluated rows" if held_out else ""
        raise StarmergeError(
            f"task {task.name!r}: data.n_examples is {n} but its training data "
            f"{_describe(tspec)} has only {len(pool)} usable rows{after}; lower "
            "data.n_examples or point the task's `train:` at a larger split"
        )
    picked = random.Random(seed).sample(pool, n)
    examples = [_example(tspec, rows[i], rows[i][ROW]) for i in picked]
    src = tspec.source
    notes = {
        "source": {
            "path": src.path,
            "config": src.config,
            "split": src.split,
            "revision": tspec.metadata.get("revision"),
        },
        "transform": tspec.metadata.get("transform"),
        "rows_available": len(rows),
        "held_out": len(held_out),
        "n_examples": n,
        "seed": seed,
        "rows": [e.index for e in examples],
    }
    return tspec, examples, notes
