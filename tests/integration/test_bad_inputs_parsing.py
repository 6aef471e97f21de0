"""Bad YAML, bad overrides, bad results and model files: one `error:` line, inputs untouched.

Issue 10, items 4 and 5: every user-written file goes through ``starmerge.yaml_io``; each case
asserts exit code 2, exactly one ``error:`` line that names the problem, no traceback, and every
input and the output directory byte-identical afterwards.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml
from tests.integration.helpers import (
    assert_one_error,
    refused,
    run_cli,
    tree_hash,
    write_config,
)

from starmerge.config import load_config


@pytest.fixture
def merge_inputs(tmp_path, tiny_models, llama_adapters):
    """A valid config's body, plus every path a merge must leave as it was."""
    body = {
        "method": "task_arithmetic",
        "base_model": str(tiny_models["llama"]),
        "models": [{"adapter": str(a)} for a in llama_adapters[:2]],
    }
    return body, [tiny_models["llama"], *llama_adapters[:2], tmp_path / "out"]


def _mergerefused(capsys, tmp_path, text, watched, *needles, extra=()):
    cfg = tmp_path / "c.yaml"
    if isinstance(text, bytes):
        cfg.write_bytes(text)
    else:
        cfg.write_text(text)
    out = tmp_path / "out"
    err = refused(capsys, ["merge", cfg, out, "--quiet", *extra], [*watched, cfg], *needles)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    return err


def _dump(body):
    return yaml.safe_dump(body, sort_keys=False)


def test_config_not_utf8(tmp_path, capsys, merge_inputs):
    body, watched = merge_inputs
    text = _dump(body).encode() + b"# caf\xe9 in latin-1\n"
    offset = text.index(b"\xe9")
    _mergerefused(
        capsys, tmp_path, text, watched, "c.yaml is not UTF-8", f"at offset {offset}", "UTF-8"
    )


def test_config_nested_too_deep(tmp_path, capsys, merge_inputs):
    body, watched = merge_inputs
    text = _dump(body) + "parameters: {scaling: " + "[" * 5000 + "]" * 5000 + "}\n"
    _mergerefused(capsys, tmp_path, text, watched, "deeper than 100 levels", "flatten it")


def test_duplicate_key_names_both_lines(tmp_path, capsys, merge_inputs):
    body, watched = merge_inputs
    text = _dump(body) + "method: ties\n"
    last = text.count("\n")
    _mergerefused(
        capsys, tmp_path, text, watched, f"duplicate key 'method' at lines 1 and {last}", "keep one"
    )


def test_python_tag_is_refused_and_never_run(tmp_path, capsys, merge_inputs):
    body, watched = merge_inputs
    marker = tmp_path / "ran"
    text = _dump(body) + f"output: !!python/object/apply:os.system ['touch {marker}']\n"
    _mergerefused(
        capsys,
        tmp_path,
        text,
        watched,
        "'!!python/object/apply:os.system'",
        "remove it (only plain YAML data is read)",
    )
    assert not marker.exists()


def test_yaml_syntax_error_keeps_its_line(tmp_path, capsys, merge_inputs):
    body, watched = merge_inputs
    text = _dump(body) + "parameters: {scaling: [1}\n"
    last = text.count("\n")
    _mergerefused(capsys, tmp_path, text, watched, f"is not valid YAML at line {last}", "fix")


def test_recursive_alias(tmp_path, capsys, merge_inputs):
    body, watched = merge_inputs
    text = _dump(body) + "parameters: &p {scaling: *p}\n"
    _mergerefused(capsys, tmp_path, text, watched, "recursive alias", "write the value out")


LAUGHS = "l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9)
)  # 9 levels: 9**9 (387 million) strings once expanded


@pytest.mark.parametrize(
    "command,where",
    [
        ("merge", "method: *l8\n"),
        ("merge", "parameters: {scaling: *l8}\n"),
        ("merge", "models: *l8\n"),
        ("validate", "parameters: *l8\n"),
    ],
)
def test_alias_bomb_is_refused_quickly(tmp_path, merge_inputs, command, where):
    body, watched = merge_inputs
    body = {k: v for k, v in body.items() if f"{k}:" not in where}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(LAUGHS + _dump(body) + where)
    before = {str(p): tree_hash(p) for p in [*watched, cfg]}
    argv = [command, str(cfg)] + ([str(tmp_path / "out")] if command == "merge" else [])
    proc = subprocess.run(  # a hang is caught by the timeout, even one inside C code
        [sys.executable, "-m", "starmerge", *argv], capture_output=True, text=True, timeout=30
    )
    assert_one_error(
        proc.returncode, proc.stderr, "expands to more than 100000 values", "aliases (*)"
    )
    assert {p: tree_hash(p) for p in before} == before


@pytest.mark.parametrize(
    "override,needles",
    [
        ("parameters.scaling=[1", ["override 'parameters.scaling=[1'", "not valid YAML"]),
        ("models.x=1", ["models is a list of 2", "got 'x'", "models.0.weight=0.5"]),
        ("models.5.weight=1", ["models is a list of 2", "index below 2", "got '5'"]),
        ("parameters.scaling.x=1", ["parameters.scaling is 2, not a mapping", "no key 'x'"]),
        ("method.scaling=!!python/object/apply:os.system [true]", ["'!!python/object/apply"]),
        ("=1", ["is not key=value"]),
        ("parameters..scaling=1", ["is not key=value"]),
    ],
)
def test_malformed_override(tmp_path, capsys, merge_inputs, override, needles):
    body, watched = merge_inputs
    text = _dump({**body, "parameters": {"scaling": 2}})
    _mergerefused(capsys, tmp_path, text, watched, *needles, extra=(override,))


def test_override_into_a_list_by_index(tmp_path, merge_inputs):
    body, _ = merge_inputs
    cfg = write_config(tmp_path / "c.yaml", **body)
    config = load_config(cfg, ["models.1.weight=0.5", "method.scaling=0.3"])
    assert [m.weight for m in config.models] == [None, 0.5]
    assert config.parameters["scaling"] == 0.3
    assert "weight" not in yaml.safe_load(cfg.read_text())["models"][1]  # the file is unchanged


def test_merge_key_is_not_a_duplicate(tmp_path, merge_inputs):
    body, _ = merge_inputs
    cfg = tmp_path / "c.yaml"
    # `<<: MAPPING` then an explicit key is YAML's override idiom, not a duplicate key
    cfg.write_text(
        _dump(body) + "output:\n  <<: {format: model, dtype: float16}\n  dtype: float32\n"
    )
    assert load_config(cfg).output.dtype == "float32"


@pytest.fixture
def results_file(tmp_path):
    """A valid results JSON (the eval contract's summary part)."""
    data = {
        "suite": "s",
        "model": "m",
        "seed": 0,
        "versions": {},
        "config": {},
        "tasks": {"t": {"metric": "accuracy", "n": 2}},
        "rows": [{"name": "base", "scores": {"t": 0.5}}],
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "kind,needles",
    [
        ("latin1", ["is not UTF-8 text (byte offset", "give a file written by starmerge"]),
        ("directory", ["is a directory", "/*.json"]),
        ("not_json", ["is not valid JSON", "give a file written by starmerge"]),
        ("deep_json", ["nests JSON too deeply"]),
        ("bad_rows", ["not a starmerge results file", "row names must be unique"]),
    ],
)
def test_report_bad_results(tmp_path, capsys, results_file, kind, needles):
    bad = tmp_path / "bad.json"
    if kind == "latin1":
        bad.write_bytes(results_file.read_bytes().replace(b'"m"', b'"caf\xe9"'))
    elif kind == "directory":
        bad.mkdir()
        shutil.copy(results_file, bad / "r.json")
    elif kind == "not_json":
        bad.write_text("suite: s\n")
    elif kind == "deep_json":
        bad.write_text("[" * 100_000 + "]" * 100_000)
    else:
        data = json.loads(results_file.read_text())
        data["rows"] += [{"name": ["base"], "scores": {}}, {"name": "base", "scores": {}}]
        bad.write_text(json.dumps(data))
    out = tmp_path / "report"
    argv = ["report", results_file, bad, "--out", out]
    refused(capsys, argv, [results_file, bad, out], *needles)


def test_report_out_is_a_file(tmp_path, capsys, results_file):
    out = tmp_path / "report"
    out.write_text("not a directory")
    argv = ["report", results_file, "--out", out]
    refused(capsys, argv, [results_file, out], "cannot write the report to", "--out")


@pytest.fixture
def model_dir(tmp_path, tiny_models):
    """The tiny llama with a tokenizer: a model `starmerge eval` can load."""
    from tests.unit.test_eval_backends import make_tokenizer

    path = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], path)
    make_tokenizer().save_pretrained(path)
    return path


def test_eval_truncated_model_weights(tmp_path, capsys, model_dir):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "results"
    argv = ["eval", model_dir, "--task", "example_sst2", "--out", out]
    refused(capsys, argv, [model_dir, out], "model.safetensors", "truncated or corrupt")


def test_eval_truncated_adapter_weights(tmp_path, capsys, model_dir, llama_adapters):
    adapter = tmp_path / "adapter"
    shutil.copytree(llama_adapters[0], adapter)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    out = tmp_path / "results"
    argv = ["eval", model_dir, "--task", "example_sst2", "--out", out, "--adapter", adapter]
    refused(capsys, argv, [model_dir, adapter, out], "adapter_model.safetensors", "truncated")


def test_eval_task_file_not_utf8(tmp_path, capsys):
    task = tmp_path / "t.yaml"
    task.write_bytes(b"name: caf\xe9\n")
    out = tmp_path / "results"
    argv = ["eval", tmp_path, "--task", task, "--out", out]
    refused(capsys, argv, [task, out], "task file", "is not UTF-8 text", "save it as UTF-8")


def test_eval_task_data_not_utf8(tmp_path, capsys, model_dir):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"sentence": "caf\xe9", "label": 0}\n')
    task = tmp_path / "t.yaml"
    task.write_text(
        "name: t\nmetadata: {version: 1}\nsource: {type: local, path: d.jsonl, format: jsonl}\n"
        "input_template: '{sentence}'\nlabel_column: label\nlabel_words: {0: bad, 1: good}\n"
        "metric: accuracy\nscoring: loglikelihood\n"
    )
    out = tmp_path / "results"
    before = {str(p): tree_hash(p) for p in [model_dir, data, task, out]}
    code, _, err = run_cli(capsys, "eval", model_dir, "--task", task, "--out", out)
    # The data is read once the model has loaded, after transformers' progress bar.
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line] == [err.splitlines()[-1]]
    assert err.splitlines()[-1].startswith("error: task 't': cannot read data file")
    assert {p: tree_hash(p) for p in before} == before


def test_sweep_file_duplicate_key(tmp_path, capsys):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("suite: tiny\nmethods: {star: {eta: [20]}}\nsuite: other\n")
    out = tmp_path / "sweep-out"
    argv = ["sweep", sweep, "--out", out, "--dry-run"]
    refused(capsys, argv, [sweep, out], "duplicate key 'suite' at lines 1 and 3", "sweep file")


@pytest.mark.parametrize(
    "option,needles",
    [
        ("--param=star.eta=[1", ["the value of --param 'star.eta=[1'", "not valid YAML"]),
        ("--param=star.eta=!!python/name:os.system", ["'!!python/name:os.system'"]),
        ("--data=n_examples={a: 1, a: 2}", ["duplicate key 'a'"]),
    ],
)
def test_reproduce_option_values(tmp_path, capsys, option, needles):
    out = tmp_path / "repro"
    refused(capsys, ["reproduce", "nosuchsuite", option, "--out", out], [out], *needles)
