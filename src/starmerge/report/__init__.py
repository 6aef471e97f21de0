"""Reports from results files: terminal and Markdown tables, PNG plots, a self-contained HTML.

Everything here is a pure function of results dicts or files; matplotlib is imported only
when a plot is drawn.

Example:
    >>> from starmerge.report import report_from_files
    >>> report_from_files(["results/demo-1a2b3c4d5e6f.json"], "report/")  # doctest: +SKIP
    {'table.txt': ..., 'table.md': ..., 'normalized.png': ..., 'report.html': ...}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from starmerge.errors import OutputError
from starmerge.eval.results import load_results
from starmerge.report.html import write_html
from starmerge.report.plots import plot_normalized
from starmerge.report.tables import markdown_table, render_table


def report_from_files(paths: Sequence[str | Path], out_dir: str | Path) -> dict[str, Path]:
    """Write ``table.txt``, ``table.md``, ``normalized.png`` and ``report.html`` to ``out_dir``.

    Args:
        paths: Results files (each validated by :func:`~starmerge.eval.results.load_results`).
        out_dir: Output directory (created when missing).

    Returns:
        File name -> written path.

    Raises:
        InputError: A file is missing or is not a valid results file.
        OutputError: ``out_dir`` cannot be created or written.
    """
    if not paths:
        raise ValueError("report_from_files needs at least one results file")
    results = [load_results(p) for p in paths]
    out = Path(out_dir)
    try:
        return _write_report(results, paths, out)
    except OSError as exc:
        raise OutputError(
            f"cannot write the report to {out} ({exc.strerror or exc}); give a writable "
            "directory with --out"
        ) from None


def _write_report(results: list[dict], paths: Sequence[str | Path], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)

    def titled(render: Callable[[dict], str], heading: str) -> str:
        blocks = [
            f"{heading} {r['suite']}: {r['model']} ({Path(p).name})\n\n{render(r)}"
            for r, p in zip(results, paths, strict=True)
        ]
        return "\n\n".join(blocks) + "\n"

    written = {"table.txt": out / "table.txt", "table.md": out / "table.md"}
    written["table.txt"].write_text(titled(render_table, "=="), encoding="utf-8")
    written["table.md"].write_text(titled(markdown_table, "##"), encoding="utf-8")
    written["normalized.png"] = plot_normalized(results, out / "normalized.png")
    written["report.html"] = write_html(results, out / "report.html", [written["normalized.png"]])
    return written
