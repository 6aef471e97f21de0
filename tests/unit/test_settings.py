"""Per-key parameter values (layer gradients, name filters): mergekit's rules, hand-worked."""

import pytest
import torch

from starmerge.api import merge_deltas
from starmerge.errors import ConfigError
from starmerge.methods import METHODS
from starmerge.pipeline import combine_tasks, transform_task
from starmerge.settings import (
    Condition,
    PerKey,
    count_layers,
    evaluate,
    layer_depth,
    parse_setting,
)
from starmerge.tensors.delta import Dense


def no_check(value):
    return None


@pytest.mark.parametrize(
    ("gradient", "t", "want"),
    [
        ((0.0, 1.0), 0.0, 0.0),
        ((0.0, 1.0), 1.0, 1.0),
        ((0.0, 1.0), 0.3, 0.3),
        ((0.0, 1.0, 0.0), 0.25, 0.5),  # between entries 0 and 1
        ((0.0, 1.0, 0.0), 0.75, 0.5),  # between entries 1 and 2
        ((2.0, 4.0, 8.0), 1.0, 8.0),
        ((5.0,), 0.7, 5.0),
    ],
)
def test_gradient_interpolates_linearly_over_depth(gradient, t, want):
    assert evaluate(gradient, "model.layers.0.x", t, None) == pytest.approx(want)


def test_text_gradient_picks_by_index_without_interpolation():
    assert evaluate(("a", "b", "c"), "k", 0.49, None) == "a"  # int(0.49 * 2) = 0
    assert evaluate(("a", "b", "c"), "k", 0.5, None) == "b"


def test_first_matching_condition_wins_and_unmatched_takes_the_default():
    setting = (Condition(0.1, "self_attn"), Condition((0.0, 1.0), "mlp"), Condition(0.9, "*"))
    assert evaluate(setting, "model.layers.3.self_attn.q_proj.weight", 0.5, 7) == 0.1
    assert evaluate(setting, "model.layers.3.mlp.up_proj.weight", 0.5, 7) == pytest.approx(0.5)
    assert evaluate(setting, "model.norm.weight", 0.0, 7) == 0.9
    assert evaluate((Condition(0.1, "self_attn"),), "model.norm.weight", 0.0, 7) == 7


def test_layer_depth_and_count():
    keys = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(5)] + ["lm_head.weight"]
    assert count_layers(keys) == 5
    assert layer_depth("model.layers.4.mlp.up_proj.weight", 5) == 1.0
    assert layer_depth("model.layers.1.mlp.up_proj.weight", 5) == 0.25
    assert layer_depth("lm_head.weight", 5) == 0.0  # outside the blocks: mergekit's t = 0
    assert layer_depth("transformer.h.0.attn.c_attn.weight", 1) == 1.0  # one block: t = 1


def test_parse_checks_every_endpoint_and_reports_all_problems():
    check = lambda v: None if 0 < v <= 1 else "must be in (0, 1]"  # noqa: E731
    setting, problems = parse_setting("ties: density", [0.5, 2.0, -1.0], 0.2, check)
    assert setting is None
    assert len(problems) == 2 and "entry 1" in problems[0] and "entry 2" in problems[1]
    setting, problems = parse_setting("d", [{"filter": "mlp", "valu": 1}], 0.2, check)
    assert setting is None and "condition 0" in problems[0]
    setting, problems = parse_setting("d", [[0.1], 0.2], 0.2, check)
    assert setting is None and "all numbers" in problems[0]
    setting, problems = parse_setting("d", {"filter": "mlp", "value": 0.4}, 0.2, check)
    assert problems == [] and setting == PerKey((Condition(0.4, "mlp"),), 0.2)


def test_resolve_gives_per_key_values_and_params_at_evaluates_them():
    star = METHODS.get("star")
    params = star.resolve({"eta": [20.0, 60.0]})
    assert isinstance(params["eta"], PerKey)
    assert star.params_at(params, "model.layers.0.q.weight", 19) == {"eta": 20.0}
    assert star.params_at(params, "model.layers.9.q.weight", 19) == {"eta": pytest.approx(40.0)}
    assert star.params_at(params, "lm_head.weight", 19) == {"eta": 20.0}  # outside: t = 0


def test_resolve_refuses_out_of_range_gradient_entries():
    with pytest.raises(ConfigError, match=r"eta \(gradient\) entry 1"):
        METHODS.get("star").resolve({"eta": [20.0, 150.0]})


def test_parameter_read_by_a_fit_step_takes_one_value():
    with pytest.raises(ConfigError, match="fit step"):
        METHODS.get("ties").resolve({"density": [0.1, 0.9], "trim": "global"})


def test_list_valued_parameter_keeps_its_list():
    params = METHODS.get("task_arithmetic").resolve({"weights": [1.0, 2.0]})
    assert params["weights"] == [1.0, 2.0]


def test_merge_uses_each_layers_value_and_the_separable_parts_agree():
    g = torch.Generator().manual_seed(0)
    keys = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(3)]
    tasks = [{k: Dense(torch.randn(6, 5, generator=g)) for k in keys} for _ in range(2)]
    merged = merge_deltas("star", tasks, {"eta": [20.0, 100.0]}).deltas
    for i, key in enumerate(keys):  # t = 0, 0.5, 1 -> eta 20, 60, 100
        alone = merge_deltas("star", [{key: t[key]} for t in tasks], {"eta": 20.0 + 40.0 * i})
        torch.testing.assert_close(merged[key].to_dense(), alone.deltas[key].to_dense())
    star = METHODS.get("star")
    params = star.resolve({"eta": [20.0, 100.0]})
    parts = [transform_task(star, params, t, i, 2) for i, t in enumerate(tasks)]
    combined, _ = combine_tasks(star, params, parts)
    for key in keys:
        torch.testing.assert_close(combined[key].to_dense(), merged[key].to_dense())


def test_filter_condition_applies_to_matching_keys_only():
    g = torch.Generator().manual_seed(1)
    keys = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"]
    tasks = [{k: Dense(torch.randn(4, 4, generator=g)) for k in keys} for _ in range(2)]
    setting = [{"filter": "self_attn", "value": 0.0}, {"value": 1.0}]
    merged = merge_deltas("task_arithmetic", tasks, {"scaling": setting}).deltas
    assert torch.count_nonzero(merged[keys[0]].to_dense()) == 0
    want = tasks[0][keys[1]].tensor + tasks[1][keys[1]].tensor
    torch.testing.assert_close(merged[keys[1]].to_dense(), want)
