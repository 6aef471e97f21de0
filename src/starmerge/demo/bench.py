"""One demo run's bench: the tier's model, test sets, adapters and statistics.

:class:`DemoBench` merges task adapters with ``starmerge.api.merge_deltas``, scores the patched
model on each task's test set (predictions cached under a hash of the exact patched weights) and
collects the base, individual and per-method rows into a ``Results``; a method that merges fewer
models than there are tasks gets a row over task groups (:mod:`starmerge.demo.pairs`). The loop
that drives it is :func:`starmerge.demo.run.run_demo`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from torch import Tensor
from tqdm.auto import tqdm

from starmerge.api import merge_deltas
from starmerge.demo.assets import TaskData
from starmerge.demo.pairs import PlannedRow, aggregate, groups_name, task_groups, with_comparators
from starmerge.demo.train import Recipe, TaskAdapter, applied, tier_module
from starmerge.errors import StarmergeError
from starmerge.eval.results import Results
from starmerge.memory import PeakMemory, rss_anon_bytes
from starmerge.methods import METHODS
from starmerge.tensors.delta import Delta

#: Rows beside every method at its defaults: task arithmetic at a commonly tuned scaling, and
#: Localize-and-Stitch with masks trained on each task's training items (demo_masks).
#: Rows with ``space`` merge in that LoRA merge space (docs/spaces.md), the method's defaults.
EXTRA_ROWS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("task_arithmetic", {"scaling": 0.3}),
    ("localize_stitch", {"mode": "trained"}),
    ("ties", {"space": "core"}),
    ("ties", {"space": "knots"}),
    ("tsv_m", {"space": "core"}),
    ("tsv_m", {"space": "knots"}),
)
SPACE = "space"  # a row's merge space, given beside the method's parameters
EVAL_VERSION = 1  # bump when evaluation changes: cached predictions are keyed by it


class DemoBench:
    """The tier's model, test sets, adapters and statistics; merges, scores and evaluates rows."""

    def __init__(
        self,
        recipe: Recipe,
        adapters: Mapping[str, TaskAdapter],
        tests: Mapping[str, TaskData],
        cache: Path,
        seed: int,
        progress: bool,
        train: Mapping[str, TaskData],
        n_stats: int,
    ):
        self.recipe, self.adapters, self.seed, self.progress = recipe, adapters, seed, progress
        self.skipped: list[str] = []
        self.failed: dict[str, str] = {}
        self.merge_s: dict[str, float] = {}
        self.merge_peak_bytes: dict[str, int] = {}
        self.data_used: dict[str, dict[str, Any]] = {}
        self.merges: dict[str, list[list[str]]] = {}  # row -> its task groups (pairs.py)
        self.tier = tier_module(recipe.model).make_tier(recipe, adapters, cache)
        # Statistics for the data methods, from n_stats of each task's *training* items.
        self.stats = self.tier.statistics(adapters, train, cache, n_stats, seed, recipe)
        # Sorted by length so that batches pad little; this order is the test set's order.
        self.tests, self.test_keys, how = {}, {}, sorted(asdict(recipe).items())
        for task, test in tests.items():
            test = self.tests[task] = self.tier.order(test)
            self.test_keys[task] = _digest([EVAL_VERSION, how, adapters[task].path.name, test])
        self.eval_dir = cache / "demo" / recipe.model / "evals"

    def score(self, deltas: Mapping[str, Delta], tasks: Sequence[str]) -> dict[str, Any]:
        """Score, per-example 0/1 and predictions of base + ``deltas`` on ``tasks``."""
        out = {}
        for task, preds in self.predict(deltas, tasks).items():
            test = self.tests[task]
            checked = [self.tier.correct(test, i, p) for i, p in enumerate(preds)]
            correct = [c for c, _ in checked]
            golds = [test.label_names[g] for g in test.labels]
            shown = [(text, gold) for (_, text), gold in zip(checked, golds, strict=True)]
            out[task] = {
                "score": sum(correct) / len(correct),
                "correct": correct,
                "predictions": [
                    {"index": i, "pred": p, "gold": g} for i, (p, g) in enumerate(shown)
                ],
            }
        return out

    def predict(self, deltas: Mapping[str, Delta], tasks: Sequence[str]) -> dict[str, list[int]]:
        """Predicted label indices per task; cached under a hash of the patched weights."""
        # Dense -> (tensor,), LowRank -> (b, a, scale): the patched weights, exactly.
        digest = _digest(x for key in sorted(deltas) for x in (key, *vars(deltas[key]).values()))
        paths = {t: self.eval_dir / f"{t}-{self.test_keys[t]}-{digest}.json" for t in tasks}
        missing = [t for t in tasks if not paths[t].is_file()]
        if missing:
            self.eval_dir.mkdir(parents=True, exist_ok=True)
            with applied(self.tier.module, deltas):
                for task in missing:
                    preds = self.tier.predict(task, self.tests[task])
                    tmp = paths[task].with_suffix(f".tmp{os.getpid()}")
                    tmp.write_text(json.dumps(preds))
                    os.replace(tmp, paths[task])
        return {t: json.loads(paths[t].read_text()) for t in tasks}

    def merge(
        self, method: str, tasks: Sequence[str], params: Mapping[str, Any], row: str | None = None
    ):
        """The merged delta of ``tasks``' adapters (``starmerge.api.merge_deltas``).

        With ``row``, the merge's own time and peak memory above the start (statistics are
        collected first, outside both) go to ``merge_s`` and ``merge_peak_bytes``: summed, and
        the largest, over a row's merges (rows of task groups merge once per group).
        """
        params = dict(params)
        space = params.pop(SPACE, "full")
        params = self.stats.complete(method, tasks, params)  # + statistics, when needed
        start, at_start = time.perf_counter(), rss_anon_bytes() or 0
        deltas = [self.adapters[t].deltas for t in tasks]
        base = self._base(deltas) if METHODS.get(method).needs_base else None
        with PeakMemory() as memory:
            merged = merge_deltas(method, deltas, params, base=base, space=space)
        if row is not None:
            seconds = self.merge_s.get(row, 0.0) + time.perf_counter() - start
            self.merge_s[row] = round(seconds, 3)
            peak = max(0, memory.peak - at_start)
            self.merge_peak_bytes[row] = max(peak, self.merge_peak_bytes.get(row, 0))
        return merged.deltas

    def _base(self, deltas: Sequence[Mapping[str, Delta]]) -> dict[str, Tensor]:
        """The backbone's own tensor of every merged key (for methods that need the base)."""
        params = dict(self.tier.module.named_parameters())
        return {k: params[k].detach() for d in deltas for k in d}

    def plan(self, methods: list[str] | None) -> list[PlannedRow]:
        """The merges, in order: the rows of all tasks at once, then those of task groups.

        A method that merges fewer models than there are tasks (its registry entry's
        ``n_models``: SLERP two, NearSwap one) gets a row over task groups, after a comparator
        row on the same groups (:mod:`starmerge.demo.pairs`). Skipped: data the demo cannot
        provide, or a method that needs more models than there are tasks.
        """
        names = METHODS.names() if methods is None else methods
        candidates = [(name, name, {}) for name in names] + [
            (" ".join([name, *(f"{k}={v}" for k, v in given.items())]), name, given)
            for name, given in EXTRA_ROWS
            if name in names
        ]
        whole, partial = [], []
        for label, name, given in candidates:
            method = METHODS.get(name)
            params = {k: v for k, v in given.items() if k != SPACE}
            groups = task_groups(method.n_models, list(self.adapters))
            if self.stats.unavailable(name, method.resolve(params)) or groups == ():
                self.skipped.append(label)
            elif groups is None:
                whole.append(PlannedRow(label, name, given))
            else:
                partial.append(PlannedRow(f"{label} ({groups_name(groups)})", name, given, groups))
        return [_shown(row) for row in [*whole, *with_comparators(partial)]]

    def score_groups(self, row: PlannedRow) -> dict[str, Any]:
        """Merge each of ``row``'s task groups, score it on its own tasks and combine per task.

        A task's score is the mean over the groups that hold it (:func:`pairs.aggregate`).
        """
        scored = [
            self.score(self.merge(row.method, g, row.params, row.label), g) for g in row.groups
        ]
        return aggregate(list(self.adapters), row.groups, scored)

    def evaluate(self, methods: list[str] | None, full: bool, n_train: Mapping[str, int]):
        """A ``Results`` with base, individual and one row per merge."""
        plan, names = self.plan(methods), list(self.adapters)
        config = {
            "recipe": asdict(self.recipe),
            "full": full,
            "rows": [r.label for r in plan],
            "skipped": self.skipped,
        }
        results = Results(self.tier.suite, self.tier.model_label, seed=self.seed, config=config)
        for task, test in self.tests.items():
            results.add_task(
                task,
                self.tier.metric(test),
                len(test),
                labels=list(test.label_names),
                n_train=n_train[task],
                source=test.source,
                adapter=self.adapters[task].path.name,
            )
        bar = tqdm(total=2 + len(plan), desc="evaluate", disable=not self.progress, leave=False)

        def add(name: str, scored: Mapping[str, Any], method=None, parameters=None) -> None:
            results.add_row(
                name,
                {t: s["score"] for t, s in scored.items()},
                method,
                parameters,
                predictions={t: s["predictions"] for t, s in scored.items()},
                correct={t: s["correct"] for t, s in scored.items()},
            )
            bar.update()

        add("base", self.score({}, names))
        add("individual", {t: self.score(self.adapters[t].deltas, [t])[t] for t in names})
        for row in plan:
            bar.set_postfix_str(row.label)
            try:
                if row.groups is None:
                    merged = self.merge(row.method, names, row.params, row.label)
                    scored = self.score(merged, names)
                else:
                    scored = self.score_groups(row)
                    self.merges[row.label] = [list(g) for g in row.groups]
                self.data_used[row.label] = self.stats.used(row.method, row.params)
                add(row.label, scored, row.method, row.params)
            except (StarmergeError, NotImplementedError, ValueError, RuntimeError) as err:
                why = self.failed[row.label] = f"{type(err).__name__}: {err}"
                self.merge_s.pop(row.label, None)  # a row of groups may fail after some merges
                self.merge_peak_bytes.pop(row.label, None)
                print(f"warning: demo: {row.label} failed: {why}", file=sys.stderr)
                bar.update()
        bar.close()
        return results


def _shown(row: PlannedRow) -> PlannedRow:
    """``row`` with its method's resolved parameters (None dropped) and its ``space``, if any."""
    given = {k: v for k, v in row.params.items() if k != SPACE}
    resolved = METHODS.get(row.method).resolve(given)
    shown = {k: v for k, v in resolved.items() if v is not None}
    space = {SPACE: row.params[SPACE]} if SPACE in row.params else {}
    return replace(row, params={**shown, **space})


def _digest(parts: Iterable[Any]) -> str:
    """A short hash of tensors (their exact values) and other objects (their repr)."""
    digest = hashlib.blake2b(digest_size=12)
    for p in parts:
        blob = p.detach().float().numpy().tobytes() if isinstance(p, Tensor) else repr(p).encode()
        digest.update(blob)
    return digest.hexdigest()
