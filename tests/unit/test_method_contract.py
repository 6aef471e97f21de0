"""The method contract: data-step parameters, the base tensor, and the test-only registry."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from starmerge.api import merge_deltas
from starmerge.cli import cli
from starmerge.config import parse_config
from starmerge.errors import ConfigError
from starmerge.methods import METHODS, Merged
from starmerge.tensors.delta import Dense, LowRank

T = 0.25


class _BaseKeys:
    """A fitter that records which base tensors it saw (and their squared norms)."""

    def __init__(self, n_tasks, **params):
        self.seen = {}

    def observe(self, key, deltas, *, base):
        self.seen[key] = float(base.double().square().sum())

    def end_pass(self):
        return False

    def state(self):
        seen = dict(self.seen)
        return type("S", (), {"at": lambda self, key: seen[key], "summary": lambda self: seen})()


@pytest.fixture
def shrink_to_base(register_test_method):
    """``mean(tau) - t * base``: a method that needs the base weights (registered for one test)."""

    @register_test_method(
        "shrink_to_base", needs_base=True, fit=_BaseKeys, paper="https://example.org"
    )
    def shrink(deltas, *, base, state=None):
        """Mean of the deltas minus t times the base weights."""
        mean = sum(d.to_dense(torch.float32) for d in deltas) / len(deltas)
        return Merged(Dense(mean - T * base.float()), {"base_sq": state})

    return METHODS.get("shrink_to_base")


def _tasks():
    g = torch.Generator().manual_seed(0)
    lowrank = [LowRank(torch.randn(4, 2, generator=g), torch.randn(2, 3, generator=g), 0.5)]
    return [{"w": lowrank[0], "b": Dense(torch.ones(4))}, {"w": Dense(torch.randn(4, 3))}]


def test_a_test_method_is_registered_for_its_test_only(shrink_to_base):
    assert shrink_to_base.needs_base and "shrink_to_base" in METHODS.names()
    assert shrink_to_base.data is None and shrink_to_base.spaces == {"full"}


def test_the_test_method_is_gone_after_its_test():
    assert "shrink_to_base" not in METHODS


def test_merge_deltas_hands_the_base_tensor_to_fit_and_kernel(shrink_to_base):
    tasks = _tasks()
    base = {"w": torch.full((4, 3), 2.0), "b": torch.arange(4.0)}
    out = merge_deltas("shrink_to_base", tasks, base=base)
    want_w = (tasks[0]["w"].to_dense() + tasks[1]["w"].tensor) / 2 - T * base["w"]
    torch.testing.assert_close(out.deltas["w"].tensor, want_w)
    torch.testing.assert_close(out.deltas["b"].tensor, torch.ones(4) / 2 - T * base["b"])
    assert out.stats["state"] == {"w": 48.0, "b": 14.0}
    assert out.stats["per_parameter"]["w"] == {"base_sq": 48.0}


def test_merge_deltas_without_base_is_one_clear_error(shrink_to_base):
    with pytest.raises(ConfigError, match=r"shrink_to_base needs the base model's weights.*base="):
        merge_deltas("shrink_to_base", _tasks())


def test_adapter_only_merge_without_base_model_is_refused_once(shrink_to_base):
    raw = {
        "method": "shrink_to_base",
        "models": [{"adapter": "a"}, {"adapter": "b"}],
        "output": {"format": "adapter", "rank": 4},
    }
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert len(err.value.problems) == 1
    assert "works on the base model's weights" in err.value.problems[0]
    assert "add base_model" in err.value.problems[0]
    model_output = {**raw, "output": {"format": "model"}}  # the general rule says it once
    with pytest.raises(ConfigError) as err:
        parse_config(model_output)
    assert [p for p in err.value.problems if "base_model" in p] == [
        "base_model is required because output.format is model; add base_model: PATH-OR-HUB-ID"
    ]
    parse_config({**raw, "base_model": "some/base"})  # with a base it is fine


def test_data_step_parameters_are_validated_but_never_reach_the_kernel():
    mats = METHODS.get("mats")
    assert "fisher" in mats.data_params and "fisher" not in mats.params
    with pytest.raises(ConfigError, match="fisher must be one of empirical, true"):
        mats.resolve({"fisher": "bogus"})
    resolved = mats.resolve({"objective": "kfac", "fisher": "true"})
    assert set(mats.kernel_args(resolved)) == set(mats.params)
    request = mats.data(resolved)
    assert request.kinds == ("gram_in", "gram_out") and request.fisher == "true"
    assert mats.data(mats.resolve({"objective": "average"})) is None
    ls = METHODS.get("localize_stitch")
    assert set(ls.params) == {"sparsity"}
    trained = ls.data(ls.resolve({"mode": "trained", "steps": 3}))
    assert trained.masks["steps"] == 3 and trained.masks["sparsity"] == 0.01
    assert trained.covers("model.layers.0.q.weight") and not trained.covers("lm_head.weight")
    assert ls.data(ls.resolve({})) is None


def test_separable_declarations():
    assert METHODS.get("star").separable.combine == "mean"
    assert METHODS.get("simple_average").separable.combine == "mean"
    ta = METHODS.get("task_arithmetic").separable
    assert ta.combine == "sum"
    assert ta.task_params("task_arithmetic", {"scaling": 2.0, "weights": [1.0, 3.0]}, 1, 2) == {
        "scaling": 2.0,
        "weight": 3.0,
    }
    with pytest.raises(ConfigError, match="weights has 1 entries but there are 2 models"):
        ta.task_params("task_arithmetic", {"scaling": 1.0, "weights": [1.0]}, 0, 2)
    assert METHODS.get("ties").separable is None


def test_starmerge_methods_shows_the_declarations(shrink_to_base):
    runner = CliRunner()
    rows = {r["name"]: r for r in json.loads(runner.invoke(cli, ["methods", "--json"]).output)}
    assert rows["star"]["separable"] == "mean" and rows["star"]["data_step"] is None
    mats = rows["mats"]
    assert mats["data_step"]["at_defaults"] == "statistics gram_in"
    assert "fisher" in mats["data_step"]["parameters"] and "fisher" not in mats["parameters"]
    assert rows["localize_stitch"]["data_step"]["at_defaults"] is None
    assert rows["shrink_to_base"]["needs_base"] is True
    assert rows["ties"]["spaces"] == ["core", "full", "knots"]
    assert rows["mats"]["spaces"] == rows["shrink_to_base"]["spaces"] == ["full"]
    text = runner.invoke(cli, ["methods"]).output
    assert "star: STAR" in text and "separable: mean of a per-task transform" in text
    assert (
        "    data step (at the defaults: statistics gram_in):\n      fisher = 'empirical'" in text
    )
    assert "shrink_to_base: Mean of the deltas" in text and "needs base weights: yes" in text
