"""What each merge of a demo run cost: data per task, statistics time, merge time and memory.

A pure function of a demo results dict (``timing``, ``data_used`` and ``rows``), so the data-driven
methods (MaTS, Fisher, RegMean, Localize-and-Stitch) read side by side with the data-free ones.
"Statistics" is what collecting the row's statistics or training its masks cost when they were
written (read from their cache entries, so a cached re-run still shows it): the time for all tasks
and the largest peak of one task's collection (accumulators, or the mask trainer's tensors). The
merge's own time follows; its memory is small beside the model here, and the RSS growth the demo
records in ``timing.merge_peak_bytes`` is only a lower bound (freed memory is reused unseen).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starmerge.report.tables import aligned

HEADER = [
    "Merge",
    "Data per task",
    "Statistics (s)",
    "Statistics peak (MiB)",
    "Merge (s)",
    "Normalized",
]


def _data(used: Mapping[str, Any] | None) -> str:
    if not used or used.get("data") in (None, "none"):
        return "none"
    kinds = "+".join(used.get("kinds") or [])
    return f"{used.get('n')} {used.get('split', 'train')} items ({kinds})"


def cost_cells(results: Mapping[str, Any]) -> list[list[str]]:
    """Header plus one line per merged row (base and individual are not merges)."""
    timing, used = results.get("timing") or {}, results.get("data_used") or {}
    merge_s = timing.get("merge_s") or {}
    stats_s, stats_peak = timing.get("stats_s") or {}, timing.get("stats_peak_bytes") or {}
    lines = [HEADER]
    for row in results.get("rows", []):
        name = row["name"]
        if name in ("base", "individual") or name not in merge_s:
            continue
        entry = used.get(name) or {}
        label = "+".join(entry.get("kinds") or [])
        seconds = entry.get("seconds", stats_s.get(label))  # older files: this run's only
        peak = entry.get("peak_bytes", stats_peak.get(label))
        normalized = row.get("normalized")
        lines.append(
            [
                name,
                _data(entry),
                "-" if seconds is None else f"{seconds:.1f}",
                "-" if not peak else f"{peak / 2**20:.0f}",
                f"{merge_s[name]:.2f}",
                "-" if normalized is None else f"{normalized:.1f}",
            ]
        )
    return lines


def render_costs(results: Mapping[str, Any]) -> str:
    """The costs as an aligned text table ('' when the run recorded no merge times)."""
    lines = cost_cells(results)
    return aligned(lines) if len(lines) > 1 else ""
