"""Streaming: the pipeline holds one parameter's task deltas at a time (a counting loader)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from starmerge.methods import METHODS
from starmerge.pipeline import fit_state, merge_params
from starmerge.tensors.delta import Dense


class CountingReader:
    """Makes each task delta on demand and tracks how many delta bytes are alive at once."""

    def __init__(self, n_tasks: int, shapes: dict[str, tuple[int, ...]]):
        self.n_tasks, self.shapes = n_tasks, shapes
        self.alive = 0
        self.peak = 0

    def _release(self, nbytes: int) -> None:
        self.alive -= nbytes

    def __call__(self, key: str):
        out = []
        for t in range(self.n_tasks):
            g = torch.Generator().manual_seed(hash((key, t)) % 2**31)
            tensor = torch.randn(self.shapes[key], generator=g)
            nbytes = tensor.numel() * 4
            self.alive += nbytes
            self.peak = max(self.peak, self.alive)
            weakref.finalize(tensor, self._release, nbytes)
            out.append(Dense(tensor))
        return out


@pytest.mark.parametrize("name", ["ties", "star", "metagpt", "tall_masks"])
def test_peak_is_one_parameter_of_deltas(name):
    n_tasks = 4
    shapes = {f"layer{i}.weight": (64, 48) for i in range(6)}
    reader = CountingReader(n_tasks, shapes)
    method = METHODS.get(name)
    params = method.resolve({})
    state = fit_state(method, params, n_tasks, shapes, reader)
    for _key, merged in merge_params(method, params, state, shapes, reader):
        del merged
    gc.collect()
    one_param = n_tasks * 64 * 48 * 4
    # The deltas of one parameter (plus the next one's while the previous is released).
    assert reader.peak <= 2 * one_param
    assert reader.alive == 0
