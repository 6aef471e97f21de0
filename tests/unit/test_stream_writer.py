from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from starmerge.io.shards import StreamingShardWriter, TensorPlan, plan_shards


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 4, generator=g),
        "b": torch.randn(5, generator=g).bfloat16(),
        "scalar": torch.tensor(2.5),
        "big": torch.randn(40, 40, generator=g),
        "ids": torch.arange(6),
    }


@pytest.mark.parametrize("max_size", [10**9, 1000])
def test_round_trip_single_and_sharded(tmp_path, max_size):
    tensors = _tensors()
    plans = [TensorPlan(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    writer = StreamingShardWriter(tmp_path, plans, max_size)
    for k, v in tensors.items():
        writer.write(k, v)
    files = writer.close()
    loaded = {}
    for f in files:
        loaded.update(load_file(f))
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v)
    index = tmp_path / "model.safetensors.index.json"
    assert index.exists() == (len(files) > 1)
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        assert set(weight_map) == set(tensors) and len(set(weight_map.values())) == len(files)


def test_shard_plan_respects_size_and_order():
    plans = [TensorPlan(str(i), (10,), torch.float32) for i in range(5)]  # 40 bytes each
    shards = plan_shards(plans, 100)
    assert [[p.key for p in s] for s in shards] == [["0", "1"], ["2", "3"], ["4"]]


def test_out_of_order_write_is_refused(tmp_path):
    plans = [TensorPlan("a", (2,), torch.float32), TensorPlan("b", (2,), torch.float32)]
    writer = StreamingShardWriter(tmp_path, plans, 10**6)
    with pytest.raises(RuntimeError, match="expected a"):
        writer.write("b", torch.zeros(2))
