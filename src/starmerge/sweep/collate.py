"""Turn stored job records into results files (the harness contract) and summary tables.

For each merged task set: one results JSON (``starmerge.eval.results.Results``) with the rows
``base`` and ``individual`` (assembled from the per-task bound jobs), then one row per method
and parameters; normalized scores and bootstrap CIs are computed there. Data-driven rows also put
the training data of each task (source, rows drawn, statistics entry) under ``config.data``.
Tables are pure functions of those dicts.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from starmerge.eval.results import Results
from starmerge.eval.runner import TaskResult
from starmerge.suites import SeedTable, Suite
from starmerge.suites.scoring import bootstrap_samples
from starmerge.sweep.jobs import Job, RunOptions

Pair = tuple[Job, Mapping[str, Any]]  # a job and its stored record


def ordered_tasks(suite: Suite, tasks: Sequence[str]) -> list[str]:
    """``tasks`` in the suite's order (the seed tables' column order)."""
    wanted = set(tasks)
    return [t for t in suite.tasks if t in wanted]


def _row_name(job: Job, multi: bool) -> str:
    if not multi or not job.params:
        return str(job.method)
    return f"{job.method} ({', '.join(f'{k}={v}' for k, v in sorted(job.params.items()))})"


def _add(res: Results, name: str, parts: Mapping[str, Mapping[str, Any]], job: Job | None) -> None:
    results = {
        t: TaskResult(p["metric"], p["score"], p["n"], list(p.get("predictions", [])))
        for t, p in parts.items()
    }
    for task, r in results.items():
        if task not in res.tasks:
            res.add_task(task, r.metric, r.n, version=parts[task].get("version"))
    kwargs = {} if job is None else {"method": job.method, "parameters": dict(job.params)}
    res.add_row(
        name,
        {t: r.score for t, r in results.items()},
        predictions={t: r.predictions for t, r in results.items()},
        correct={t: bootstrap_samples(r) for t, r in results.items()},
        **kwargs,
    )


def build_results(
    suite: Suite,
    tasks: Sequence[str],
    pairs: Sequence[Pair],
    options: RunOptions,
    methods: Sequence[str] = (),
) -> Results:
    """The results file of one task set: bounds (where every task has one) and its merges.

    Merge rows come in the order of ``methods`` (then any other method, by name).
    """
    tasks = ordered_tasks(suite, tasks)
    key = tuple(sorted(tasks))
    config = {
        "tasks": tasks,
        "options": asdict(options.resolved(suite)),
        "fingerprint": suite.fingerprint(tasks),
    }
    res = Results(suite=suite.name, model=suite.base_model, seed=0, config=config)
    for kind in ("base", "individual"):
        parts = {
            job.tasks[0]: rec["results"][job.tasks[0]]
            for job, rec in pairs
            if job.kind == kind and job.tasks[0] in tasks
        }
        if len(parts) == len(tasks):
            _add(res, kind, {t: parts[t] for t in tasks}, None)
    merges = [(j, r) for j, r in pairs if j.kind == "merge" and j.tasks == key]
    rank = {m: i for i, m in enumerate(methods)}
    merges.sort(key=lambda p: (rank.get(str(p[0].method), len(rank)), str(p[0].method)))
    counts: dict[str, int] = defaultdict(int)
    for job, _ in merges:
        counts[str(job.method)] += 1
    data = {}
    for job, rec in merges:
        parts = {t: rec["results"][t] for t in tasks}
        name = _row_name(job, counts[str(job.method)] > 1)
        _add(res, name, parts, job)
        if job.data is not None:  # the training examples each task's statistics came from
            data[name] = {
                "options": dict(job.data),
                "tasks": dict(rec.get("merge_stats", {}).get("data", {})),
            }
    if data:
        res.config["data"] = data
    return res


def _num(value: float | None, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:.2f}"


def seed_markdown(results: Mapping[str, Any], seed: SeedTable | None = None) -> str:
    """The seed README's table layout: ``Avg. Normalized`` then per-task scores x100.

    With ``seed``, each cell reads ``ours (seed)`` where the seed README has a number.
    """
    tasks = list(results["tasks"])
    header = ["Model", "Avg. Normalized", *tasks, "95% CI"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    rows = sorted(results["rows"], key=lambda r: {"base": 0, "individual": 1}.get(r["name"], 2))
    for row in rows:
        ref = (seed.rows.get(row.get("method") or row["name"]) if seed else None) or {}
        norm = 100.0 if row["name"] == "individual" else row.get("normalized")
        cells = [row["name"], _pair(norm, ref.get("normalized"))]
        ref_scores = ref.get("scores") or {}
        cells += [
            _pair(None if t not in row["scores"] else row["scores"][t] * 100, ref_scores.get(t))
            for t in tasks
        ]
        ci = row.get("ci")
        cells.append(f"[{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pair(ours: float | None, seed: float | None) -> str:
    return _num(ours) if seed is None else f"{_num(ours)} ({seed:.2f})"


def summary_rows(all_results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One line per merged row of every task set: method, parameters, tasks, scores."""
    out = []
    for res in all_results:
        for row in res["rows"]:
            if row.get("method") is None:
                continue
            scores = row["scores"]
            out.append(
                {
                    "method": row["method"],
                    "parameters": row.get("parameters", {}),
                    "n_tasks": len(scores),
                    "tasks": sorted(scores),
                    "avg": 100 * sum(scores.values()) / len(scores),
                    "normalized": row.get("normalized"),
                    "ci": row.get("ci"),
                }
            )
    return out


def summary_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Mean normalized score per method, parameters and task-set size (over the sets)."""
    groups: dict[tuple[str, str, int], list[float | None]] = defaultdict(list)
    for r in rows:
        params = json.dumps(r["parameters"], sort_keys=True)
        groups[(r["method"], params, r["n_tasks"])].append(r["normalized"])
    lines = [
        "| method | parameters | tasks | sets | mean normalized | min | max |",
        "|:---|:---|---:|---:|---:|---:|---:|",
    ]
    for (method, params, size), values in sorted(groups.items()):
        vals = [v for v in values if v is not None]
        stats = [statistics.mean(vals), min(vals), max(vals)] if vals else [None] * 3
        cells = [method, params, str(size), str(len(values)), *(_num(v) for v in stats)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
