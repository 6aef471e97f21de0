import json
import sys

import pytest

from starmerge.errors import InputError
from starmerge.report import report_from_files
from starmerge.report.html import write_html
from starmerge.report.plots import plot_curve, plot_eta_sweep, plot_normalized

pytest.importorskip("matplotlib")

RESULTS = {
    "suite": "demo", "model": "tiny", "seed": 0, "versions": {"python": "3.11"},
    "config": {"lr": 0.001}, "tasks": {"news": {"metric": "accuracy", "n": 4}},
    "rows": [
        {"name": "base", "scores": {"news": 0.5}, "normalized": 52.0, "ci": [40.0, 60.0]},
        {"name": "individual", "scores": {"news": 0.96}},
        {"name": "star", "method": "star", "parameters": {"eta": 40},
         "scores": {"news": 0.95}, "normalized": 98.9, "ci": [97.1, 100.4]},
        {"name": "ties", "method": "ties", "scores": {"news": 0.9}, "normalized": 93.75,
         "ci": None},
    ],
    "predictions": {}, "created": "2025-01-01T00:00:00+00:00", "git": None,
}  # fmt: skip

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    return path.exists() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG


def test_plots_write_non_empty_pngs(tmp_path):
    assert _is_png(plot_normalized([RESULTS, {**RESULTS, "suite": "other"}], tmp_path / "n.png"))
    slopes = (("star", 1.0), ("ties", 2.0))
    points = [{"method": m, "n_tasks": n, "normalized": 100 - n * k + s}
              for m, k in slopes for n in (2, 4, 8) for s in (0, 1, 2)]  # fmt: skip
    assert _is_png(plot_curve(points, tmp_path / "curve.png"))
    sweep = [{"eta": e, "normalized": 90 + e / 10, "ci": [88 + e / 10, 92 + e / 10]}
             for e in (20, 40, 60)]  # fmt: skip
    assert _is_png(plot_eta_sweep(sweep, tmp_path / "sub" / "eta.png", base=60.0))
    assert _is_png(plot_normalized([{**RESULTS, "rows": RESULTS["rows"][:2]}], tmp_path / "e.png"))


def test_html_is_self_contained(tmp_path):
    png = plot_normalized([RESULTS], tmp_path / "n.png")
    out = write_html([RESULTS], tmp_path / "r.html", [png])
    text = out.read_text()
    assert "<table>" in text and "data:image/png;base64," in text
    assert "<details>" in text and "&quot;lr&quot;: 0.001" in text
    assert "star (eta=40)" in text and 'src="http' not in text


def test_report_from_files(tmp_path):
    path = tmp_path / "demo-abc.json"
    path.write_text(json.dumps(RESULTS))
    written = report_from_files([path], tmp_path / "report")
    assert set(written) == {"table.txt", "table.md", "normalized.png", "report.html"}
    assert all(p.exists() and p.stat().st_size > 0 for p in written.values())
    table = written["table.txt"].read_text()
    assert "demo-abc.json" in table and "Normalized" in table and "ties" in table
    assert written["table.md"].read_text().count("| star (eta=40) |") == 1
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(InputError, match="not a starmerge results file"):
        report_from_files([bad], tmp_path / "r2")


def test_matplotlib_stays_out_of_eval_and_tables():
    import subprocess

    code = ("import sys, starmerge.eval.metrics, starmerge.eval.results, starmerge.report.tables;"
            "print('matplotlib' in sys.modules, 'transformers' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
