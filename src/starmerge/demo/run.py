"""The embedded merging benchmark, ``starmerge demo`` (run by ``make demo``); see docs/demo.md.

Real data, a real model, no network: one LoRA adapter per task, trained jointly with its linear
head on all-MiniLM-L6-v2 and cached (:mod:`starmerge.demo.train`), is merged by every
method in the registry; each merged backbone is scored with every task's own head. The base
backbone with the same heads is the lower bound, each adapter on its own task the upper bound.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from types import MappingProxyType
from typing import Any

from torch import Tensor
from tqdm.auto import tqdm

from starmerge.errors import StarmergeError
from starmerge.demo.assets import TaskData, default_tasks
from starmerge.demo.statistics import write_outputs
from starmerge.demo.env import cpu_threads, default_cache_dir
from starmerge.demo.train import (
    Recipe,
    TaskAdapter,
    applied,
    get_adapter,
    split_task,
    tier_module,
)
from starmerge.tensors.delta import Delta

__all__ = ["DECODER", "DECODER_FAST", "DEFAULTS", "FAST", "default_cache_dir", "run_demo"]

# Every linear layer of the encoder: "output.dense" is the attention output and the FFN out
# (PEFT matches name suffixes); a bare "dense" would also adapt the unused pooler.
ALL_LINEAR = ("query", "key", "value", "output.dense", "intermediate.dense")
#: What ``make demo`` runs; ``tasks=None``: the PyPI tasks plus the Debian ones present.
DEFAULTS = MappingProxyType(dict(
    tasks=None, steps=150, batch_size=16, n_train=1200, n_test=300, rank=8, alpha=16,
    targets=ALL_LINEAR, lr=2e-3, max_length=64, n_stats=64))  # fmt: skip
#: 3 tasks, few steps: the integration test (~90 s on 2 shared cores, training included).
FAST = MappingProxyType(dict(
    tasks=["news", "langid", "chat_topic"], steps=30, batch_size=16, n_train=480, n_test=80,
    rank=8, alpha=16, targets=ALL_LINEAR, lr=3e-3, max_length=24, n_stats=16))  # fmt: skip
#: ``--model gemma-270m``: the seed paper's setting (LoRA on q/v of a decoder, label words).
DECODER = MappingProxyType(dict(
    tasks=["news", "sentiment", "langid", "chat_topic", "kaomoji", "trivia"], steps=60,
    batch_size=8, n_train=480, n_test=100, rank=8, alpha=16, targets=("q_proj", "v_proj"),
    lr=1e-3, max_length=64, n_stats=32, model="gemma-270m"))  # fmt: skip
#: ``--model gemma-270m --fast``: 3 tasks, few steps (the slow integration test).
DECODER_FAST = MappingProxyType(dict(DECODER, tasks=["news", "langid", "trivia"], steps=12,
                                     n_train=96, n_test=24, n_stats=8))  # fmt: skip
#: Rows beside every method at its defaults: task arithmetic at a commonly tuned scaling, and
#: Localize-and-Stitch with masks trained on each task's training items (demo_masks).
EXTRA_ROWS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("task_arithmetic", {"scaling": 0.3}), ("localize_stitch", {"mode": "trained"}))  # fmt: skip
ETAS = tuple(range(10, 101, 10))
CURVE_METHODS = ("simple_average", "task_arithmetic", "ties", "star")
CURVE_SUBSETS = 3  # random task subsets per number of tasks
EVAL_VERSION = 1  # bump when evaluation changes: cached predictions are keyed by it


def run_demo(*, tasks: list[str] | None = None, steps: int, batch_size: int, n_train: int,
             n_test: int, full: bool, out_dir: Path, cache_dir: Path | None, seed: int = 0,
             methods: list[str] | None = None, progress: bool = True, rank: int = 8,
             alpha: int = 16, targets: Sequence[str] = ALL_LINEAR, lr: float = 2e-3,
             max_length: int = 64, model: str = "minilm", n_stats: int = 64,
             ) -> dict[str, Any]:  # fmt: skip
    """Train (or load) the task adapters, merge with every method, evaluate and report.

    Args:
        tasks: Task names (``None``: every PyPI task plus the Debian ones present).
        steps: Training steps per task (the recipe: also ``batch_size``, ``rank``, ``alpha``,
            ``targets``, ``lr`` and ``max_length``, which also truncates evaluation).
        batch_size: Training batch size.
        n_train: Training items per task.
        n_test: Test items per task.
        full: Also run the STAR eta sweep and the number-of-tasks curve.
        out_dir: Where the results JSON, table, plots and report go.
        cache_dir: Adapter cache (``None``: :func:`default_cache_dir`).
        seed: Seeds the data split, the training and the bootstrap.
        methods: Registry names to run (``None``: every method; the data-driven ones get
            statistics from ``n_stats`` training items per task).
        progress: Show progress bars, then print the table and the written files.
        rank: LoRA rank.
        alpha: LoRA alpha.
        targets: Module names LoRA adapts.
        lr: Learning rate.
        max_length: Token limit.
        model: The backbone: ``minilm`` or ``gemma-270m`` (the decoder tier, :data:`DECODER`).
        n_stats: Training items per task the data methods' statistics are collected on.

    Returns:
        The results dict as written to JSON, plus ``skipped``, ``failed``, ``timing``,
        ``files`` and with ``full`` ``eta_sweep`` and ``curve``.

    Example:
        >>> data = run_demo(**FAST, full=False, out_dir=Path("results/demo"), cache_dir=None)
        >>> [row["name"] for row in data["rows"]][:2]
        ['base', 'individual']
    """
    recipe = Recipe(model=model, rank=rank, alpha=alpha, targets=tuple(targets), lr=lr,
                    steps=steps, batch_size=batch_size, max_length=max_length,
                    n_train=n_train)  # fmt: skip
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    with cpu_threads() as threads:
        start = time.perf_counter()
        names = list(tasks) if tasks else default_tasks()
        load = tier_module(model).load_task
        splits = {t: split_task(load(t), n_train, n_test, seed) for t in names}
        adapters = {t: get_adapter(cache, splits[t][0], recipe, seed, progress) for t in names}
        trained = time.perf_counter()
        demo = _Demo(recipe, adapters, {t: splits[t][1] for t in names}, cache, seed, progress,
                     {t: splits[t][0] for t in names}, n_stats)  # fmt: skip
        results = demo.evaluate(methods, full, {t: len(s[0]) for t, s in splits.items()})
        data = results.to_json()
        data.update(skipped=demo.skipped, failed=demo.failed, data_used=demo.data_used)
        if full:
            data.update(demo.sweeps(data))
        now = time.perf_counter()
        data["timing"] = {"train_s": round(trained - start, 2),
                          "eval_s": round(now - trained, 2), "total_s": round(now - start, 2),
                          "threads": threads, "merge_s": demo.merge_s,
                          "merge_peak_bytes": demo.merge_peak_bytes,
                          "stats_s": demo.stats.seconds, "stats_peak_bytes": demo.stats.peak_bytes,
                          "trained": [t for t in names if adapters[t].meta["fresh"]]}  # fmt: skip
    stem = f"{demo.tier.suite}-{results.run_id()}"
    data["files"] = write_outputs(data, Path(out_dir), stem, progress)
    return data


class _Demo:
    """The tier's model, test sets, adapters and statistics; evaluates rows and sweeps."""

    def __init__(self, recipe: Recipe, adapters: Mapping[str, TaskAdapter],
                 tests: Mapping[str, TaskData], cache: Path, seed: int, progress: bool,
                 train: Mapping[str, TaskData], n_stats: int):  # fmt: skip
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
            out[task] = {"score": sum(correct) / len(correct), "correct": correct,
                         "predictions": [{"index": i, "pred": p, "gold": g}
                                         for i, (p, g) in enumerate(shown)]}  # fmt: skip
        return out

    def predict(self, deltas: Mapping[str, Delta], tasks: Sequence[str]) -> dict[str, list[int]]:
        """Predicted label indices per task; cached under a hash of the patched weights."""
        # Dense -> (tensor,), LowRank -> (b, a, scale): the patched weights, exactly.
        digest = _digest(x for key in sorted(deltas) for x in (key, *vars(deltas[key]).values()))
        paths = {t: self.eval_dir / f"{t}-{self.test_keys[t]}-{digest}.json"
                 for t in tasks}  # fmt: skip
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

    def merge(self, method: str, tasks: Sequence[str], params: Mapping[str, Any],
              row: str | None = None):  # fmt: skip
        """The merged delta of ``tasks``' adapters (``starmerge.api.merge_deltas``).

        With ``row``, the merge's own time and peak memory above the start (statistics are
        collected first, outside both) go to ``merge_s`` and ``merge_peak_bytes``.
        """
        from starmerge.api import merge_deltas
        from starmerge.memory import PeakMemory, rss_anon_bytes

        params = self.stats.complete(method, tasks, params)  # + statistics, when needed
        start, at_start = time.perf_counter(), rss_anon_bytes() or 0
        with PeakMemory() as memory:
            merged = merge_deltas(method, [self.adapters[t].deltas for t in tasks], params)
        if row is not None:
            self.merge_s[row] = round(time.perf_counter() - start, 3)
            self.merge_peak_bytes[row] = max(0, memory.peak - at_start)
        return merged.deltas

    def plan(self, methods: list[str] | None) -> list[tuple[str, str, dict[str, Any]]]:
        """(row name, method, parameters) per merge; skipped: data the demo cannot provide."""
        from starmerge.methods import METHODS

        names = METHODS.names() if methods is None else methods
        candidates = [(name, name, {}) for name in names] + [
            (" ".join([name, *(f"{k}={v}" for k, v in given.items())]), name, given)
            for name, given in EXTRA_ROWS if name in names]  # fmt: skip
        rows = []
        for label, name, given in candidates:
            if self.stats.unavailable(name, METHODS.get(name).resolve(given)):
                self.skipped.append(label)
            else:
                rows.append((label, name, given))
        resolved = [(r, m, METHODS.get(m).resolve(p)) for r, m, p in rows]
        return [(r, m, {k: v for k, v in p.items() if v is not None}) for r, m, p in resolved]

    def evaluate(self, methods: list[str] | None, full: bool, n_train: Mapping[str, int]):
        """A ``Results`` with base, individual and one row per merge."""
        from starmerge.eval.results import Results

        plan, names = self.plan(methods), list(self.adapters)
        config = {"recipe": asdict(self.recipe), "full": full, "rows": [r[0] for r in plan],
                  "skipped": self.skipped}  # fmt: skip
        results = Results(self.tier.suite, self.tier.model_label, seed=self.seed, config=config)
        for task, test in self.tests.items():
            results.add_task(task, self.tier.metric(test), len(test), labels=list(test.label_names),
                             n_train=n_train[task], source=test.source,
                             adapter=self.adapters[task].path.name)  # fmt: skip
        bar = tqdm(total=2 + len(plan), desc="evaluate", disable=not self.progress, leave=False)

        def add(name: str, scored: Mapping[str, Any], method=None, parameters=None) -> None:
            results.add_row(name, {t: s["score"] for t, s in scored.items()}, method, parameters,
                            predictions={t: s["predictions"] for t, s in scored.items()},
                            correct={t: s["correct"] for t, s in scored.items()})  # fmt: skip
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

    def sweeps(self, data: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
        """The STAR eta sweep (all tasks) and the normalized score per number of merged tasks."""
        from starmerge.eval.metrics import bootstrap_ci, normalized_score
        from starmerge.methods import METHODS

        individual = next(r["scores"] for r in data["rows"] if r["name"] == "individual")
        names = list(self.adapters)
        jobs = [("star", tuple(names), {"eta": float(e)}) for e in ETAS if "star" in METHODS]
        rng = random.Random(self.seed)
        for k in range(2, len(names) + 1):
            subsets = list(itertools.combinations(names, k))
            for subset in rng.sample(subsets, min(CURVE_SUBSETS, len(subsets))):
                jobs += [(m, subset, {}) for m in CURVE_METHODS if m in METHODS]
        out: dict[str, list[dict[str, Any]]] = {"eta_sweep": [], "curve": []}
        for method, subset, params in tqdm(jobs, "sweeps", disable=not self.progress, leave=False):
            scored = self.score(self.merge(method, subset, params), subset)
            point = {"method": method, **params, "n_tasks": len(subset), "tasks": list(subset),
                     "normalized": normalized_score({t: s["score"] for t, s in scored.items()},
                                                    individual),
                     "ci": list(bootstrap_ci({t: s["correct"] for t, s in scored.items()},
                                             individual, seed=self.seed))}  # fmt: skip
            out["eta_sweep" if params else "curve"].append(point)
        return out


def _digest(parts: Iterable[Any]) -> str:
    """A short hash of tensors (their exact values) and other objects (their repr)."""
    digest = hashlib.blake2b(digest_size=12)
    for p in parts:
        blob = p.detach().float().numpy().tobytes() if isinstance(p, Tensor) else repr(p).encode()
        digest.update(blob)
    return digest.hexdigest()
