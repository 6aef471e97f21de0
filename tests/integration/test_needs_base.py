"""A method that declares ``needs_base`` gets the base tensor from the streaming engine."""

from __future__ import annotations

import pytest
import torch
from tests.integration.helpers import load_state, peft_dense_deltas, run_cli, write_config

from starmerge.methods import Merged
from starmerge.tensors.delta import Dense

T = 0.25


@pytest.fixture
def shrink_to_base(register_test_method):
    @register_test_method("shrink_to_base", needs_base=True, paper="https://example.org")
    def shrink(deltas, *, base):
        """Mean of the deltas minus t times the base weights."""
        mean = sum(d.to_dense(torch.float32) for d in deltas) / len(deltas)
        return Merged(Dense(mean - T * base.float()))


def test_the_engine_hands_each_parameter_its_base_tensor(
    tmp_path, capsys, tiny_models, llama_adapters, shrink_to_base
):
    base = tiny_models["llama"]
    adapters = llama_adapters[:2]
    cfg = write_config(
        tmp_path / "c.yaml",
        method="shrink_to_base",
        base_model=str(base),
        models=[{"adapter": str(a)} for a in adapters],
        output={"format": "model", "dtype": "float32"},
    )
    code, _, err = run_cli(capsys, "merge", cfg, tmp_path / "out", "--quiet")
    assert code == 0, err
    refs = [peft_dense_deltas(base, a) for a in adapters]
    base_state, merged = load_state(base), load_state(tmp_path / "out")
    changed = set().union(*refs)
    for key, tensor in merged.items():
        want = base_state[key].double()
        if key in changed:
            taus = [r.get(key, torch.zeros_like(want)) for r in refs]
            want = want + sum(taus) / len(taus) - T * want
        torch.testing.assert_close(tensor.double(), want, rtol=1e-5, atol=1e-5, msg=key)


def test_an_adapter_only_merge_without_base_model_is_refused(
    tmp_path, capsys, llama_adapters, shrink_to_base
):
    cfg = write_config(
        tmp_path / "c.yaml",
        method="shrink_to_base",
        models=[{"adapter": str(a)} for a in llama_adapters],
        output={"format": "adapter", "rank": 4},
    )
    code, _, err = run_cli(capsys, "merge", cfg, tmp_path / "out", "--quiet")
    assert code == 2 and not (tmp_path / "out").exists()
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "shrink_to_base works on the base model's weights" in err and "add base_model" in err
