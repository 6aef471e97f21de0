"""A self-contained HTML report: inline CSS, tables, images as base64 data URIs.

The file opens anywhere (no network, no sibling files): e-mail it, attach it to a CI run.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from starmerge.report.costs import cost_cells
from starmerge.report.tables import table_cells

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { border-bottom: 2px solid #444; }
tr.ref td { color: #555; font-style: italic; }
img { max-width: 100%; border: 1px solid #eee; margin: 1em 0; }
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; font-size: 12px; }
.meta { color: #666; font-size: 0.9em; }
"""


def html_table(results: Mapping[str, Any]) -> str:
    """The comparison table (same cells as the text table) as an HTML ``<table>``."""
    return _table(table_cells(results))


def _table(lines: list[list[str]]) -> str:
    """Header + rows as an HTML ``<table>``; base and individual rows in the reference style."""
    header, *rows = lines
    head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = []
    for cells in rows:
        ref = cells[0] in ("base", "individual")
        tds = "".join(f"<td>{html.escape(c)}</td>" for c in cells)
        body.append(f'<tr class="ref">{tds}</tr>' if ref else f"<tr>{tds}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _image(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    alt = html.escape(Path(path).stem)
    return f'<img alt="{alt}" src="data:image/png;base64,{data}">'


def _groups_note(results: Mapping[str, Any]) -> str:
    """A note on the rows that merge task groups one by one (``merges``: the demo's pairs)."""
    by_groups: dict[str, list[str]] = {}
    for row in results["rows"]:
        if row.get("merges"):
            groups = ", ".join("+".join(g) for g in row["merges"])
            by_groups.setdefault(groups, []).append(row["name"])
    if not by_groups:
        return ""
    listed = "; ".join(f"{', '.join(names)} merge {g}" for g, names in by_groups.items())
    note = (
        "Rows over task groups (methods that merge one or two models): each merge is scored on "
        "its own tasks, a task's score is the mean over the merges that hold it. Compare them "
        "with the comparator on the same groups (one task at a time: with individual), not with "
        f"the rows that merge every task. {listed}."
    )
    return f'<p class="meta">{html.escape(note)}</p>'


def _section(results: Mapping[str, Any]) -> str:
    title = f"{results.get('suite', '?')}: {results.get('model', '?')}"
    meta = f"seed {results.get('seed')} · created {results.get('created', '?')}"
    meta += f" · git {results.get('git') or 'unknown'}"
    tasks = ", ".join(f"{t} ({s['metric']}, n={s['n']})" for t, s in results["tasks"].items())
    details = {k: results.get(k) for k in ("config", "versions", "tasks")}
    lines = cost_cells(results)  # demo runs: what each merge cost, side by side
    costs = f"<h3>Costs per merge</h3>{_table(lines)}" if len(lines) > 1 else ""
    return (
        f"<h2>{html.escape(title)}</h2>"
        f'<p class="meta">{html.escape(meta)}<br>tasks: {html.escape(tasks)}</p>'
        f"{html_table(results)}{_groups_note(results)}{costs}"
        "<details><summary>Configuration and versions</summary>"
        f"<pre>{html.escape(json.dumps(details, indent=2, default=str))}</pre></details>"
    )


def write_html(
    results_list: Sequence[Mapping[str, Any]],
    out_html: str | Path,
    images: Sequence[str | Path] = (),
    title: str = "starmerge evaluation report",
) -> Path:
    """Write one HTML file with every results table, the images, config and versions.

    Args:
        results_list: Results dicts (``load_results``).
        out_html: Where to write the report.
        images: PNG files to embed (base64), in order, above the tables.
        title: The page title.

    Returns:
        ``out_html`` as a Path.

    Example:
        >>> write_html([load_results("r.json")], "out.html", ["a.png"])  # doctest: +SKIP
    """
    note = (
        "Scores are x100. Normalized = 100 x mean over tasks of score / individual score; "
        "95% CI: bootstrap over each task's examples, individual scores held fixed."
    )
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
        f'<p class="meta">{html.escape(note)}</p>',
        *(_image(Path(p)) for p in images),
        *(_section(r) for r in results_list),
        "</body></html>",
    ]
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
