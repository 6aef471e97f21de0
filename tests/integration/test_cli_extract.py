"""``starmerge extract`` end to end: a tiny random Llama, a fine-tune of it, PEFT loads the result.

The fine-tune is the base plus, in every linear layer, a random low-rank update (rank 1 to 4 by
module) and a little noise. PEFT's ``PeftModel.from_pretrained(base, out).merge_and_unload()``
must give base + our factors exactly, and our factors must be the best rank-k approximation of
the fine-tune's change, from an independent float64 SVD.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tests.integration.helpers import load_state, refused, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

PREFIX = "base_model.model."
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _fine_tune(base_dir, out_dir, *, seed: int, norm_shift: float = 0.0):
    """Save base + a rank-(1..4) update + noise in every linear layer (and a shifted norm)."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.split(".")[-2]
            if leaf in LINEAR:
                r = 1 + LINEAR.index(leaf) % 4
                b = torch.randn(p.shape[0], r, generator=gen)
                p.add_(0.1 * b @ torch.randn(r, p.shape[1], generator=gen))
                p.add_(1e-3 * torch.randn(p.shape, generator=gen))
        model.model.norm.weight.add_(norm_shift)
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def pair(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    base = tiny_models["llama"]
    return (
        base,
        _fine_tune(base, root / "ft", seed=7),
        _fine_tune(base, root / "ftn", seed=8, norm_shift=0.5),
    )


def _peft_merged(base_dir, adapter_dir) -> dict[str, torch.Tensor]:
    import transformers as tf
    from peft import PeftModel

    base = tf.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def _best(delta: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def _check_adapter(base_dir, ft_dir, out) -> dict:
    """PEFT's merge equals base + our factors; the factors are the best rank-k approximation."""
    config = json.loads((out / "adapter_config.json").read_text())
    manifest = json.loads((out / "starmerge.json").read_text())
    factors = load_file(out / "adapter_model.safetensors")
    base, ft = load_state(base_dir), load_state(ft_dir)
    merged = _peft_merged(base_dir, out)
    assert len(config["target_modules"]) == 2 * len(LINEAR)
    for module in config["target_modules"]:
        key = f"{module}.weight"
        a = factors[f"{PREFIX}{module}.lora_A.weight"].double()
        ours = factors[f"{PREFIX}{module}.lora_B.weight"].double() @ a
        want = base[key].double() + ours
        torch.testing.assert_close(merged[key].double(), want, atol=1e-6, rtol=1e-6)
        k = manifest["modules"][module]["rank"]
        assert a.shape[0] == k
        best = _best(ft[key].double() - base[key].double(), k)
        torch.testing.assert_close(ours, best, atol=2e-5, rtol=1e-4)
    for key in set(base) - {f"{m}.weight" for m in config["target_modules"]}:
        assert torch.equal(merged[key], base[key]) or key in _saved(manifest)
    return manifest


def _saved(manifest: dict) -> set[str]:
    return {f"{m}.weight" for m in manifest["modules_to_save"]}


def test_rank_adapter_loads_in_peft(tmp_path, capsys, pair):
    base, ft, _ = pair
    code, out, err = run_cli(
        capsys, "extract", base, ft, tmp_path / "out", "--rank", "2", "--quiet"
    )
    assert code == 0, err
    assert "extracted 14 modules (rank 2-2" in out
    manifest = _check_adapter(base, ft, tmp_path / "out")
    assert {m["rank"] for m in manifest["modules"].values()} == {2}
    assert "model.norm.weight" in manifest["unchanged"]


def test_energy_adapter_with_rank_pattern_loads_in_peft(tmp_path, capsys, pair):
    base, ft, _ = pair
    argv = ["extract", "--base", base, "--model", ft, tmp_path / "out", "--energy", "0.99"]
    code, _, err = run_cli(capsys, *argv, "--quiet")
    assert code == 0, err
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["alpha_pattern"] == config["rank_pattern"]
    manifest = _check_adapter(base, ft, tmp_path / "out")
    ranks = {m.split(".")[-1]: v["rank"] for m, v in manifest["modules"].items()}
    assert ranks["q_proj"] == 1 and ranks["k_proj"] == 2 and ranks["o_proj"] == 4
    assert all(m["energy_kept"] >= 0.99 for m in manifest["modules"].values())


def test_modules_to_save_loads_in_peft(tmp_path, capsys, pair):
    base, _, ftn = pair
    argv = ["extract", base, ftn, tmp_path / "out", "--rank", "4", "--modules-to-save", "--quiet"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    manifest = _check_adapter(base, ftn, tmp_path / "out")
    assert manifest["modules_to_save"] == ["model.norm"]
    merged = _peft_merged(base, tmp_path / "out")
    torch.testing.assert_close(merged["model.norm.weight"], load_state(ftn)["model.norm.weight"])


def test_gpt2_conv1d_adapter_loads_in_peft(tmp_path, capsys):
    import transformers as tf
    from peft import PeftModel

    config = tf.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=100, n_positions=16)
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(config)
    model.save_pretrained(tmp_path / "base")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight.add_(
            0.1 * torch.randn(32, 1) @ torch.randn(1, 96)
        )
    model.save_pretrained(tmp_path / "ft")
    code, _, err = run_cli(
        capsys,
        "extract",
        tmp_path / "base",
        tmp_path / "ft",
        tmp_path / "out",
        "--rank",
        "1",
        "--quiet",
    )
    assert code == 0, err
    base = tf.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    merged = PeftModel.from_pretrained(base, tmp_path / "out").merge_and_unload().state_dict()
    key = "transformer.h.0.attn.c_attn.weight"
    torch.testing.assert_close(merged[key], model.state_dict()[key], atol=1e-6, rtol=1e-6)
    assert torch.equal(
        merged["transformer.h.0.attn.c_proj.weight"], before["transformer.h.0.attn.c_proj.weight"]
    )


def test_tied_embeddings_stay_tied_in_peft(tmp_path, capsys):
    """A saved input embedding of a tied model is saved as lm_head too (PEFT copies each)."""
    import transformers as tf

    from conftest import tiny_config

    config = tiny_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(0.5)
        model.model.layers[0].self_attn.q_proj.weight.add_(0.1)
    model.save_pretrained(tmp_path / "ft")
    argv = [
        tmp_path / "base",
        tmp_path / "ft",
        tmp_path / "out",
        "--rank",
        "1",
        "--modules-to-save",
    ]
    code, _, err = run_cli(capsys, "extract", *argv, "--quiet")
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "starmerge.json").read_text())
    assert manifest["modules_to_save"] == ["lm_head", "model.embed_tokens"]
    merged = _peft_merged(tmp_path / "base", tmp_path / "out")
    want = model.model.embed_tokens.weight.detach()
    torch.testing.assert_close(merged["model.embed_tokens.weight"], want, atol=0, rtol=0)
    torch.testing.assert_close(merged["lm_head.weight"], want, atol=0, rtol=0)


def _nan_model(pair, tmp_path):
    from safetensors.torch import save_file

    state = load_state(pair[1])
    state["model.layers.1.mlp.down_proj.weight"][0, 0] = float("inf")
    (tmp_path / "nan").mkdir()
    save_file(state, str(tmp_path / "nan" / "model.safetensors"))
    return tmp_path / "nan"


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        (
            "norm",
            ("model.norm.weight (not a 2-D matrix)", "--modules-to-save", "--skip-non-matrix"),
        ),
        ("inside", ("lies inside the input fine-tuned model",)),
        ("both", ("exactly one of --rank",)),
        ("neither", ("exactly one of --rank",)),
        ("nan", ("down_proj.weight' contains NaN or Inf",)),
        ("flags", ("at most one of --modules-to-save and --skip-non-matrix",)),
        ("paths", ("give BASE FINETUNED OUT_DIR",)),
        ("rank", ("--rank must be a positive integer, got 0",)),
    ],
)
def test_refusals_exit_2_with_one_line_and_touch_nothing(tmp_path, capsys, pair, case, needles):
    base, ft, ftn = pair
    out = tmp_path / "out"
    argv = {
        "norm": [base, ftn, out, "--rank", "2"],
        "inside": [base, ft, ft / "adapter", "--rank", "2"],
        "both": [base, ft, out, "--rank", "2", "--energy", "0.9"],
        "neither": [base, ft, out],
        "nan": [base, _nan_model(pair, tmp_path) if case == "nan" else ft, out, "--rank", "2"],
        "flags": [base, ft, out, "--rank", "2", "--modules-to-save", "--skip-non-matrix"],
        "paths": [base, out, "--rank", "2"],
        "rank": [base, ft, out, "--rank", "0"],
    }[case]
    refused(capsys, ["extract", *argv, "--quiet"], [base, ft, ftn, out], *needles)
    assert not out.exists() and not (ft / "adapter").exists()
