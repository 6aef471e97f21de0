"""PNG plots of results (matplotlib's Agg canvas, imported only when a plot is drawn).

The figures are built with ``matplotlib.figure.Figure`` and ``FigureCanvasAgg`` directly, so
no global pyplot state or GUI backend is touched (safe in threads, servers and tests).
"""

from __future__ import annotations

import textwrap
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from starmerge.report.tables import row_label

INDIVIDUAL_COLOR, BASE_COLOR = "#2a9d8f", "#6c757d"
MERGED_COLOR, GROUPS_COLOR = "#457b9d", "#a8c5da"  # all tasks at once; task groups (``merges``)


def _figure(width: float = 7.0, height: float = 4.0) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, out_png: str | Path) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def _short(label: str, width: int = 16, lines: int = 4) -> str:
    """``label`` wrapped to ``lines`` lines of ``width`` characters (cut with an ellipsis)."""
    wrapped = textwrap.wrap(label, width) or [label]
    if len(wrapped) > lines:
        wrapped = [*wrapped[: lines - 1], wrapped[lines - 1][: width - 1] + "\u2026"]
    return "\n".join(wrapped)


def _merged_bars(results_list: Sequence[Mapping[str, Any]]) -> list[tuple[str, float, Any, str]]:
    """(label, normalized, ci, color) of every row except base and individual, across files."""
    several = len({r.get("suite") for r in results_list}) > 1
    bars = []
    for res in results_list:
        for row in res["rows"]:
            if row["name"] in ("base", "individual") or row.get("normalized") is None:
                continue
            label = _short(row_label(row)) + (f"\n[{res.get('suite')}]" if several else "")
            color = GROUPS_COLOR if row.get("merges") else MERGED_COLOR
            bars.append((label, float(row["normalized"]), row.get("ci"), color))
    return bars


def plot_normalized(results_list: Sequence[Mapping[str, Any]], out_png: str | Path) -> Path:
    """Bar chart of each merged row's normalized score with its 95% CI as error bars.

    A dashed grey line marks the base model (from the first file that has a base row), a
    solid line 100 (the individual models). Rows merged over task groups (``merges``: the
    demo's methods of one or two models) are drawn in a lighter colour.

    Args:
        results_list: Results dicts (``load_results``), e.g. one per run.
        out_png: Where to write the PNG.

    Returns:
        ``out_png`` as a Path.
    """
    bars = _merged_bars(results_list)
    fig = _figure(max(5.0, 0.9 * len(bars) + 2.0))
    ax = fig.add_subplot()
    xs = range(len(bars))
    heights = [b[1] for b in bars]
    # Clamped: a percentile interval need not contain the full-sample estimate.
    lows = [max(0.0, h - b[2][0]) if b[2] else 0.0 for h, b in zip(heights, bars, strict=True)]
    highs = [max(0.0, b[2][1] - h) if b[2] else 0.0 for h, b in zip(heights, bars, strict=True)]
    kinds = ((MERGED_COLOR, "merged"), (GROUPS_COLOR, "merged by task groups (pairs, alone)"))
    for color, label in kinds:  # one bar set (and legend entry) per kind present
        at = [i for i in xs if bars[i][3] == color]
        if at or color == MERGED_COLOR:
            errs = [[lows[i] for i in at], [highs[i] for i in at]]
            tops = [heights[i] for i in at]
            ax.bar(at, tops, yerr=errs, capsize=4, color=color, label=label)
    ax.axhline(100.0, color=INDIVIDUAL_COLOR, lw=1.2, label="individual (100)")
    base = next(
        (r.get("normalized") for res in results_list for r in res["rows"] if r["name"] == "base"),
        None,
    )
    if base is not None:
        ax.axhline(base, color=BASE_COLOR, ls="--", lw=1.2, label=f"base ({base:.1f})")
    ax.set_xticks(list(xs), [b[0] for b in bars], fontsize=7)
    ax.set_ylabel("normalized score (%)")
    values = [*heights, *(h + e for h, e in zip(heights, highs, strict=True)), 100.0]
    low = min([*heights, base if base is not None else 100.0, 100.0])
    ax.set_ylim(max(0.0, low - 10.0), max(values) + 5.0)
    # Above the axes, so it never covers a bar.
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=3, fontsize=8, frameon=False)
    if not bars:
        ax.text(0.5, 0.5, "no merged rows", transform=ax.transAxes, ha="center")
    return _save(fig, out_png)


def plot_curve(points: Sequence[Mapping[str, Any]], out_png: str | Path) -> Path:
    """Normalized score against the number of merged tasks, one line per method.

    Args:
        points: ``{"method": str, "n_tasks": int, "normalized": float}`` each; several
            points per (method, n_tasks) are different task subsets, drawn as faint dots,
            and the line goes through their mean.
        out_png: Where to write the PNG.

    Returns:
        ``out_png`` as a Path.
    """
    fig = _figure()
    ax = fig.add_subplot()
    by_method: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for p in points:
        by_method[str(p["method"])][int(p["n_tasks"])].append(float(p["normalized"]))
    for method, by_n in by_method.items():
        ns = sorted(by_n)
        (line,) = ax.plot(ns, [sum(by_n[n]) / len(by_n[n]) for n in ns], marker="o", label=method)
        dots = [(n, v) for n in ns for v in by_n[n]]
        ax.scatter(*zip(*dots, strict=True), color=line.get_color(), alpha=0.25, s=14)
    ax.axhline(100.0, color=INDIVIDUAL_COLOR, lw=1.0, ls=":", label="individual (100)")
    ax.set_xlabel("number of merged tasks")
    ax.set_ylabel("normalized score (%)")
    if by_method:
        ax.legend(fontsize=8)
    return _save(fig, out_png)


def plot_eta_sweep(
    points: Sequence[Mapping[str, Any]], out_png: str | Path, *, base: float | None = None
) -> Path:
    """Normalized score against STAR's eta (or any swept parameter called ``eta``).

    Args:
        points: ``{"eta": float, "normalized": float}`` each, optionally ``"ci": [lo, hi]``
            (drawn as a band) and ``"method"`` (one line per method; default ``star``).
        out_png: Where to write the PNG.
        base: The base model's normalized score, drawn as a dashed line.

    Returns:
        ``out_png`` as a Path.
    """
    fig = _figure()
    ax = fig.add_subplot()
    by_method: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for p in points:
        by_method[str(p.get("method", "star"))].append(p)
    for method, pts in by_method.items():
        pts = sorted(pts, key=lambda p: float(p["eta"]))
        etas = [float(p["eta"]) for p in pts]
        (line,) = ax.plot(etas, [float(p["normalized"]) for p in pts], marker="o", label=method)
        if all(p.get("ci") for p in pts):
            lo, hi = [p["ci"][0] for p in pts], [p["ci"][1] for p in pts]
            ax.fill_between(etas, lo, hi, color=line.get_color(), alpha=0.2)
    ax.axhline(100.0, color=INDIVIDUAL_COLOR, lw=1.0, ls=":", label="individual (100)")
    if base is not None:
        ax.axhline(base, color=BASE_COLOR, ls="--", lw=1.0, label=f"base ({base:.1f})")
    ax.set_xlabel("eta (% of spectral mass kept)")
    ax.set_ylabel("normalized score (%)")
    ax.legend(fontsize=8)
    return _save(fig, out_png)
