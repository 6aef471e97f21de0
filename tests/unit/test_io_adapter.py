"""LoRA adapters as task vectors: PEFT's own merge is the reference; refusals by name."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys

import pytest
import torch
from io_fixtures import edit_adapter, make_peft_adapter, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file

from starmerge.errors import InputError, UnsupportedFeatureError
from starmerge.io.adapter import load_adapter, pattern_key
from starmerge.tensors.delta import LowRank

QV = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def plain(llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    make_peft_adapter(llama, out, r=4, lora_alpha=8, target_modules=QV, merge=False)
    return out


def assert_matches_peft(adapter_dir, reference):
    adapter = load_adapter(adapter_dir)
    assert set(adapter.shapes()) == set(reference)
    for key, expected in reference.items():
        delta = adapter.get(key)
        assert isinstance(delta, LowRank)
        assert adapter.shapes()[key] == tuple(expected.shape) == delta.shape
        torch.testing.assert_close(delta.to_dense(torch.float64), expected, atol=1e-6, rtol=1e-5)
    return adapter


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(r=4, lora_alpha=8, target_modules=QV),
        dict(r=4, lora_alpha=8, target_modules=QV, use_rslora=True),
        dict(
            r=4,
            lora_alpha=8,
            target_modules=QV + ["k_proj", "down_proj"],
            rank_pattern={"k_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
            alpha_pattern={"v_proj": 16, "model.layers.0.mlp.down_proj": 3},
        ),
    ],
    ids=["plain", "rslora", "patterns"],
)
def test_task_vector_equals_peft_merge(llama, tmp_path, kwargs):
    reference = make_peft_adapter(llama, tmp_path, **kwargs)
    adapter = assert_matches_peft(tmp_path, reference)
    assert adapter.base_model is None and adapter.task_type is None
    assert adapter.files == [tmp_path / "adapter_model.safetensors"]


def test_rank_and_alpha_patterns_per_module(llama, tmp_path):
    make_peft_adapter(
        llama,
        tmp_path,
        r=4,
        lora_alpha=8,
        target_modules=QV + ["k_proj"],
        rank_pattern={"k_proj": 2},
        alpha_pattern={"v_proj": 16},
        merge=False,
    )
    ad = load_adapter(tmp_path)
    k, v, q = (ad.get(f"model.layers.1.self_attn.{m}_proj.weight") for m in "kvq")
    assert (k.rank, k.scale) == (2, 8 / 2)
    assert (v.rank, v.scale) == (4, 16 / 4)
    assert (q.rank, q.scale) == (4, 8 / 4)


def test_rslora_scale(llama, tmp_path):
    make_peft_adapter(
        llama, tmp_path, r=4, lora_alpha=8, target_modules=QV, use_rslora=True, merge=False
    )
    assert load_adapter(tmp_path).get("model.layers.0.self_attn.q_proj.weight").scale == 8 / 2


def test_fan_in_fan_out_gpt2_conv1d(tmp_path):
    reference = make_peft_adapter(
        tiny_gpt2(), tmp_path, r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True
    )
    adapter = assert_matches_peft(tmp_path, reference)
    assert adapter.shapes()["transformer.h.0.attn.c_attn.weight"] == (32, 96)  # Conv1D (in, out)


def test_pattern_key_matches_peft():
    from peft.utils.other import get_pattern_key

    keys = ["k_proj", r"layers\.1\.self_attn\.q_proj", "model.layers.0.mlp.down_proj", "mlp"]
    names = [
        "model.layers.0.self_attn.k_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.11.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.0.mlp",
        "model.layers.0.xmlp",
        "k_proj",
    ]
    for name in names:
        ours = pattern_key(keys, name)
        assert (ours or name) == get_pattern_key(keys, name)


def test_adapter_name_in_keys_and_bin_file(plain, tmp_path):
    state = load_file(plain / "adapter_model.safetensors")
    named = {k.replace(".weight", ".default.weight"): v for k, v in state.items()}
    shutil.copy(plain / "adapter_config.json", tmp_path / "adapter_config.json")
    torch.save(named, tmp_path / "adapter_model.bin")
    ours, ref = load_adapter(tmp_path), load_adapter(plain)
    assert ours.shapes() == ref.shapes()
    for key in ref.shapes():
        torch.testing.assert_close(ours.get(key).to_dense(), ref.get(key).to_dense())


def test_keys_and_shapes_from_headers(plain):
    ad = load_adapter(plain)
    assert ad.keys()[0] == "model.layers.0.self_attn.q_proj.weight"
    assert ad.shapes()["model.layers.0.self_attn.v_proj.weight"] == (16, 32)  # 2 kv heads x 8


def copy_adapter(src, dst):
    shutil.copytree(src, dst)
    return dst


REFUSALS = {
    "dora": (dict(use_dora=True), "DoRA"),
    "bias": (dict(bias="all"), "LoRA bias (bias: all)"),
    "embedding": (dict(target_modules=["embed_tokens", "q_proj"]), "embedding LoRA"),
    "modules_to_save": (dict(modules_to_save=["lm_head"]), "modules_to_save"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refused_features_made_by_peft(llama, tmp_path, name):
    extra, feature = REFUSALS[name]
    make_peft_adapter(
        llama, tmp_path, **{"r": 4, "lora_alpha": 8, "target_modules": QV, **extra, "merge": False}
    )
    with pytest.raises(
        UnsupportedFeatureError, match=re.escape(f"adapter {tmp_path} uses {feature}")
    ) as e:
        load_adapter(tmp_path)
    assert "\n" not in str(e.value) and "merge_and_unload" in str(e.value)


def test_refused_dora_tensors_even_if_config_is_silent(llama, tmp_path):
    make_peft_adapter(
        llama, tmp_path, r=4, lora_alpha=8, target_modules=QV, use_dora=True, merge=False
    )
    edit_adapter(tmp_path, config={"use_dora": False})
    with pytest.raises(UnsupportedFeatureError, match=r"uses DoRA \(tensor '.*lora_magnitude"):
        load_adapter(tmp_path)


def test_refused_non_lora_peft_type(llama, tmp_path):
    from peft import IA3Config, get_peft_model

    get_peft_model(
        llama, IA3Config(target_modules=["k_proj"], feedforward_modules=[])
    ).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedFeatureError, match="uses peft_type 'IA3'"):
        load_adapter(tmp_path)


@pytest.mark.parametrize(
    ("config", "feature"),
    [
        ({"peft_type": "LOHA"}, "peft_type 'LOHA'"),
        ({"lora_bias": True}, r"LoRA bias \(lora_bias: true\)"),
        ({"use_bdlora": {"nblocks": 2}}, "the LoRA variant use_bdlora"),
        ({"kasa_config": {"x": 1}}, "the LoRA variant kasa_config"),
        ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights: pissa_niter_4"),
        ({"trainable_token_indices": [1, 2]}, "trainable tokens"),
    ],
)
def test_refused_config_features(plain, tmp_path, config, feature):
    edit_adapter(copy_adapter(plain, tmp_path / "a"), config=config)
    with pytest.raises(UnsupportedFeatureError, match=feature):
        load_adapter(tmp_path / "a")


@pytest.mark.parametrize(
    ("tensor_key", "shape", "feature"),
    [
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight",
            (2, 2),
            r"tensor 'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_C\.weight', "
            "which the LoRA loader does not understand",
        ),
        ("base_model.model.lm_head.weight", (128, 32), "tensor 'base_model.model.lm_head.weight'"),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", (32,), "LoRA bias"),
        ("base_model.model.model.embed_tokens.lora_embedding_A", (4, 128), "embedding LoRA"),
    ],
)
def test_refused_unknown_tensors(plain, tmp_path, tensor_key, shape, feature):
    edit_adapter(copy_adapter(plain, tmp_path / "a"), tensors={tensor_key: torch.zeros(shape)})
    with pytest.raises(UnsupportedFeatureError, match=feature):
        load_adapter(tmp_path / "a")


def test_refused_conv_lora(plain, tmp_path):
    prefix = "base_model.model.conv"
    convs = {
        f"{prefix}.lora_A.weight": torch.zeros(4, 3, 3, 3),
        f"{prefix}.lora_B.weight": torch.zeros(8, 4, 1, 1),
    }
    edit_adapter(copy_adapter(plain, tmp_path / "a"), tensors=convs)
    with pytest.raises(UnsupportedFeatureError, match=r"conv LoRA \(module 'conv'"):
        load_adapter(tmp_path / "a")


def test_rank_mismatch_with_config(plain, tmp_path):
    edit_adapter(copy_adapter(plain, tmp_path / "a"), config={"r": 8})
    with pytest.raises(InputError, match=r"has r=8 in adapter_config.json but lora_A \(4, 32\)"):
        load_adapter(tmp_path / "a")


def test_missing_lora_b(plain, tmp_path):
    edit_adapter(copy_adapter(plain, tmp_path / "a"), drop=("layers.0.self_attn.q_proj.lora_B",))
    with pytest.raises(InputError, match="module 'model.layers.0.self_attn.q_proj' has no lora_B"):
        load_adapter(tmp_path / "a")


def test_truncated_adapter_names_file(plain, tmp_path):
    ad = copy_adapter(plain, tmp_path / "a")
    file = ad / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(
        InputError, match=f"cannot read {file}: .*truncated or corrupt.*re-download"
    ):
        load_adapter(ad)


def test_nan_in_lora_b(plain, tmp_path):
    ad = copy_adapter(plain, tmp_path / "a")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    bad = load_file(ad / "adapter_model.safetensors")[key].clone()
    bad[0, 0] = math.nan
    edit_adapter(ad, tensors={key: bad})
    adapter = load_adapter(ad)  # headers only: still fine
    adapter.get("model.layers.0.self_attn.q_proj.weight")
    msg = f"adapter {ad}: tensor '{key}' contains NaN or Inf values; re-train or re-export"
    with pytest.raises(InputError, match=msg):
        adapter.get("model.layers.1.self_attn.v_proj.weight")
    with pytest.raises(InputError, match="NaN or Inf"):
        adapter.check_finite()
    load_adapter(plain).check_finite()


def test_missing_files(tmp_path, plain):
    with pytest.raises(InputError, match="has no adapter_config.json"):
        load_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(InputError, match="has no adapter_model.safetensors or adapter_model.bin"):
        load_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot read .*adapter_config.json"):
        load_adapter(tmp_path)


def test_several_adapters_in_one_file(plain, tmp_path):
    state = load_file(plain / "adapter_model.safetensors")
    both = {k.replace(".weight", f".{n}.weight"): v.clone() for k, v in state.items() for n in "ab"}
    ad = copy_adapter(plain, tmp_path / "a")
    save_file(both, ad / "adapter_model.safetensors")
    with pytest.raises(InputError, match=r"holds several adapters \(\['a', 'b'\]\)"):
        load_adapter(ad)


def test_import_does_not_load_transformers_or_peft():
    code = (
        "import sys, starmerge.io, starmerge.io.adapter, starmerge.io.adapter_writer; "
        "print([m for m in ('transformers', 'peft', 'huggingface_hub') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("config", "field", "shown"),
    [
        ({"lora_alpha": "8"}, "lora_alpha", "'8'"),
        ({"lora_alpha": None}, "lora_alpha", "None"),
        ({"lora_alpha": [8]}, "lora_alpha", "[8]"),
        ({"lora_alpha": True}, "lora_alpha", "True"),
        ({"lora_alpha": 0}, "lora_alpha", "0"),
        ({"lora_alpha": -8}, "lora_alpha", "-8"),
        ({"lora_alpha": math.nan}, "lora_alpha", "nan"),
        ({"lora_alpha": math.inf}, "lora_alpha", "inf"),
        ({"alpha_pattern": {"q_proj": "x"}}, "alpha_pattern['q_proj']", "'x'"),
        ({"alpha_pattern": {"q_proj": 0.0}}, "alpha_pattern['q_proj']", "0.0"),
        ({"r": "4"}, "r", "'4'"),
        ({"r": 4.0}, "r", "4.0"),
        ({"r": 0}, "r", "0"),
        ({"rank_pattern": {"q_proj": -1}}, "rank_pattern['q_proj']", "-1"),
    ],
)
def test_refused_ranks_and_alphas(plain, tmp_path, config, field, shown):
    ad = edit_adapter(copy_adapter(plain, tmp_path / "a"), config=config)
    want = "a positive integer" if field.startswith("r") else "a positive finite number"
    with pytest.raises(InputError) as err:
        load_adapter(ad)
    assert str(err.value) == (
        f"adapter {ad}: {field} must be {want} (as PEFT reads it), got {shown}; "
        "fix adapter_config.json or re-save the adapter with PEFT"
    )


@pytest.mark.parametrize(
    ("config", "shown"),
    [({"alpha_pattern": "q_proj"}, "'q_proj'"), ({"rank_pattern": ["q_proj"]}, "['q_proj']")],
)
def test_refused_patterns_that_are_not_mappings(plain, tmp_path, config, shown):
    ad = edit_adapter(copy_adapter(plain, tmp_path / "a"), config=config)
    field = next(iter(config))
    with pytest.raises(InputError) as err:
        load_adapter(ad)
    assert str(err.value) == (
        f"adapter {ad}: {field} must be a mapping of module patterns to values (or null), "
        f"got {shown}; fix adapter_config.json"
    )


@pytest.mark.parametrize("alpha", [1e308, 10**400])
def test_refused_alpha_whose_scale_overflows(plain, tmp_path, alpha):
    ad = copy_adapter(plain, tmp_path / "a")
    cfg = ad / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"lora_alpha": 8', f'"lora_alpha": {alpha!r}'))
    with pytest.raises(InputError, match="a scale that overflows float32; fix lora_alpha") as e:
        load_adapter(ad)
    assert "module 'model.layers.0.self_attn.q_proj' has lora_alpha" in str(e.value)
    assert len(str(e.value)) < 400  # a 400-digit alpha is not printed whole


@pytest.mark.parametrize("alpha", [16.0, 6.5])
def test_float_alpha_accepted_as_peft_does(tmp_path, alpha):
    llama = tiny_llama()  # fresh: test_refused_non_lora_peft_type wraps the shared one
    reference = make_peft_adapter(llama, tmp_path, r=4, lora_alpha=alpha, target_modules=QV)
    adapter = assert_matches_peft(tmp_path, reference)
    assert adapter.get("model.layers.0.self_attn.q_proj.weight").scale == alpha / 4


def test_refused_integer_factors(plain, tmp_path):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    ad = copy_adapter(plain, tmp_path / "a")
    edit_adapter(ad, tensors={key: torch.ones(4, 32, dtype=torch.int32)})
    with pytest.raises(InputError) as err:
        load_adapter(ad)
    assert str(err.value) == (
        f"adapter {ad}: LoRA factor '{key}' has dtype torch.int32, not a floating-point type; "
        "re-export the adapter in float32, bfloat16 or float16"
    )


def test_refused_empty_adapter(plain, tmp_path):
    ad = copy_adapter(plain, tmp_path / "a")
    save_file({}, ad / "adapter_model.safetensors")
    with pytest.raises(InputError) as err:
        load_adapter(ad)
    assert str(err.value) == (
        f"adapter {ad} adapts nothing: adapter_model.safetensors holds no lora_A/lora_B "
        "tensors; give an adapter saved after training (PeftModel.save_pretrained)"
    )


def _base_index(model, directory):
    from starmerge.io.checkpoint import TensorIndex

    model.save_pretrained(directory)
    return TensorIndex.open(directory)


def test_fan_in_fan_out_ignored_on_linear_as_peft_does(tmp_path):
    """Llama's q/k/up are nn.Linear: PEFT resets the flag, so the delta is not transposed."""
    llama = tiny_llama()
    targets = ["q_proj", "k_proj", "up_proj"]  # square, (16, 32) with GQA, (64, 32)
    reference = make_peft_adapter(llama, tmp_path / "a", r=4, lora_alpha=8, target_modules=targets)
    edit_adapter(tmp_path / "a", config={"fan_in_fan_out": True})
    base = _base_index(llama, tmp_path / "base")
    adapter = load_adapter(tmp_path / "a", base)
    assert adapter.fan_in_fan_out and adapter.transposed == frozenset()
    for key, expected in reference.items():
        assert adapter.shapes()[key] == tuple(expected.shape) == base.shape(key)
        torch.testing.assert_close(adapter.get(key).to_dense(torch.float64), expected)


@pytest.mark.parametrize("flag", [True, False])
def test_fan_in_fan_out_on_conv1d_decided_by_base(tmp_path, flag):
    """GPT-2's Conv1D: transposed whatever the flag says (PEFT forces it), square c_proj too."""
    gpt2 = tiny_gpt2()
    reference = make_peft_adapter(
        gpt2, tmp_path / "a", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"]
    )
    edit_adapter(tmp_path / "a", config={"fan_in_fan_out": flag})
    adapter = load_adapter(tmp_path / "a", _base_index(gpt2, tmp_path / "base"))
    assert adapter.transposed == frozenset(reference)
    assert "transformer.h.0.attn.c_proj.weight" in reference  # the square (32, 32) module
    for key, expected in reference.items():
        torch.testing.assert_close(adapter.get(key).to_dense(torch.float64), expected)


def test_fan_in_fan_out_square_only_follows_the_flag(tmp_path):
    """Only square modules: the shape cannot tell, so the flag PEFT saved decides."""
    llama = tiny_llama()
    make_peft_adapter(llama, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"])
    base = _base_index(llama, tmp_path / "base")
    assert load_adapter(tmp_path / "a", base).transposed == frozenset()
    edit_adapter(tmp_path / "a", config={"fan_in_fan_out": True})
    assert len(load_adapter(tmp_path / "a", base).transposed) == 2  # q_proj of both layers
