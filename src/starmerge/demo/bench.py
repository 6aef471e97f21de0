"""One demo run's bench: the tier's model, test sets, adapters and statistics.

:class:`DemoBench` merges task adapters with ``starmerge.api.merge_deltas``, scores the patched
model on each task's test set (predictions cached under a hash of the exact patched weights) and
collects the base, individual and per-method rows into a ``Results``. The loop that drives it is
:func:`starmerge.demo.run.run_demo`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import Tensor
from tqdm.auto import tqdm

from starmerge.api import merge_deltas
from starmerge.demo.assets import TaskData
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
        collected first, outside both) go to ``merge_s`` and ``merge_peak_bytes``.
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
            self.merge_s[row] = round(time.perf_counter() - start, 3)
            self.merge_peak_bytes[row] = max(0, memory.peak - at_start)
        return merged.deltas

    def _base(self, deltas: Sequence[Mapping[str, Delta]]) -> dict[str, Tensor]:
        """The backbone's own tensor of every merged key (for methods that need the base)."""
        params = dict(self.tier.module.named_parameters())
        return {k: params[k].detach() for d in deltas for k in d}

    def plan(self, methods: list[str] | None) -> list[tuple[str, str, dict[str, Any]]]:
        """(row name, method, parameters) per merge.

        Skipped: data the demo cannot provide, or a method that does not merge this many
        models (SLERP: two at most).
        """
        names = METHODS.names() if methods is None else methods
        candidates = [(name, name, {}) for name in names] + [
            (" ".join([name, *(f"{k}={v}" for k, v in given.items())]), name, given)
            for name, given in EXTRA_ROWS
            if name in names
        ]
        rows = []
        for label, name, given in candidates:
            method = METHODS.get(name)
            params = {k: v for k, v in given.items() if k != SPACE}
            unavailable = self.stats.unavailable(name, method.resolve(params))
            if unavailable or method.models_problem(len(self.adapters)):
                self.skipped.append(label)
            else:
                rows.append((label, name, params, given.get(SPACE)))
        out = []
        for label, name, params, space in rows:
            resolved = METHODS.get(name).resolve(params)
            shown = {k: v for k, v in resolved.items() if v is not None}
            out.append((label, name, shown if space is None else {**shown, SPACE: space}))
        return out

    def evaluate(self, methods: list[str] | None, full: bool, n_train: Mapping[str, int]):
        """A ``Results`` with base, individual and one row per merge."""
        plan, names = self.plan(methods), list(self.adapters)
        config = {
            "recipe": asdict(self.recipe),
            "full": full,
            "rows": [r[0] for r in plan],
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
        for row, method, params in plan:
            bar.set_postfix_str(row)
            try:
                merged = self.merge(method, names, params, row)
                self.data_used[row] = self.stats.used(method, params)
                add(row, self.score(merged, names), method, params)
            except (StarmergeError, NotImplementedError, ValueError, RuntimeError) as err:
                self.failed[row] = f"{type(err).__name__}: {err}"
                print(f"warning: demo: {row} failed: {self.failed[row]}", file=sys.stderr)
                bar.update()
        bar.close()
        return results


def _digest(parts: Iterable[Any]) -> str:
    """A short hash of tensors (their exact values) and other objects (their repr)."""
    digest = hashlib.blake2b(digest_size=12)
    for p in parts:
        blob = p.detach().float().numpy().tobytes() if isinstance(p, Tensor) else repr(p).encode()
        digest.update(blob)
    return digest.hexdigest()
