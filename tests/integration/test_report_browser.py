"""The HTML report of `starmerge report`, opened in headless Debian Chromium.

Checks what a reader sees: every image decodes with a real size, every table is laid out and
carries the methods and numbers of its results file, and a screenshot shows the plot. Only the
chromium command line is used (``--dump-dom`` and ``--screenshot``, no driver). CI installs the
browser with ``apt-get install chromium``; ``make test-slow`` does that when run as root.
"""

from __future__ import annotations

import base64
import html
import json
import random
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from starmerge.cli import main
from starmerge.eval.results import Results, load_results
from starmerge.report.tables import row_label

CHROMIUM = "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="Debian chromium is not installed (`apt-get install -y chromium`, or "
        "`make test-slow` as root)",
    ),
]

# Without the background-networking flags Chromium dials out, and a closed network refuses it;
# --disable-dev-shm-usage because CI containers often have a 64 MB /dev/shm.
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--virtual-time-budget=5000",
)  # fmt: skip

# Runs after every image has loaded or failed; writes what rendered into <pre id="render-check">.
CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const box = (el) => { const r = el.getBoundingClientRect(); return [r.width, r.height]; };
  const images = [...document.images].map((img) => ({alt: img.alt, complete: img.complete,
    natural: [img.naturalWidth, img.naturalHeight], box: box(img)}));
  const tables = [...document.querySelectorAll("table")].map((t) => ({box: box(t),
    rows: [...t.rows].map((r) => [...r.cells].map((c) => c.textContent))}));
  const pre = document.createElement("pre");
  pre.id = "render-check";
  pre.textContent = JSON.stringify({images, tables});
  document.body.append(pre);
});
</script>"""

# (row name, method, parameters, probability that an example is right)
ROWS = [("base", None, None, 0.5), ("individual", None, None, 0.9),
        ("star", "star", {"eta": 40}, 0.85), ("ties", "ties", {"density": 0.2}, 0.75)]  # fmt: skip
TASKS = {"news": 40, "sentiment": 30}
BAR_RGB = (0x45, 0x7B, 0x9D)  # plots.plot_normalized's bar colour


def _chromium(url: Path, *args: str, cwd: Path) -> str:
    """Run headless Chromium on a new empty profile; return its stdout."""
    profile = tempfile.mkdtemp(prefix="profile-", dir=cwd)
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args, url.resolve().as_uri()]
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"chromium exited with {out.returncode}:\n{out.stderr[-2000:]}"
    return out.stdout


def render_check(report_html: Path, work: Path) -> dict:
    """Open a copy of ``report_html`` with CHECK_SCRIPT injected; return the script's summary."""
    head, _, tail = report_html.read_text(encoding="utf-8").rpartition("</body>")
    probe = work / f"{report_html.stem}-probe.html"
    probe.write_text(f"{head}{CHECK_SCRIPT}</body>{tail}", encoding="utf-8")
    dom = _chromium(probe, "--dump-dom", cwd=work)
    found = re.search(r'<pre id="render-check">(.*?)</pre>', dom, re.DOTALL)
    assert found, f"the check script wrote nothing; dumped DOM ends with:\n{dom[-1000:]}"
    return json.loads(html.unescape(found.group(1)))


def render_problems(summary: dict) -> list[str]:
    """Images that did not decode or take no space, and tables that are empty or not laid out."""
    problems = []
    for img in summary["images"]:
        (w, h), box = img["natural"], img["box"]
        if not (img["complete"] and w > 0 and h > 0):
            problems.append(f"image {img['alt']!r} did not decode (natural size {w}x{h})")
        elif min(box) <= 0:
            problems.append(f"image {img['alt']!r} takes no space on the page ({box})")
    for i, table in enumerate(summary["tables"]):
        if len(table["rows"]) < 2 or min(table["box"]) <= 0:
            problems.append(f"table {i} is empty or not laid out ({table['box']})")
    return problems


def _results_file(out_dir: Path, suite: str, seed: int) -> Path:
    """A results file with real bootstrap CIs, from per-example 0/1 outcomes."""
    rng = random.Random(seed)
    res = Results(suite, "tiny-llama", seed=seed, n_boot=200)
    for task, n in TASKS.items():
        res.add_task(task, "accuracy", n)
    for name, method, params, p in ROWS:
        correct = {t: [float(rng.random() < p) for _ in range(n)] for t, n in TASKS.items()}
        scores = {t: sum(c) / len(c) for t, c in correct.items()}
        res.add_row(name, scores, method=method, parameters=params, correct=correct)
    return res.write(out_dir)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[list[Path], Path]:
    """Two results files and the directory `starmerge report` wrote from them."""
    root = tmp_path_factory.mktemp("browser")
    files = [_results_file(root / "results", suite, seed)
             for seed, suite in enumerate(["glue-small", "reasoning"])]  # fmt: skip
    assert main(["report", *map(str, files), "--out", str(root / "report")]) == 0
    return files, root / "report"


def _expect_row(cells: list[str], row: dict, tasks: list[str]) -> None:
    """Label, task scores x100, their mean, normalized score and CI, as a reader sees them."""
    scores = [row["scores"][t] * 100 for t in tasks]
    assert cells[0] == row_label(row)
    assert cells[1:-2] == [f"{s:.1f}" for s in [*scores, sum(scores) / len(scores)]]
    normalized = 100.0 if row["name"] == "individual" else row["normalized"]
    assert cells[-2] == f"{normalized:.1f}"
    assert cells[-1] == (f"[{row['ci'][0]:.1f}, {row['ci'][1]:.1f}]" if row.get("ci") else "-")


def test_report_renders_in_chromium(report, tmp_path):
    files, out = report
    pngs = sorted(out.glob("*.png"))
    summary = render_check(out / "report.html", tmp_path)
    assert render_problems(summary) == []
    # One image per plot written, at the plot's own size; one table per results file.
    assert [img["alt"] for img in summary["images"]] == [p.stem for p in pngs]
    assert [img["natural"] for img in summary["images"]] == [list(Image.open(p).size) for p in pngs]
    assert len(summary["tables"]) == len(files)
    for path, table in zip(files, summary["tables"], strict=True):
        results = load_results(path)
        tasks = list(results["tasks"])
        header, *body = table["rows"]
        assert header == ["Model", *tasks, "Avg", "Normalized", "95% CI"]
        assert len(body) == len(results["rows"])
        by_label = {cells[0]: cells for cells in body}
        for row in results["rows"]:
            _expect_row(by_label[row_label(row)], row, tasks)
        assert [cells[0] for cells in body[:2]] == ["base", "individual"]

    shot = tmp_path / "report.png"
    _chromium(out / "report.html", f"--screenshot={shot}", "--window-size=1280,2000", cwd=tmp_path)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2000)
    colors = image.getcolors(maxcolors=1 << 20)
    assert len(colors) > 50, f"the screenshot is nearly blank: {len(colors)} colours"
    bar_pixels = sum(n for n, rgb in colors if rgb == BAR_RGB)
    assert bar_pixels > 10_000, "the plot's bars are not on the screenshot"


def test_render_check_reports_a_broken_image(report, tmp_path):
    _, out = report
    broken = tmp_path / "broken.html"
    junk = base64.b64encode(b"this is not a PNG").decode("ascii")
    text = (out / "report.html").read_text(encoding="utf-8")
    broken.write_text(re.sub(r"base64,[A-Za-z0-9+/=]+", f"base64,{junk}", text), encoding="utf-8")
    summary = render_check(broken, tmp_path)
    assert render_problems(summary) == ["image 'normalized' did not decode (natural size 0x0)"]
