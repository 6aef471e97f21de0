"""Merge spaces through the CLI: ``space: core | knots`` into an exact adapter, and refusals."""

from __future__ import annotations

import json

import pytest
import torch
from tests.integration.helpers import (
    load_state,
    peft_dense_deltas,
    refused,
    run_cli,
    write_config,
)


@pytest.fixture(scope="module")
def references(tiny_models, llama_adapters):
    """PEFT's own task vectors (merge_and_unload minus base), float64."""
    base = tiny_models["llama"]
    return [peft_dense_deltas(base, a) for a in llama_adapters]


def _peft_merged(base, adapter_dir):
    import transformers as tf
    from peft import PeftModel

    model = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base), adapter_dir)
    return model.merge_and_unload().state_dict()


@pytest.mark.parametrize("how", ["yaml", "override"])
@pytest.mark.parametrize("space", ["core", "knots"])
def test_task_arithmetic_in_a_space_is_an_exact_adapter(
    tmp_path, capsys, tiny_models, llama_adapters, references, space, how
):
    base = tiny_models["llama"]
    extra = {"space": space} if how == "yaml" else {}
    cfg = write_config(
        tmp_path / "ta.yaml",
        method="task_arithmetic",
        parameters={"scaling": 0.7},
        base_model=str(base),
        models=[{"adapter": str(a)} for a in llama_adapters],
        output={"format": "adapter", "dtype": "float32"},
        **extra,
    )
    argv = ["merge", cfg, tmp_path / "out", "--quiet"]
    code, _, err = run_cli(capsys, *argv, *([] if how == "yaml" else [f"space={space}"]))
    assert code == 0, err
    merged, base_state = _peft_merged(base, tmp_path / "out"), load_state(base)
    keys = set().union(*references)
    for key in keys:
        want = base_state[key].double() + 0.7 * sum(r[key] for r in references if key in r)
        torch.testing.assert_close(merged[key].double(), want, rtol=1e-5, atol=1e-6)
    manifest = json.loads((tmp_path / "out" / "starmerge.json").read_text())
    assert manifest["config"]["space"] == space
    assert manifest["space"]["name"] == space and manifest["space"]["parameters"] == len(keys)
    k_proj = manifest["statistics"]["per_parameter"]["model.layers.0.self_attn.k_proj.weight"]
    assert k_proj["core_shape"][0] == 2  # only the third adapter has k_proj, at rank 2


def test_ties_in_core_space_adapter_equals_model_output(
    tmp_path, capsys, tiny_models, llama_adapters
):
    """An elementwise method in core space: the adapter is exact (no output.rank needed)."""
    base = tiny_models["llama"]
    for fmt in ("model", "adapter"):
        cfg = write_config(
            tmp_path / f"{fmt}.yaml",
            method="ties",
            parameters={"density": 0.3},
            base_model=str(base),
            models=[{"adapter": str(a)} for a in llama_adapters],
            output={"format": fmt, "dtype": "float32"},
            space="core",
        )
        code, _, err = run_cli(capsys, "merge", cfg, tmp_path / fmt, "--quiet")
        assert code == 0, err
    model_out, via_adapter = (
        load_state(tmp_path / "model"),
        _peft_merged(base, tmp_path / "adapter"),
    )
    for key, tensor in model_out.items():
        torch.testing.assert_close(via_adapter[key], tensor, rtol=1e-5, atol=1e-6)
    manifest = json.loads((tmp_path / "adapter" / "starmerge.json").read_text())
    q_proj = manifest["statistics"]["per_parameter"]["model.layers.0.self_attn.q_proj.weight"]
    assert q_proj["core_shape"] == [12, 12] and "svd_energy_kept" not in q_proj  # 3 x rank 4
    assert manifest["space"]["rows"]["max"] == 12


def test_validate_accepts_a_space(tmp_path, capsys, tiny_models, llama_adapters):
    cfg = write_config(
        tmp_path / "c.yaml",
        method="ties",
        models=[{"adapter": str(a)} for a in llama_adapters],
        output={"format": "adapter"},
        space="knots",
    )
    code, out, err = run_cli(capsys, "validate", cfg)
    assert code == 0 and out.strip().endswith("ok"), err


def _config(tmp_path, tiny_models, llama_adapters, **overrides):
    cfg = {
        "method": "task_arithmetic",
        "base_model": str(tiny_models["llama"]),
        "models": [{"adapter": str(a)} for a in llama_adapters[:2]],
        "output": {"format": "model"},
        **overrides,
    }
    return write_config(tmp_path / "c.yaml", **cfg)


@pytest.mark.parametrize(
    "overrides,needles",
    [
        ({"space": "kore"}, ["space must be one of full, core, knots, got 'kore'", "core?"]),
        (
            {"method": "mats", "parameters": {"objective": "average"}, "space": "core"},
            ["mats does not run in space core (its data step", "use space: full"],
        ),
        (
            {"models": "FULL", "space": "core"},
            ["space: core merges LoRA adapters", "models[1] is a full fine-tuned model"],
        ),
    ],
    ids=["unknown-space", "data-method", "full-fine-tune"],
)
def test_refusals_are_one_error_line(
    tmp_path, capsys, tiny_models, llama_adapters, overrides, needles
):
    if overrides.get("models") == "FULL":
        overrides["models"] = [
            {"adapter": str(llama_adapters[0])},
            {"model": str(tiny_models["mistral"])},
        ]
    cfg = _config(tmp_path, tiny_models, llama_adapters, **overrides)
    out = tmp_path / "out"
    refused(capsys, ["merge", cfg, out], [out, cfg, *llama_adapters], *needles)
    refused(capsys, ["validate", cfg], [cfg], *needles)
