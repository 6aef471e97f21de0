"""Numbers and adapter configs (issue 10, items 2 and 3): no non-finite model is ever written.

Every refusal: exit code 2, one `error:` line naming the problem, what was received and the fix,
no traceback, every input and OUT_DIR byte-identical afterwards (``tree_hash``). And
``fan_in_fan_out`` is read as PEFT reads it (compared with PEFT's own ``merge_and_unload``).
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.integration.helpers import (
    load_state,
    peft_dense_deltas,
    refused,
    run_cli,
    write_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")
NAN, INF = math.nan, math.inf


@pytest.fixture
def inputs(tmp_path, tiny_models, llama_adapters):
    """Private copies of the tiny llama and two adapters (a refusal test cannot hurt others)."""
    root = tmp_path / "inputs"
    return {
        "base": shutil.copytree(tiny_models["llama"], root / "base"),
        "a": shutil.copytree(llama_adapters[0], root / "a"),
        "b": shutil.copytree(llama_adapters[2], root / "b"),
    }


def _config(tmp_path, inputs, *, method="task_arithmetic", models=None, **extra):
    models = models or [{"adapter": str(inputs["a"])}, {"adapter": str(inputs["b"])}]
    return write_config(
        tmp_path / "c.yaml", method=method, base_model=str(inputs["base"]), models=models, **extra
    )


def _refused(capsys, cfg, out_dir, inputs, *needles):
    """``starmerge merge CFG OUT_DIR``: the refusal contract; returns the error line."""
    watched = [cfg, out_dir, *inputs.values()]
    line = refused(capsys, ["merge", cfg, out_dir, "--quiet"], watched, *needles)
    assert not [p for p in out_dir.parent.iterdir() if ".tmp" in p.name]
    return line


@pytest.mark.parametrize(
    ("method", "parameters", "needle"),
    [
        ("task_arithmetic", {"scaling": NAN}, "task_arithmetic: scaling must be a finite number"),
        ("task_arithmetic", {"scaling": INF}, "task_arithmetic: scaling must be a finite number"),
        ("task_arithmetic", {"scaling": 1e308}, "scaling must be in [-1000, 1000], got 1e+308"),
        ("task_arithmetic", {"weights": [NAN, 1]}, "weights must hold finite numbers (entry 0"),
        ("ties", {"scaling": INF}, "ties: scaling must be a finite number, got inf"),
        ("consensus", {"alpha": INF}, "consensus: alpha must be a finite number, got inf"),
        ("star", {"eta": NAN}, "star: eta must be a finite number, got nan"),
    ],
)
def test_non_finite_parameter(tmp_path, capsys, inputs, method, parameters, needle):
    cfg = _config(tmp_path, inputs, method=method, parameters=parameters)
    line = _refused(capsys, cfg, tmp_path / "out", inputs, needle)
    assert "fix the value in `parameters:`" in line or "must be in" in line


@pytest.mark.parametrize(
    ("weight", "needle"),
    [
        (INF, "models[1].weight must be a finite number, got inf; give a number such as 1.0"),
        (NAN, "models[1].weight must be a finite number, got nan"),
        (1e308, "task_arithmetic: weights must hold numbers in [-1000, 1000] (entry 1 is not)"),
    ],
)
def test_non_finite_model_weight(tmp_path, capsys, inputs, weight, needle):
    models = [{"adapter": str(inputs["a"])}, {"adapter": str(inputs["b"]), "weight": weight}]
    cfg = _config(tmp_path, inputs, models=models)
    _refused(capsys, cfg, tmp_path / "out", inputs, needle)


def _poison(model_dir, key, value=NAN):
    """Set one entry of tensor ``key`` in the model's safetensors file to ``value``."""
    file = model_dir / "model.safetensors"
    state = load_file(file)
    state[key] = state[key].clone()
    state[key].view(-1)[3] = value
    save_file(state, file, metadata={"format": "pt"})


@pytest.mark.parametrize("value", [NAN, INF])
def test_full_fine_tune_with_nan(tmp_path, capsys, inputs, value):
    ft = shutil.copytree(inputs["base"], tmp_path / "inputs" / "ft")
    _poison(ft, "model.layers.1.self_attn.v_proj.weight", value)
    inputs = {**inputs, "ft": ft}
    cfg = _config(tmp_path, inputs, models=[{"adapter": str(inputs["a"])}, {"model": str(ft)}])
    _refused(
        capsys,
        cfg,
        tmp_path / "out",
        inputs,
        f"model ft ({ft}): tensor 'model.layers.1.self_attn.v_proj.weight' contains NaN or Inf",
        "give a checkpoint with finite weights",
    )


@pytest.mark.parametrize(
    "key", ["model.norm.weight", "model.layers.0.self_attn.q_proj.weight"], ids=["kept", "merged"]
)
def test_base_model_with_nan(tmp_path, capsys, inputs, key):
    _poison(inputs["base"], key)
    cfg = _config(tmp_path, inputs)
    _refused(
        capsys,
        cfg,
        tmp_path / "out",
        inputs,
        f"base model {inputs['base']}: tensor '{key}' contains NaN or Inf values",
        "give a base model with finite weights",
    )


def _edit_config(adapter, text_edit):
    file = adapter / "adapter_config.json"
    file.write_text(text_edit(file.read_text()))


def _set(field, raw):
    """An edit of adapter_config.json setting ``field`` to the raw JSON text ``raw``."""

    def edit(text):
        config = json.loads(text)
        config[field] = "@@"
        return json.dumps(config).replace('"@@"', raw)

    return edit


@pytest.mark.parametrize(
    ("field", "raw", "shown"),
    [
        ("lora_alpha", '"8"', "'8'"),
        ("lora_alpha", "null", "None"),
        ("lora_alpha", "[8]", "[8]"),
        ("lora_alpha", "true", "True"),
        ("lora_alpha", "0", "0"),
        ("lora_alpha", "-8", "-8"),
        ("lora_alpha", "NaN", "nan"),
        ("lora_alpha", "Infinity", "inf"),
        ("alpha_pattern", '{"q_proj": "x"}', "'x'"),
        ("alpha_pattern", '"q_proj"', "'q_proj'"),
        ("rank_pattern", '["q_proj"]', "['q_proj']"),
    ],
)
def test_adapter_config_numbers(tmp_path, capsys, inputs, field, raw, shown):
    _edit_config(inputs["a"], _set(field, raw))
    cfg = _config(tmp_path, inputs)
    line = _refused(capsys, cfg, tmp_path / "out", inputs, f"adapter {inputs['a']}: {field}")
    assert f"got {shown};" in line and "fix adapter_config.json" in line


def test_adapter_alpha_whose_scale_overflows(tmp_path, capsys, inputs):
    _edit_config(inputs["a"], _set("lora_alpha", "1e308"))
    cfg = _config(tmp_path, inputs)
    _refused(
        capsys,
        cfg,
        tmp_path / "out",
        inputs,
        "has lora_alpha 1e+308 and r 4, a scale that overflows float32; fix lora_alpha",
    )


def test_adapter_integer_factors(tmp_path, capsys, inputs):
    file = inputs["a"] / "adapter_model.safetensors"
    state = load_file(file)
    key = next(k for k in state if "lora_B" in k)
    save_file({**state, key: (state[key] * 100).to(torch.int32)}, file)
    cfg = _config(tmp_path, inputs)
    _refused(capsys, cfg, tmp_path / "out", inputs, f"'{key}' has dtype torch.int32", "float32")


def test_adapter_with_no_tensors(tmp_path, capsys, inputs):
    save_file({}, inputs["a"] / "adapter_model.safetensors")
    cfg = _config(tmp_path, inputs)
    _refused(capsys, cfg, tmp_path / "out", inputs, f"adapter {inputs['a']} adapts nothing")


def _scale_factors(adapter, factor):
    file = adapter / "adapter_model.safetensors"
    save_file({k: v * factor for k, v in load_file(file).items()}, file)


def test_merged_overflow_in_float32_is_not_written(tmp_path, capsys, inputs):
    """Finite inputs and parameters whose merge overflows: the last check names the key."""
    _scale_factors(inputs["a"], 1e18)  # B @ A ~ 1e36, times scaling 1000: beyond float32
    cfg = _config(tmp_path, inputs, parameters={"scaling": 1000})
    _refused(
        capsys,
        cfg,
        tmp_path / "out",
        inputs,
        "the task_arithmetic merge of 'model.layers.0.self_attn.q_proj.weight' is not finite",
        "'scaling': 1000",
    )


def test_merged_overflow_in_float16_is_not_written(tmp_path, capsys, inputs):
    _scale_factors(inputs["a"], 100.0)  # entries ~1e3, times 1000: beyond float16's 65504
    cfg = _config(tmp_path, inputs, parameters={"scaling": 1000}, output={"dtype": "float16"})
    _refused(
        capsys,
        cfg,
        tmp_path / "out",
        inputs,
        "the merged 'model.layers.0.self_attn.q_proj.weight' is not finite in float16",
        "set output.dtype: float32",
    )


def _merge(capsys, tmp_path, base, adapter, fmt="model"):
    cfg = write_config(
        tmp_path / f"{fmt}.yaml",
        method="task_arithmetic",
        base_model=str(base),
        models=[{"adapter": str(adapter)}],
        output={"format": fmt},
    )
    out = tmp_path / f"out_{fmt}"
    code, _, err = run_cli(capsys, "merge", cfg, out, "--quiet")
    assert code == 0, err
    return out


def _assert_equals_peft(base, out, reference):
    merged, before = load_state(out), load_state(base)
    for key, expected in reference.items():
        got = merged[key].double() - before[key].double()
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    changed = {k for k in before if not torch.equal(merged[k], before[k])}
    assert changed == set(reference)


def test_fan_in_fan_out_on_llama_follows_peft(tmp_path, capsys, inputs):
    """The flag on nn.Linear (square q_proj, GQA k_proj, up_proj): ignored, as PEFT does."""
    from tests.conftest import make_adapter

    targets = ["q_proj", "k_proj", "up_proj"]
    adapter = make_adapter(inputs["base"], tmp_path / "fifo", targets=targets, seed=5)
    _edit_config(adapter, _set("fan_in_fan_out", "true"))
    reference = peft_dense_deltas(inputs["base"], adapter)  # PEFT warns and resets the flag
    assert any(ref.shape[0] == ref.shape[1] for ref in reference.values())
    assert any(ref.shape[0] != ref.shape[1] for ref in reference.values())
    out = _merge(capsys, tmp_path, inputs["base"], adapter)
    _assert_equals_peft(inputs["base"], out, reference)
    manifest = json.loads((out / "starmerge.json").read_text())
    layout = manifest["statistics"]["fan_in_fan_out"]
    assert layout == {"models[0]": {"flag": True, "transposed": []}}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A tiny GPT-2 (Conv1D layers, weights stored (in, out)) and a PEFT adapter on it."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    tf.GPT2LMHeadModel(config).save_pretrained(root / "base")
    model = tf.GPT2LMHeadModel.from_pretrained(root / "base")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    peft_model = get_peft_model(model, lora)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    peft_model.save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


@pytest.mark.parametrize("flag", ["true", "false"])
def test_fan_in_fan_out_on_gpt2_conv1d_follows_peft(tmp_path, capsys, gpt2, flag):
    """Conv1D (c_attn (32, 96), square c_proj): transposed whatever the flag, as PEFT does."""
    base, adapter = gpt2
    adapter = shutil.copytree(adapter, tmp_path / "adapter")
    _edit_config(adapter, _set("fan_in_fan_out", flag))
    reference = peft_dense_deltas(base, adapter)
    out = _merge(capsys, tmp_path, base, adapter)
    _assert_equals_peft(base, out, reference)
    layout = json.loads((out / "starmerge.json").read_text())["statistics"]["fan_in_fan_out"]
    assert layout["models[0]"] == {"flag": flag == "true", "transposed": sorted(reference)}
    # the adapter output, loaded by PEFT, gives the same weights
    out_adapter = _merge(capsys, tmp_path, base, adapter, fmt="adapter")
    assert json.loads((out_adapter / "adapter_config.json").read_text())["fan_in_fan_out"]
    for key, delta in peft_dense_deltas(base, out_adapter).items():
        torch.testing.assert_close(delta, reference[key], atol=1e-5, rtol=1e-4)
