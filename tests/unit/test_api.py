"""The in-memory API runs the same fit + merge loop as the CLI."""

from __future__ import annotations

import pytest
import torch

from starmerge.api import merge_deltas
from starmerge.errors import ConfigError, InputError
from starmerge.tensors.delta import Dense, LowRank


def _lowrank(seed, out=8, inp=6, r=2):
    g = torch.Generator().manual_seed(seed)
    return LowRank(torch.randn(out, r, generator=g), torch.randn(r, inp, generator=g), 0.5)


def test_missing_key_is_a_zero_delta_for_that_task():
    a = {"w": _lowrank(1), "only_a": _lowrank(2)}
    b = {"w": _lowrank(3)}
    out = merge_deltas("simple_average", [a, b])
    torch.testing.assert_close(out.deltas["only_a"].to_dense(), a["only_a"].to_dense() / 2)
    want = (a["w"].to_dense() + b["w"].to_dense()) / 2
    torch.testing.assert_close(out.deltas["w"].to_dense(), want)


def test_mixed_lowrank_and_dense_are_densified():
    a, b = {"w": _lowrank(1)}, {"w": Dense(torch.ones(8, 6))}
    out = merge_deltas("simple_average", [a, b])
    assert isinstance(out.deltas["w"], Dense)
    torch.testing.assert_close(out.deltas["w"].tensor, (a["w"].to_dense() + 1) / 2)


def test_fit_state_summary_is_reported():
    tasks = [{"w": _lowrank(i), "v": _lowrank(10 + i)} for i in range(3)]
    out = merge_deltas("metagpt", tasks)
    lambdas = out.stats["state"]["lambdas"]
    assert len(lambdas) == 3 and sum(lambdas) == pytest.approx(1.0)


def test_weights_and_errors():
    tasks = [{"w": Dense(torch.ones(2))}, {"w": Dense(2 * torch.ones(2))}]
    out = merge_deltas("task_arithmetic", tasks, {"scaling": 0.5}, weights=[1.0, 3.0])
    torch.testing.assert_close(out.deltas["w"].tensor, torch.full((2,), 0.5 * (1 + 6.0)))
    with pytest.raises(ConfigError, match="does not use per-model weights"):
        merge_deltas("star", tasks, weights=[1.0, 1.0])
    with pytest.raises(InputError, match="shape"):
        merge_deltas("simple_average", [{"w": Dense(torch.ones(2))}, {"w": Dense(torch.ones(3))}])
