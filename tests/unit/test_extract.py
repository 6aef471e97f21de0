"""``starmerge extract`` on hand-made checkpoints: factors, ranks, rank_pattern, lists, refusals.

Every expectation comes from an independent float64 SVD (``torch.linalg.svd`` in the test) or a
hand-worked spectrum; no test calls the library's own rank or SVD helpers to get its answer.
"""

from __future__ import annotations

import gc
import hashlib
import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from starmerge.errors import InputError, OutputError
from starmerge.extract import ExtractOptions, choose_rank
from starmerge.extract_write import run_extract
from starmerge.io.checkpoint import TensorIndex

Q = "model.layers.0.self_attn.q_proj"
K = "model.layers.0.self_attn.k_proj"
V = "model.layers.0.self_attn.v_proj"
UP = "model.layers.0.mlp.up_proj"
PREFIX = "base_model.model."
VOCAB = 50


def _orthonormal(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return q


def _with_spectrum(shape: tuple[int, int], s: list[float], seed: int) -> torch.Tensor:
    """An ``(out, in)`` float32 matrix with exactly the singular values ``s``."""
    gen = torch.Generator().manual_seed(seed)
    u, v = _orthonormal(shape[0], len(s), gen), _orthonormal(shape[1], len(s), gen)
    return (u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T).float()


def _base_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = {
        "model.embed_tokens.weight": (VOCAB, 8),
        f"{Q}.weight": (8, 8),
        f"{K}.weight": (8, 8),
        f"{V}.weight": (4, 8),
        f"{UP}.weight": (12, 8),
        "model.layers.0.input_layernorm.weight": (8,),
        "model.norm.weight": (8,),
        "lm_head.weight": (VOCAB, 8),
    }
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


# Fine-tuned deltas with distinct known spectra (so each best rank-k approximation is unique);
# kept energies q: .533 .833 .967 1; v: .98 1; up: 9/14 = .643, 13/14 = .929, 1.
DELTAS = {
    f"{Q}.weight": ((8, 8), [4.0, 3.0, 2.0, 1.0]),
    f"{V}.weight": ((4, 8), [7.0, 1.0]),
    f"{UP}.weight": ((12, 8), [3.0, 2.0, 1.0]),
}


def _save(path: Path, tensors: dict[str, torch.Tensor], model_type: str = "llama") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    config = {"model_type": model_type, "vocab_size": VOCAB, "architectures": ["LlamaForCausalLM"]}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture
def models(tmp_path):
    """(base dir, fine-tune dir, the fine-tune's dense deltas) with ``DELTAS`` applied."""
    base = _base_tensors()
    deltas = {
        k: _with_spectrum(shape, s, seed=i) for i, (k, (shape, s)) in enumerate(DELTAS.items())
    }
    ft = {k: v + deltas[k] if k in deltas else v.clone() for k, v in base.items()}
    return _save(tmp_path / "base", base), _save(tmp_path / "ft", ft), deltas


def _edit_ft(ft_dir: Path, **changes: torch.Tensor) -> None:
    tensors = load_file(ft_dir / "model.safetensors")
    tensors.update({k.replace("__", "."): v for k, v in changes.items()})
    save_file(tensors, str(ft_dir / "model.safetensors"))


def _read(out: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    config = json.loads((out / "adapter_config.json").read_text())
    manifest = json.loads((out / "starmerge.json").read_text())
    return config, load_file(out / "adapter_model.safetensors"), manifest


def _product(tensors: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    b = tensors[f"{PREFIX}{module}.lora_B.weight"].double()
    return b @ tensors[f"{PREFIX}{module}.lora_A.weight"].double()


def _best(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """Eckart-Young in float64: the best rank-k approximation and its kept energy."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k], float((s[:k] ** 2).sum() / (s**2).sum())


def test_rank_gives_the_best_rank_r_approximation_per_module(models, tmp_path):
    base, ft, deltas = models
    run_extract(str(base), str(ft), tmp_path / "out", ExtractOptions(rank=2))
    config, tensors, manifest = _read(tmp_path / "out")
    assert sorted(config["target_modules"]) == sorted([Q, V, UP])
    assert config["r"] == config["lora_alpha"] == 2 and config["rank_pattern"] == {}
    for key, delta in deltas.items():
        module = key.removesuffix(".weight")
        want, energy = _best(delta, 2)
        torch.testing.assert_close(_product(tensors, module), want, atol=1e-5, rtol=1e-5)
        assert manifest["modules"][module]["rank"] == 2
        assert manifest["modules"][module]["energy_kept"] == pytest.approx(energy, abs=1e-6)


def test_rank_is_capped_at_the_matrix_size(models, tmp_path):
    base, ft, deltas = models
    run_extract(str(base), str(ft), tmp_path / "out", ExtractOptions(rank=100))
    config, tensors, manifest = _read(tmp_path / "out")
    assert tensors[f"{PREFIX}{V}.lora_A.weight"].shape == (4, 8)  # min(4, 8)
    assert config["r"] == 8 and config["rank_pattern"] == {V: 4}
    torch.testing.assert_close(
        _product(tensors, V), deltas[f"{V}.weight"].double(), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(
    ("spectrum", "energy", "want"),
    [
        ([4.0, 3.0, 2.0, 1.0], 0.5, 1),  # 16/30 = .533
        ([4.0, 3.0, 2.0, 1.0], 0.8, 2),  # 25/30 = .833
        ([4.0, 3.0, 2.0, 1.0], 0.84, 3),  # 29/30 = .967
        ([4.0, 3.0, 2.0, 1.0], 0.97, 4),
        ([4.0, 3.0, 2.0, 1.0], 1.0, 4),
        ([7.0, 1.0, 0.0, 0.0], 1.0, 2),  # zero tail: never kept
        ([1.0, 1.0, 1.0], 0.34, 2),  # 1/3 < .34 <= 2/3
    ],
)
def test_energy_threshold_hand_worked(spectrum, energy, want):
    assert choose_rank(torch.tensor(spectrum), ExtractOptions(energy=energy)) == want


def test_energy_threshold_picks_the_smallest_rank_on_random_spectra():
    gen = torch.Generator().manual_seed(3)
    for _ in range(200):
        s = torch.rand(int(torch.randint(1, 12, (1,), generator=gen)), generator=gen)
        s = s.double().sort(descending=True).values
        energy = float(torch.rand(1, generator=gen).clamp(min=1e-3))
        want = next(k for k in range(1, len(s) + 1) if (s[:k] ** 2).sum() >= energy * (s**2).sum())
        assert choose_rank(s, ExtractOptions(energy=energy)) == want
        assert choose_rank(s, ExtractOptions(energy=energy, max_rank=2)) == min(want, 2)


def test_energy_writes_rank_pattern_when_ranks_differ(models, tmp_path):
    base, ft, deltas = models
    run_extract(str(base), str(ft), tmp_path / "out", ExtractOptions(energy=0.8))
    config, tensors, manifest = _read(tmp_path / "out")
    ranks = {Q: 2, V: 1, UP: 2}  # the smallest k with kept energy >= .8: .833, .98, .929
    assert {m: v["rank"] for m, v in manifest["modules"].items()} == ranks
    r = config["r"]
    assert config["lora_alpha"] == r
    assert config["rank_pattern"] == {m: k for m, k in ranks.items() if k != r} != {}
    assert config["alpha_pattern"] == config["rank_pattern"]
    for module, k in ranks.items():
        assert tensors[f"{PREFIX}{module}.lora_A.weight"].shape[0] == k
        want, energy = _best(deltas[f"{module}.weight"], k)
        torch.testing.assert_close(_product(tensors, module), want, atol=1e-5, rtol=1e-5)
        assert manifest["modules"][module]["energy_kept"] == pytest.approx(energy, abs=1e-6)
    assert manifest["energy_kept_min"] == pytest.approx(25 / 30, abs=1e-6)


def test_unchanged_modules_are_skipped_and_listed(models, tmp_path):
    base, ft, _ = models
    run_extract(str(base), str(ft), tmp_path / "out", ExtractOptions(rank=1))
    config, tensors, manifest = _read(tmp_path / "out")
    assert K not in config["target_modules"] and not any(K in k for k in tensors)
    assert f"{K}.weight" in manifest["unchanged"]
    assert "model.norm.weight" in manifest["unchanged"]
    assert manifest["skipped"] == {} and manifest["modules_to_save"] == []


def test_manifest_records_inputs_hashes_and_options(models, tmp_path):
    base, ft, _ = models
    run_extract(str(base), str(ft), tmp_path / "out", ExtractOptions(energy=0.9, max_rank=3))
    manifest = _read(tmp_path / "out")[2]
    for entry, path in ((manifest["base_model"], base), (manifest["inputs"][0], ft)):
        file = path / "model.safetensors"
        assert entry["sha256"] == {str(file): hashlib.sha256(file.read_bytes()).hexdigest()}
    assert manifest["options"]["energy"] == 0.9 and manifest["options"]["max_rank"] == 3
    assert manifest["options"]["dtype"] == "float32"


def test_changed_norm_is_refused_by_default_and_nothing_written(models, tmp_path):
    base, ft, _ = models
    _edit_ft(ft, model__norm__weight=torch.full((8,), 2.0))
    with pytest.raises(InputError) as err:
        run_extract(str(base), str(ft), tmp_path / "out", ExtractOptions(rank=2))
    message = str(err.value)
    assert "model.norm.weight (not a 2-D matrix)" in message
    assert "--modules-to-save" in message and "--skip-non-matrix" in message
    assert not (tmp_path / "out").exists()


def test_changed_embedding_is_refused_by_name(models, tmp_path):
    base, ft, _ = models
    embed = load_file(base / "model.safetensors")["model.embed_tokens.weight"] + 1.0
    _edit_ft(ft, model__embed_tokens__weight=embed)
    with pytest.raises(InputError, match=r"model\.embed_tokens\.weight \(embedding\)"):
        run_extract(str(base), str(ft), tmp_path / "out", ExtractOptions(rank=2))


def test_skip_non_matrix_lists_what_it_left_out(models, tmp_path):
    base, ft, _ = models
    _edit_ft(ft, model__norm__weight=torch.full((8,), 2.0), lm_head__weight=torch.ones(VOCAB, 8))
    options = ExtractOptions(rank=2, non_matrix="skip")
    run_extract(str(base), str(ft), tmp_path / "out", options)
    config, tensors, manifest = _read(tmp_path / "out")
    assert manifest["skipped"] == {
        "model.norm.weight": "not a 2-D matrix",
        "lm_head.weight": "embedding",
    }
    assert config["modules_to_save"] is None
    assert all("lora_" in k for k in tensors)


def test_modules_to_save_holds_the_fine_tuned_tensors(models, tmp_path):
    base, ft, _ = models
    norm = torch.linspace(0.5, 1.5, 8)
    _edit_ft(ft, model__norm__weight=norm)
    run_extract(str(base), str(ft), tmp_path / "out", ExtractOptions(rank=2, non_matrix="save"))
    config, tensors, manifest = _read(tmp_path / "out")
    assert config["modules_to_save"] == ["model.norm"] == manifest["modules_to_save"]
    torch.testing.assert_close(tensors[f"{PREFIX}model.norm.weight"], norm, atol=0, rtol=0)


def test_a_changed_bias_of_a_target(models, tmp_path):
    """Saved: the module goes whole into modules_to_save. Skipped: the weight is still a LoRA."""
    base, ft, deltas = models
    for d in (base, ft):
        _edit_ft(d, **{f"{Q}.bias".replace(".", "__"): torch.zeros(8)})
    _edit_ft(ft, **{f"{Q}.bias".replace(".", "__"): torch.ones(8)})
    run_extract(str(base), str(ft), tmp_path / "save", ExtractOptions(rank=2, non_matrix="save"))
    config, tensors, manifest = _read(tmp_path / "save")
    assert config["modules_to_save"] == [Q] and Q not in config["target_modules"]
    torch.testing.assert_close(tensors[f"{PREFIX}{Q}.bias"], torch.ones(8))
    ft_q = load_file(ft / "model.safetensors")[f"{Q}.weight"]
    torch.testing.assert_close(tensors[f"{PREFIX}{Q}.weight"], ft_q)
    run_extract(str(base), str(ft), tmp_path / "skip", ExtractOptions(rank=2, non_matrix="skip"))
    config, _, manifest = _read(tmp_path / "skip")
    assert Q in config["target_modules"] and manifest["skipped"] == {
        f"{Q}.bias": "not a 2-D matrix"
    }


def test_target_modules_restricts_and_lists_the_rest(models, tmp_path):
    base, ft, deltas = models
    options = ExtractOptions(rank=1, target_modules=("q_proj", "mlp.up_proj"))
    run_extract(str(base), str(ft), tmp_path / "out", options)
    config, _, manifest = _read(tmp_path / "out")
    assert sorted(config["target_modules"]) == sorted([Q, UP])
    assert manifest["excluded"] == [f"{V}.weight"]


def test_vocab_sized_output_projection_is_not_a_target(models, tmp_path):
    base, ft, _ = models
    for d, value in ((base, 0.0), (ft, 1.0)):
        _edit_ft(d, model__output_head__weight=torch.full((VOCAB, 8), value))
    with pytest.raises(InputError, match=r"model\.output_head\.weight \(embedding\)"):
        run_extract(str(base), str(ft), tmp_path / "out", ExtractOptions(rank=1))


def test_conv1d_models_get_fan_in_fan_out(tmp_path):
    """GPT-2 stores Conv1D weights (in, out): PEFT's factors are of the transpose."""
    name = "transformer.h.0.attn.c_attn"
    delta = _with_spectrum((8, 24), [3.0, 2.0, 1.0], seed=5)  # (in, out)
    base = _save(tmp_path / "base", {f"{name}.weight": torch.zeros(8, 24)}, "gpt2")
    ft = _save(tmp_path / "ft", {f"{name}.weight": delta}, "gpt2")
    run_extract(str(base), str(ft), tmp_path / "out", ExtractOptions(rank=2))
    config, tensors, _ = _read(tmp_path / "out")
    assert config["fan_in_fan_out"] is True
    assert tensors[f"{PREFIX}{name}.lora_A.weight"].shape == (2, 8)  # (r, in)
    torch.testing.assert_close(_product(tensors, name), _best(delta.T, 2)[0], atol=1e-5, rtol=1e-5)


def test_non_finite_input_is_refused(models, tmp_path):
    base, ft, deltas = models
    bad = load_file(ft / "model.safetensors")[f"{UP}.weight"]
    bad[0, 0] = float("nan")
    _edit_ft(ft, **{f"{UP}.weight".replace(".", "__"): bad})
    with pytest.raises(InputError, match=f"tensor '{UP}.weight' contains NaN or Inf"):
        run_extract(str(base), str(ft), tmp_path / "out", ExtractOptions(rank=1))
    assert not (tmp_path / "out").exists()


def test_identical_models_have_nothing_to_extract(models, tmp_path):
    base = models[0]
    with pytest.raises(InputError, match="nothing to extract"):
        run_extract(str(base), str(base), tmp_path / "out", ExtractOptions(rank=1))
    assert not (tmp_path / "out").exists()


def test_output_inside_an_input_is_refused(models):
    base, ft, _ = models
    with pytest.raises(OutputError, match="lies inside the input fine-tuned model"):
        run_extract(str(base), str(ft), ft / "adapter", ExtractOptions(rank=1))


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (ExtractOptions(), "exactly one of --rank"),
        (ExtractOptions(rank=2, energy=0.5), "exactly one of --rank"),
        (ExtractOptions(rank=0), "--rank must be a positive integer, got 0"),
        (ExtractOptions(energy=0.0), "--energy must be in (0, 1], got 0.0"),
        (ExtractOptions(energy=1.5), "--energy must be in (0, 1], got 1.5"),
        (ExtractOptions(energy=float("nan")), "--energy must be in (0, 1], got nan"),
        (ExtractOptions(rank=2, max_rank=4), "--max-rank (got 4) caps the rank"),
    ],
)
def test_bad_options_are_refused_before_reading(options, needle, tmp_path):
    with pytest.raises(InputError) as err:
        run_extract("no/such-base", "no/such-ft", tmp_path / "out", options)
    assert needle in str(err.value)


def test_streams_one_parameter_at_a_time(models, tmp_path, monkeypatch):
    """Every tensor is read once per model, and one parameter of each is held at a time."""
    base, ft, _ = models
    alive, peak, reads = [0], [0], []
    original = TensorIndex.get

    def counting_get(self, key):
        tensor = original(self, key)
        nbytes = tensor.numel() * tensor.element_size()
        reads.append((str(self.path), key, nbytes))
        alive[0] += nbytes
        peak[0] = max(peak[0], alive[0])
        weakref.finalize(tensor, lambda n=nbytes: alive.__setitem__(0, alive[0] - n))
        return tensor

    monkeypatch.setattr(TensorIndex, "get", counting_get)
    run_extract(str(base), str(ft), tmp_path / "out", ExtractOptions(rank=2))
    gc.collect()
    keys = sorted(_base_tensors())
    assert sorted(k for p, k, _ in reads if p == str(base)) == keys
    assert sorted(k for p, k, _ in reads if p == str(ft)) == keys
    assert peak[0] == 2 * max(n for _, _, n in reads) and alive[0] == 0
