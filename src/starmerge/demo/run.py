"""The embedded merging benchmark, ``starmerge demo`` (run by ``make demo``); see docs/demo.md.

Real data, a real model, no network: one LoRA adapter per task, trained jointly with its linear
head on all-MiniLM-L6-v2 and cached (:mod:`starmerge.demo.train`), is merged by every
method in the registry; each merged backbone is scored with every task's own head. The base
backbone with the same heads is the lower bound, each adapter on its own task the upper bound.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from tqdm.auto import tqdm

from starmerge.demo.assets import default_tasks
from starmerge.demo.bench import DemoBench
from starmerge.demo.env import cpu_threads, default_cache_dir
from starmerge.demo.statistics import write_outputs
from starmerge.demo.train import Recipe, get_adapter, split_task, tier_module
from starmerge.eval.metrics import bootstrap_ci, normalized_score
from starmerge.methods import METHODS

__all__ = ["DECODER", "DECODER_FAST", "DEFAULTS", "FAST", "default_cache_dir", "run_demo"]

# Every linear layer of the encoder: "output.dense" is the attention output and the FFN out
# (PEFT matches name suffixes); a bare "dense" would also adapt the unused pooler.
ALL_LINEAR = ("query", "key", "value", "output.dense", "intermediate.dense")
#: What ``make demo`` runs; ``tasks=None``: the PyPI tasks plus the Debian ones present.
DEFAULTS = MappingProxyType(
    dict(
        tasks=None,
        steps=150,
        batch_size=16,
        n_train=1200,
        n_test=300,
        rank=8,
        alpha=16,
        targets=ALL_LINEAR,
        lr=2e-3,
        max_length=64,
        n_stats=64,
    )
)
#: 3 tasks, few steps: the integration test (~90 s on 2 shared cores, training included).
FAST = MappingProxyType(
    dict(
        tasks=["news", "langid", "chat_topic"],
        steps=30,
        batch_size=16,
        n_train=480,
        n_test=80,
        rank=8,
        alpha=16,
        targets=ALL_LINEAR,
        lr=3e-3,
        max_length=24,
        n_stats=16,
    )
)
#: ``--model gemma-270m``: the seed paper's setting (LoRA on q/v of a decoder, label words).
DECODER = MappingProxyType(
    dict(
        tasks=["news", "sentiment", "langid", "chat_topic", "kaomoji", "trivia"],
        steps=60,
        batch_size=8,
        n_train=480,
        n_test=100,
        rank=8,
        alpha=16,
        targets=("q_proj", "v_proj"),
        lr=1e-3,
        max_length=64,
        n_stats=32,
        model="gemma-270m",
    )
)
#: ``--model gemma-270m --fast``: 3 tasks, few steps (the slow integration test).
DECODER_FAST = MappingProxyType(
    dict(DECODER, tasks=["news", "langid", "trivia"], steps=12, n_train=96, n_test=24, n_stats=8)
)
ETAS = tuple(range(10, 101, 10))
CURVE_METHODS = ("simple_average", "task_arithmetic", "ties", "star")
CURVE_SUBSETS = 3  # random task subsets per number of tasks


def run_demo(
    *,
    tasks: list[str] | None = None,
    steps: int,
    batch_size: int,
    n_train: int,
    n_test: int,
    full: bool,
    out_dir: Path,
    cache_dir: Path | None,
    seed: int = 0,
    methods: list[str] | None = None,
    progress: bool = True,
    rank: int = 8,
    alpha: int = 16,
    targets: Sequence[str] = ALL_LINEAR,
    lr: float = 2e-3,
    max_length: int = 64,
    model: str = "minilm",
    n_stats: int = 64,
) -> dict[str, Any]:
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
    recipe = Recipe(
        model=model,
        rank=rank,
        alpha=alpha,
        targets=tuple(targets),
        lr=lr,
        steps=steps,
        batch_size=batch_size,
        max_length=max_length,
        n_train=n_train,
    )
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    with cpu_threads() as threads:
        start = time.perf_counter()
        names = list(tasks) if tasks else default_tasks()
        load = tier_module(model).load_demo_task
        splits = {t: split_task(load(t), n_train, n_test, seed) for t in names}
        adapters = {t: get_adapter(cache, splits[t][0], recipe, seed, progress) for t in names}
        trained = time.perf_counter()
        bench = DemoBench(
            recipe,
            adapters,
            {t: splits[t][1] for t in names},
            cache,
            seed,
            progress,
            {t: splits[t][0] for t in names},
            n_stats,
        )
        results = bench.evaluate(methods, full, {t: len(s[0]) for t, s in splits.items()})
        data = results.to_json()
        for row in data["rows"]:  # a row over task groups says which (demo/pairs.py)
            if row["name"] in bench.merges:
                row["merges"] = bench.merges[row["name"]]
        data.update(skipped=bench.skipped, failed=bench.failed, data_used=bench.data_used)
        if full:
            data.update(sweeps(bench, data))
        now = time.perf_counter()
        data["timing"] = {
            "train_s": round(trained - start, 2),
            "eval_s": round(now - trained, 2),
            "total_s": round(now - start, 2),
            "threads": threads,
            "merge_s": bench.merge_s,
            "merge_peak_bytes": bench.merge_peak_bytes,
            "stats_s": bench.stats.seconds,
            "stats_peak_bytes": bench.stats.peak_bytes,
            "trained": [t for t in names if adapters[t].meta["fresh"]],
        }
    stem = f"{bench.tier.suite}-{results.run_id()}"
    data["files"] = write_outputs(data, Path(out_dir), stem, progress)
    return data


def sweeps(bench: DemoBench, data: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The STAR eta sweep (all tasks) and the normalized score per number of merged tasks."""
    individual = next(r["scores"] for r in data["rows"] if r["name"] == "individual")
    names = list(bench.adapters)
    jobs = [("star", tuple(names), {"eta": float(e)}) for e in ETAS if "star" in METHODS]
    rng = random.Random(bench.seed)
    for k in range(2, len(names) + 1):
        subsets = list(itertools.combinations(names, k))
        for subset in rng.sample(subsets, min(CURVE_SUBSETS, len(subsets))):
            jobs += [(m, subset, {}) for m in CURVE_METHODS if m in METHODS]
    out: dict[str, list[dict[str, Any]]] = {"eta_sweep": [], "curve": []}
    for method, subset, params in tqdm(jobs, "sweeps", disable=not bench.progress, leave=False):
        scored = bench.score(bench.merge(method, subset, params), subset)
        correct = {t: s["correct"] for t, s in scored.items()}
        point = {
            "method": method,
            **params,
            "n_tasks": len(subset),
            "tasks": list(subset),
            "normalized": normalized_score({t: s["score"] for t, s in scored.items()}, individual),
            "ci": list(bootstrap_ci(correct, individual, seed=bench.seed)),
        }
        out["eta_sweep" if params else "curve"].append(point)
    return out
