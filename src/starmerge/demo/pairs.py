"""Demo rows for the methods that merge fewer models than the tier has tasks (issue 13).

A method's registry entry says how many models it merges (``n_models = (least, most)``). When
``most`` is below the tier's T tasks, the demo cannot merge all tasks at once, so it merges
groups of ``most`` tasks in cyclic order instead (never chosen by the method's name):

* ``most = 2`` (SLERP, NuSLERP): the cyclic pairs (t1, t2), (t2, t3), ..., (tT, t1), each
  merge scored on its own two tasks; the row is ``<label> (pairs)`` and a comparator row,
  :data:`COMPARATOR` on the same pairs (``simple_average (pairs)``), is computed alike;
* ``most = 1`` (NearSwap, Arcee Fusion: one model and the base): each task's adapter alone,
  scored on its task (``<label> (each alone)``); its comparator is the ``individual`` row;
* any other ``most`` below T: cyclic windows of ``most`` tasks (``(groups of k)``).

Every task lies in exactly ``most`` groups; its score is the mean over them, and its
per-example correctness (for the bootstrap CI) the mean over them too, example by example (the
groups score the same test items). The normalized score then applies as for every row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from starmerge.methods import METHODS

#: The comparator merged on the same task groups as the rows of two or more models per group:
#: SLERP at t = 0.5 and NuSLERP with equal weights go halfway between two fine-tuned models
#: (SLERP between their weights, NuSLERP between their task vectors); the plain average is the
#: linear way there.
COMPARATOR = "simple_average"

Groups = tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class PlannedRow:
    """One demo row to merge.

    Args:
        label: The row's name in the results.
        method: The registry name.
        params: The parameters shown in the results (resolved; ``space`` when not ``full``).
        groups: The task groups merged one by one; None: all tasks in one merge.
    """

    label: str
    method: str
    params: dict[str, Any]
    groups: Groups | None = None


def task_groups(n_models: tuple[int, int | None], tasks: Sequence[str]) -> Groups | None:
    """The task groups a method with ``n_models = (least, most)`` merges on ``tasks``.

    Returns:
        None when it merges all tasks at once; ``()`` when it can merge no group (it needs more
        models than there are tasks); else the ``len(tasks)`` cyclic windows of ``most`` tasks.

    Example:
        >>> task_groups((1, 2), ["a", "b", "c"])
        (('a', 'b'), ('b', 'c'), ('c', 'a'))
    """
    least, most = n_models
    n = len(tasks)
    if n < least or (most is not None and most < least):
        return ()
    if most is None or most >= n:
        return None
    return tuple(tuple(tasks[(i + j) % n] for j in range(most)) for i in range(n))


def groups_name(groups: Groups) -> str:
    """``pairs``, ``each alone`` or ``groups of k``: what a row's label says about its merges."""
    size = len(groups[0])
    return {1: "each alone", 2: "pairs"}.get(size, f"groups of {size}")


def with_comparators(rows: Sequence[PlannedRow]) -> list[PlannedRow]:
    """``rows`` in blocks by group size (largest first), each opening with its comparator.

    A block of two or more tasks per group opens with :data:`COMPARATOR` on the same groups;
    rows of single tasks get none: their comparator is the ``individual`` row.
    """
    out: list[PlannedRow] = []
    for size in sorted({len(r.groups[0]) for r in rows if r.groups}, reverse=True):
        block = [r for r in rows if r.groups and len(r.groups[0]) == size]
        fits = COMPARATOR in METHODS and not METHODS.get(COMPARATOR).models_problem(size)
        if size >= 2 and fits:
            label = f"{COMPARATOR} ({groups_name(block[0].groups)})"
            out.append(PlannedRow(label, COMPARATOR, {}, block[0].groups))
        out += block
    return out


def aggregate(
    tasks: Sequence[str], groups: Groups, scored: Sequence[Mapping[str, Mapping[str, Any]]]
) -> dict[str, dict[str, Any]]:
    """Per task, its groups' scores combined: the mean score and per-example correctness.

    Args:
        tasks: The tier's tasks (the output's order).
        groups: The merged task groups.
        scored: Per group, ``{task: {"score", "correct", "predictions"}}`` for its own tasks
            (``DemoBench.score`` of that group's merge).

    Returns:
        ``{task: {"score", "correct", "predictions"}}``. A task in one group keeps that group's
        entry; otherwise ``score`` is the mean of the groups' scores, ``correct`` the per-example
        mean and ``predictions`` one entry per example, ``{"index", "gold", "preds"}`` with the
        prediction of each merge (``"a+b"``).

    Raises:
        ValueError: ``scored`` does not match ``groups``, or a task lies in no group.

    Example:
        >>> one = {"score": 1.0, "correct": [1, 1], "predictions": []}
        >>> half = {"score": 0.5, "correct": [1, 0], "predictions": []}
        >>> scored = [{"a": one, "b": one}, {"a": half, "b": one}]
        >>> aggregate(["a", "b"], (("a", "b"), ("b", "a")), scored)["a"]
        {'score': 0.75, 'correct': [1.0, 0.5], 'predictions': []}
    """
    if len(scored) != len(groups) or any(
        set(s) != set(g) for s, g in zip(scored, groups, strict=True)
    ):
        raise ValueError("aggregate: each group needs the scores of exactly its own tasks")
    out = {}
    for task in tasks:
        held = [(g, s[task]) for g, s in zip(groups, scored, strict=True) if task in g]
        if not held:
            raise ValueError(f"aggregate: task {task!r} lies in no group of {groups}")
        if len(held) == 1:
            out[task] = dict(held[0][1])
            continue
        correct = [
            math.fsum(c) / len(c) for c in zip(*(e["correct"] for _, e in held), strict=True)
        ]
        preds = [
            {
                "index": first["index"],
                "gold": first["gold"],
                "preds": {"+".join(g): e["predictions"][i]["pred"] for g, e in held},
            }
            for i, first in enumerate(held[0][1]["predictions"])
        ]
        score = math.fsum(e["score"] for _, e in held) / len(held)
        out[task] = {"score": score, "correct": correct, "predictions": preds}
    return out
