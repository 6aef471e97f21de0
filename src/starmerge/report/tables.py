"""Comparison tables from a results dict (pure functions; plain text and Markdown).

Rows: ``base``, ``individual``, then every other row in file order. Columns: each task's score
x100, ``Avg`` (mean task score x100), ``Normalized`` (100 x mean of score / individual score;
100.0 for the individual row by definition) and ``95% CI`` (bootstrap interval of Normalized).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

FIRST = ("base", "individual")


def row_label(row: Mapping[str, Any]) -> str:
    """``name``, plus ``(k=v, ...)`` when the row has parameters not already in its name.

    Example:
        >>> row_label({"name": "star", "parameters": {"eta": 40}})
        'star (eta=40)'
    """
    params = row.get("parameters") or {}
    shown = [f"{k}={v}" for k, v in params.items() if f"{k}={v}" not in row["name"]]
    return f"{row['name']} ({', '.join(shown)})" if shown else str(row["name"])


def ordered_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``base`` and ``individual`` first, then the other rows in their file order."""
    rows = list(results["rows"])
    first = [r for name in FIRST for r in rows if r["name"] == name]
    return first + [r for r in rows if r["name"] not in FIRST]


def _fmt(value: float | None, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:.1f}"


def table_cells(results: Mapping[str, Any], per_task: bool = True) -> list[list[str]]:
    """Header plus one list of cell strings per row (shared by every table renderer)."""
    tasks = list(results["tasks"])
    header = ["Model", *(tasks if per_task else []), "Avg", "Normalized", "95% CI"]
    lines = [header]
    for row in ordered_rows(results):
        scores = row.get("scores", {})
        avg = sum(scores.values()) / len(scores) if scores else None
        norm = 100.0 if row["name"] == "individual" else row.get("normalized")
        ci = row.get("ci")
        cells = [row_label(row)]
        if per_task:
            cells += [_fmt(scores.get(t), 100) for t in tasks]
        cells += [_fmt(avg, 100), _fmt(norm), f"[{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "-"]
        lines.append(cells)
    return lines


def render_table(results: Mapping[str, Any], *, per_task: bool = True) -> str:
    """An aligned plain-text table for the terminal.

    Args:
        results: A results dict (``Results.to_json()`` or ``load_results(path)``).
        per_task: Include one column per task.

    Example:
        >>> res = {"tasks": {"a": {"metric": "accuracy", "n": 2}},
        ...        "rows": [{"name": "individual", "scores": {"a": 0.9}}]}
        >>> print(render_table(res))
        Model          a   Avg  Normalized  95% CI
        ----------  ----  ----  ----------  ------
        individual  90.0  90.0       100.0       -
    """
    return aligned(table_cells(results, per_task))


def aligned(lines: list[list[str]]) -> str:
    """Header, rule and rows as aligned text: the first column left, the others right."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]

    def fmt(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    rule = ["-" * w for w in widths]
    return "\n".join([fmt(lines[0]), fmt(rule), *(fmt(cells) for cells in lines[1:])])


def markdown_table(results: Mapping[str, Any], *, per_task: bool = True) -> str:
    """The same table in GitHub Markdown (model column left, numbers right aligned)."""
    lines = table_cells(results, per_task)
    align = [":---", *("---:" for _ in lines[0][1:])]

    def fmt(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([fmt(lines[0]), fmt(align), *(fmt(cells) for cells in lines[1:])])
