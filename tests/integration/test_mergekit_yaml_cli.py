"""Every ``configs/mergekit/*.yaml`` runs unchanged through the CLI and merges as mergekit does.

Each example config is rewritten onto the tiny fixtures of ``tests/fixtures/mergekit_yaml/``
(``rewrite.py``: only the model names change, exactly as for the golden run), then
``starmerge validate`` and ``starmerge merge`` run it. The golden outputs are ``mergekit-yaml``
0.1.5's own merges of the same configs and files (``tests/golden/mergekit_yaml/``, rebuilt by
``/work/venvs/mergekit/bin/python scripts/golden_mergekit_yaml.py``; the commands are in
``golden.json``).

Tolerance, float32 throughout: every output weight within ``1e-6 + 1e-5 |mergekit's|``
(observed at most 2.4e-7 absolute, on norm weights near 1; mergekit folds each LoRA into a
float32 copy of the base and subtracts, starmerge adds ``s B A`` once). ``dare_ties`` draws
random masks (mergekit: ``torch.bernoulli``; starmerge: seeded per task), so its outputs are
checked by their statistics, for both: each task's rescale factor (mergekit's and starmerge's
``rescale`` both match the task's L1 norm per tensor) is within 25 % of ``1 / density``; every
merged entry is one of the values DARE-TIES can produce from the task vectors (a weighted mean
of rescaled ``c_t tau_t`` over a set of same-sign tasks, or 0); the kept fraction is
``1 - (1 - density)^T`` within 5 sigma.

Each merge also checks that nothing but ``OUT_DIR`` was written: no folded model copies, no
cache, no temporary files (the working directory and the temp directory are in ``tmp_path``),
and the fixtures are untouched.
"""

from __future__ import annotations

import itertools
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tests.fixtures.mergekit_yaml.rewrite import (
    CONFIGS,
    FIXTURES,
    example_configs,
    probe_configs,
    rewrite,
    write_rewritten,
)
from tests.integration.helpers import load_state, refused, run_cli, tree_hash

GOLDEN = Path(__file__).parents[1] / "golden" / "mergekit_yaml"
RECORD = json.loads((GOLDEN / "golden.json").read_text())
RTOL, ATOL = 1e-5, 1e-6
EXAMPLES = example_configs()


@pytest.fixture(scope="module")
def base_state() -> dict[str, torch.Tensor]:
    return load_state(FIXTURES / "base")


def _listing(root: Path, skip: Path) -> dict[str, tuple[int, ...]]:
    """Every path under ``root`` but ``skip``: (size, mtime) of files, mtime of directories."""
    out = {}
    for p in root.rglob("*"):
        if p == skip or skip in p.parents:
            continue
        st = p.stat()
        out[p.relative_to(root).as_posix()] = (st.st_mtime_ns,) + (
            () if p.is_dir() else (st.st_size,)
        )
    return out


def _run(tmp_path, capsys, monkeypatch, src: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """Rewrite ``src``, validate and merge it; assert nothing but OUT_DIR was written."""
    monkeypatch.chdir(tmp_path)  # a cache relative to the working directory would show here
    (tmp_path / "sys_tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "sys_tmp"))
    cfg = write_rewritten(src, tmp_path / src.name)
    out = tmp_path / "out"
    before, inputs = _listing(tmp_path, out), tree_hash(FIXTURES)
    code, stdout, err = run_cli(capsys, "validate", cfg)
    assert code == 0 and stdout.strip().endswith("ok"), err
    code, _, err = run_cli(capsys, "merge", cfg, out, "--quiet")
    assert code == 0, err
    assert _listing(tmp_path, out) == before
    assert tree_hash(FIXTURES) == inputs
    weights = sorted(p.name for p in out.glob("*.safetensors"))
    assert weights == ["model.safetensors"] and not [p for p in out.iterdir() if p.is_dir()]
    assert {"config.json", "tokenizer.json", "starmerge.json"} <= {p.name for p in out.iterdir()}
    return out, load_state(out)


def _expected(name: str, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mergekit's output: the stored changed tensors, the base's for the ones listed equal."""
    case = RECORD["cases"][name]
    golden = load_file(GOLDEN / f"{name}.safetensors")
    assert sorted(golden) == sorted(case["changed"])
    return golden | {k: base[k] for k in case["equal_to_base"]}


def test_every_example_config_has_a_mergekit_golden():
    assert len(EXAMPLES) >= 4
    stems = {p.stem for p in EXAMPLES + probe_configs()}
    assert stems == set(RECORD["cases"])
    assert RECORD["versions"]["mergekit"] == "0.1.5"
    for p in EXAMPLES:  # the recorded config is this example, rewritten as here
        recorded = yaml.safe_load(RECORD["cases"][p.stem]["config"])
        assert recorded == rewrite(yaml.safe_load(p.read_text()), "${FIXTURES}")


@pytest.mark.parametrize("src", EXAMPLES, ids=lambda p: p.stem)
def test_example_config_merges_as_mergekit(src, tmp_path, capsys, monkeypatch, base_state):
    out, merged = _run(tmp_path, capsys, monkeypatch, src)
    expected = _expected(src.stem, base_state)
    assert set(merged) == set(expected) == set(base_state)
    manifest = json.loads((out / "starmerge.json").read_text())
    assert manifest["method"]["name"] == RECORD["cases"][src.stem]["method"]
    if not RECORD["cases"][src.stem]["deterministic"]:
        _check_dare_ties(src, merged, expected, base_state)
        assert manifest["method"]["parameters"]["seed"] == 0
        return
    for key, tensor in merged.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, expected[key], rtol=RTOL, atol=ATOL, msg=key)


def test_slerp_gradient_reaches_both_endpoints(tmp_path, capsys, monkeypatch):
    """Independent of mergekit: t = 0 gives the math model, t = 1 the code model, per filter."""
    _, merged = _run(tmp_path, capsys, monkeypatch, CONFIGS / "slerp_gradient.yaml")
    math_ft, code_ft = load_state(FIXTURES / "ft_math"), load_state(FIXTURES / "ft_code")
    # t: self_attn [0, .5, .3, .7, 1] and mlp [1, .5, .7, .3, 0] over layers 0..3
    for key, want in [
        ("model.layers.0.self_attn.q_proj.weight", math_ft),
        ("model.layers.3.self_attn.o_proj.weight", code_ft),
        ("model.layers.0.mlp.up_proj.weight", code_ft),
        ("model.layers.3.mlp.down_proj.weight", math_ft),
    ]:
        torch.testing.assert_close(merged[key], want[key], rtol=RTOL, atol=ATOL, msg=key)


def _lora_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """s B A per module in float64, read from the PEFT files (s = alpha/r, or alpha/sqrt(r))."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    factors = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for name, a in factors.items():
        if ".lora_A." in name:
            b = factors[name.replace(".lora_A.", ".lora_B.")]
            key = name.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            out[key] = scale * b.double() @ a.double()
    return out


def _check_dare_ties(src, merged, golden, base) -> None:
    """DARE-TIES statistics, the same for starmerge's output and mergekit's."""
    raw = yaml.safe_load(src.read_text())
    density = float(raw["parameters"]["density"])
    weights = [float(m["parameters"]["weight"]) for m in raw["models"]]
    loras = [_lora_deltas(Path(m["model"].split("+")[1])) for m in rewrite(raw)["models"]]
    for label, output in (("starmerge", merged), ("mergekit", golden)):
        kept = total = 0
        for key in loras[0]:
            x = output[key].double() - base[key].double()
            taus = [lora[key] for lora in loras]
            # each task's rescale c_t = |tau_t|_1 / |kept tau_t|_1 (both: L1 "rescale"), near
            # 1 / density: the most frequent x / tau_t (the entries only task t explains)
            scales = [_most_frequent_ratio(x, tau) for tau in taus]
            assert all(abs(c * density - 1) < 0.25 for c in scales), (label, key, scales)
            assert _unexplained(x, taus, weights, scales) == 0, (label, key)
            kept, total = kept + int((x != 0).sum()), total + x.numel()
        p = 1 - (1 - density) ** len(loras)
        assert abs(kept / total - p) < 5 * math.sqrt(p * (1 - p) / total), (label, kept / total)
        for key in set(base) - set(loras[0]):  # untouched by every adapter
            assert torch.equal(output[key], base[key]), (label, key)


def _most_frequent_ratio(x: torch.Tensor, tau: torch.Tensor) -> float:
    """The value of ``x / tau`` shared by the most entries (within a relative 1e-4)."""
    r, _ = torch.sort((x / tau)[(x != 0) & (tau != 0)])
    new = torch.ones_like(r, dtype=torch.bool)
    new[1:] = (r[1:] - r[:-1]).abs() > 1e-4 * r[1:].abs()
    starts = torch.nonzero(new).flatten()
    lengths = torch.diff(torch.cat([starts, torch.tensor([len(r)])]))
    return float(r[starts[int(lengths.argmax())]])


def _unexplained(x, taus, weights, scales) -> int:
    """Entries of ``x`` that no kept-and-agreeing subset A of tasks explains.

    A merged entry is sum_A w_t c_t tau_t / sum_A w_t (normalize) over a set A of tasks of one
    sign, or 0 when every task dropped it.
    """
    best = x.abs()  # the empty subset: 0
    for size in range(1, len(taus) + 1):
        for subset in itertools.combinations(range(len(taus)), size):
            signs = torch.stack([torch.sign(taus[t]) for t in subset])
            same = (signs == signs[0]).all(0)
            num = sum(weights[t] * scales[t] * taus[t] for t in subset)
            value = num / sum(weights[t] for t in subset)
            best = torch.where(same, torch.minimum(best, (x - value).abs()), best)
    return int((best > 1e-7 + 1e-4 * x.abs()).sum())


def test_gradient_depth_counts_the_base_models_layers(tmp_path, capsys, monkeypatch, base_state):
    src = next(p for p in probe_configs() if p.stem == "gradient_partial_lora")
    _, merged = _run(tmp_path, capsys, monkeypatch, src)
    expected = _expected(src.stem, base_state)
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[key], rtol=RTOL, atol=ATOL, msg=key)


PASSTHROUGH = {
    "slices": [
        {"sources": [{"model": "meta-llama/Llama-3.2-1B", "layer_range": [0, 2]}]},
        {"sources": [{"model": "meta-llama/Llama-3.2-1B", "layer_range": [1, 4]}]},
    ],
    "merge_method": "passthrough",
    "dtype": "float32",
}


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda raw: PASSTHROUGH, "layer stacking (slices: / passthrough frankenmerges)"),
        (lambda raw: raw | {"tokenizer_source": "union"}, "tokenizer_source 'union'"),
        (
            lambda raw: raw | {"parameters": {**raw["parameters"], "int8_mask": True}},
            "int8_mask (a mergekit memory saving) is not supported",
        ),
    ],
    ids=["slices-passthrough", "tokenizer-union", "int8-mask"],
)
@pytest.mark.parametrize("command", ["validate", "merge"])
def test_unsupported_mergekit_features_are_refused(tmp_path, capsys, change, needle, command):
    raw = change(yaml.safe_load((CONFIGS / "ties_loras.yaml").read_text()))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw if "slices" in raw else rewrite(raw), sort_keys=False))
    out = tmp_path / "out"
    argv = [command, cfg] + ([out] if command == "merge" else [])
    line = refused(capsys, argv, [tmp_path, FIXTURES], needle)
    assert line.startswith("error: ") and not out.exists()


def test_starmerge_yaml_takes_the_same_gradients_and_filters(tmp_path, capsys, base_state):
    """The slerp example written as a starmerge config gives mergekit's weights too."""
    raw = yaml.safe_load((CONFIGS / "slerp_gradient.yaml").read_text())
    cfg = tmp_path / "native.yaml"
    native = {
        "method": "slerp",
        "parameters": {"t": raw["parameters"]["t"]},
        "base_model": str(FIXTURES / "ft_math"),
        "models": [{"model": str(FIXTURES / "ft_code")}],
        "output": {"format": "model", "dtype": "float32"},
    }
    cfg.write_text(yaml.safe_dump(native, sort_keys=False))
    code, _, err = run_cli(capsys, "merge", cfg, tmp_path / "out", "--quiet")
    assert code == 0, err
    merged, expected = load_state(tmp_path / "out"), _expected("slerp_gradient", base_state)
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[key], rtol=RTOL, atol=ATOL, msg=key)


def test_manifest_records_a_gradient_as_written(tmp_path, capsys):
    src = CONFIGS / "slerp_gradient.yaml"
    cfg = write_rewritten(src, tmp_path / src.name)
    assert run_cli(capsys, "merge", cfg, tmp_path / "out", "--quiet")[0] == 0
    manifest = json.loads((tmp_path / "out" / "starmerge.json").read_text())
    want = yaml.safe_load(src.read_text())["parameters"]["t"]
    assert manifest["config"]["parameters"]["t"] == want
    assert manifest["method"]["parameters"]["t"] == want
