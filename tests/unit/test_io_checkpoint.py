"""TensorIndex over every checkpoint layout, and full fine-tunes as task vectors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from starmerge.errors import InputError
from starmerge.io.checkpoint import TensorIndex
from starmerge.io.full import FullFineTune
from starmerge.tensors.delta import Dense


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(8, 4, generator=gen),
        "layer.weight": torch.randn(4, 4, generator=gen).to(torch.bfloat16),
        "layer.bias": torch.randn(4, generator=gen),
        "position_ids": torch.arange(8),
    }


def save_sharded(directory, tensors, groups):
    directory.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, keys in enumerate(groups, start=1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: tensors[k] for k in keys}, directory / name)
        weight_map.update(dict.fromkeys(keys, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def check_index(idx: TensorIndex, tensors: dict[str, torch.Tensor]) -> None:
    assert sorted(idx.keys()) == sorted(tensors)
    for key, t in tensors.items():
        assert idx.shape(key) == tuple(t.shape)
        assert idx.dtype(key) == t.dtype
        assert idx.nbytes(key) == t.numel() * t.element_size()
        assert torch.equal(idx.get(key), t)
        assert key in idx


def test_single_file_and_directory(tmp_path):
    tensors = state()
    save_file(tensors, tmp_path / "model.safetensors")
    for path in (tmp_path, tmp_path / "model.safetensors"):
        idx = TensorIndex.open(path)
        check_index(idx, tensors)
        assert idx.files == [tmp_path / "model.safetensors"]
        assert torch.equal(idx.get("embed.weight"), idx.get("embed.weight"))  # cached handle


def test_directory_with_one_other_safetensors_file(tmp_path):
    save_file(state(), tmp_path / "consolidated.safetensors")
    assert TensorIndex.open(tmp_path).files == [tmp_path / "consolidated.safetensors"]


def test_sharded(tmp_path):
    tensors = state()
    save_sharded(
        tmp_path, tensors, [["embed.weight", "position_ids"], ["layer.weight", "layer.bias"]]
    )
    idx = TensorIndex.open(tmp_path)
    check_index(idx, tensors)
    assert [f.name for f in idx.files] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    check_index(TensorIndex.open(tmp_path / "model.safetensors.index.json"), tensors)


def test_missing_shard(tmp_path):
    save_sharded(
        tmp_path, state(), [["embed.weight", "position_ids"], ["layer.weight", "layer.bias"]]
    )
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        InputError, match="shard model-00002-of-00002.safetensors listed in .* is missing"
    ):
        TensorIndex.open(tmp_path)


def test_index_lists_a_key_its_shard_lacks(tmp_path):
    save_sharded(tmp_path, state(), [["embed.weight"], ["layer.weight"]])
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["layer.bias"] = "model-00001-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="tensor 'layer.bias' listed in .* is not in shard"):
        TensorIndex.open(tmp_path)


def test_pytorch_bin(tmp_path):
    tensors = state()
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    idx = TensorIndex.open(tmp_path)
    check_index(idx, tensors)
    assert idx.files == [tmp_path / "pytorch_model.bin"]


def test_bin_with_python_objects_is_refused(tmp_path):
    torch.save({"w": torch.ones(2), "step": object}, tmp_path / "pytorch_model.bin")
    with pytest.raises(
        InputError, match="pytorch_model.bin: the file is truncated, corrupt or not"
    ):
        TensorIndex.open(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_truncated_safetensors(tmp_path, keep):
    file = tmp_path / "model.safetensors"
    save_file(state(), file)
    file.write_bytes(file.read_bytes()[: int(file.stat().st_size * keep)])
    with pytest.raises(
        InputError, match=f"cannot read {file}: .*truncated or corrupt.*re-download"
    ):
        TensorIndex.open(tmp_path)


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(
        InputError, match=r"no model weights in directory .* \(found: config.json\)"
    ):
        TensorIndex.open(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        TensorIndex.open(tmp_path / "nope")


def test_full_fine_tune_task_vector(tmp_path):
    base, ft = state(0), state(1)
    ft["position_ids"] = base["position_ids"]
    save_file(base, tmp_path / "base.safetensors")
    save_file(ft, tmp_path / "ft.safetensors")
    task = FullFineTune(
        TensorIndex.open(tmp_path / "base.safetensors"),
        TensorIndex.open(tmp_path / "ft.safetensors"),
        "news",
    )
    assert task.shapes() == {"embed.weight": (8, 4), "layer.weight": (4, 4), "layer.bias": (4,)}
    assert task.files == [tmp_path / "ft.safetensors"]
    for key in task.shapes():
        delta = task.get(key)
        assert isinstance(delta, Dense) and delta.dtype == torch.float32
        torch.testing.assert_close(delta.tensor, ft[key].float() - base[key].float())


def test_full_fine_tune_key_missing_in_base(tmp_path):
    base = state(0)
    del base["layer.bias"]
    save_file(base, tmp_path / "base.safetensors")
    save_file(state(1), tmp_path / "ft.safetensors")
    base_idx, ft_idx = (TensorIndex.open(tmp_path / f"{n}.safetensors") for n in ("base", "ft"))
    with pytest.raises(
        InputError, match="model news .* has parameter 'layer.bias', which the base"
    ):
        FullFineTune(base_idx, ft_idx, "news")


def test_full_fine_tune_shape_mismatch(tmp_path):
    ft = state(1)
    ft["embed.weight"] = torch.zeros(9, 4)
    save_file(state(0), tmp_path / "base.safetensors")
    save_file(ft, tmp_path / "ft.safetensors")
    base_idx, ft_idx = (TensorIndex.open(tmp_path / f"{n}.safetensors") for n in ("base", "ft"))
    msg = r"model news: parameter 'embed.weight' has shape \(9, 4\) but \(8, 4\) in the base"
    with pytest.raises(InputError, match=msg):
        FullFineTune(base_idx, ft_idx, "news")


def test_full_fine_tune_keeps_tied_names(tmp_path):
    shared = torch.randn(8, 4)
    base = {"shared.weight": shared, "encoder.embed_tokens.weight": shared.clone()}
    ft = {k: v + 1 for k, v in base.items()}
    save_file(base, tmp_path / "base.safetensors")
    save_file(ft, tmp_path / "ft.safetensors")
    base_idx, ft_idx = (TensorIndex.open(tmp_path / f"{n}.safetensors") for n in ("base", "ft"))
    task = FullFineTune(base_idx, ft_idx, "t5")
    assert sorted(task.keys()) == ["encoder.embed_tokens.weight", "shared.weight"]
    torch.testing.assert_close(task.get("shared.weight").tensor, torch.ones(8, 4))
