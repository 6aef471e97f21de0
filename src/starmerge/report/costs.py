"""What each merge of a demo run cost: data per task, statistics time, merge time and memory.

A pure function of a demo results dict (``timing``, ``data_used`` and ``rows``), so the data-driven
methods (MaTS, Fisher, RegMean, Localize-and-Stitch) read side by side with the data-free ones.
"Statistics" is what collecting the row's statistics or masks cost when they were written (read
from their cache entries, so a cached re-run still shows it). "Merge +RSS" is how far the
process's anonymous resident memory rose above its level at the merge's start: a lower bound on
the merge's working memory, since memory the allocator already held is reused unseen.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starmerge.report.tables import aligned

HEADER = ["Merge", "Data per task", "Statistics (s)", "Merge (s)", "Merge +RSS (MiB)",
          "Normalized"]  # fmt: skip


def _data(used: Mapping[str, Any] | None) -> str:
    if not used or used.get("data") in (None, "none"):
        return "none"
    kinds = "+".join(used.get("kinds") or [])
    return f"{used.get('n')} {used.get('split', 'train')} items ({kinds})"


def cost_cells(results: Mapping[str, Any]) -> list[list[str]]:
    """Header plus one line per merged row (base and individual are not merges)."""
    timing, used = results.get("timing") or {}, results.get("data_used") or {}
    merge_s, peak = timing.get("merge_s") or {}, timing.get("merge_peak_bytes") or {}
    stats_s = timing.get("stats_s") or {}
    lines = [HEADER]
    for row in results.get("rows", []):
        name = row["name"]
        if name in ("base", "individual") or name not in merge_s:
            continue
        entry = used.get(name) or {}
        seconds = entry.get("seconds")
        if seconds is None and entry.get("kinds"):  # collected in this run, else cached
            seconds = stats_s.get("+".join(entry["kinds"]))
        normalized = row.get("normalized")
        lines.append([
            name, _data(entry), "-" if seconds is None else f"{seconds:.1f}",
            f"{merge_s[name]:.2f}", "-" if name not in peak else f"{peak[name] / 2**20:.0f}",
            "-" if normalized is None else f"{normalized:.1f}"])  # fmt: skip
    return lines


def render_costs(results: Mapping[str, Any]) -> str:
    """The costs as an aligned text table ('' when the run recorded no merge times)."""
    lines = cost_cells(results)
    return aligned(lines) if len(lines) > 1 else ""
