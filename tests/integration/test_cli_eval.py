"""`starmerge eval` on a tiny model with a tiny offline tokenizer, then `starmerge report`."""

from __future__ import annotations

import json

from tests.integration.helpers import run_cli
from tests.unit.test_eval_backends import make_tokenizer


def test_eval_then_report(tmp_path, capsys, tiny_models, llama_adapters):
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], model_dir)
    make_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "results"
    code, stdout, err = run_cli(capsys, "eval", model_dir, "--task", "example_sst2", "--out", out)
    assert code == 0, err
    files = list(out.glob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["tasks"]["example_sst2"]["n"] == 16
    score = data["rows"][0]["scores"]["example_sst2"]
    assert 0.0 <= score <= 1.0 and "example_sst2" in stdout
    code, _, err = run_cli(
        capsys,
        "eval",
        model_dir,
        "--task",
        "example_sst2",
        "--out",
        out,
        "--adapter",
        llama_adapters[0],
        "--name",
        "with-adapter",
    )
    assert code == 0, err
    assert len(list(out.glob("*.json"))) == 2  # a second run never overwrites the first
    code, stdout, err = run_cli(
        capsys, "report", *sorted(out.glob("*.json")), "--out", tmp_path / "report"
    )
    assert code == 0, err
    assert (tmp_path / "report" / "report.html").is_file()


def test_eval_bad_model_dir(tmp_path, capsys):
    code, _, err = run_cli(capsys, "eval", tmp_path, "--task", "example_sst2")
    assert code == 2 and err.startswith("error: cannot load a model")
