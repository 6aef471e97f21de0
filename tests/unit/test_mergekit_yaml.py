"""mergekit configs translated into starmerge configs; what starmerge does not do is refused."""

import pytest

from starmerge.errors import ConfigError
from starmerge.mergekit_yaml import from_mergekit, is_mergekit


def test_recognised_by_merge_method():
    assert is_mergekit({"merge_method": "ties", "models": []})
    assert not is_mergekit({"method": "ties", "models": []})
    assert not is_mergekit(["merge_method"])


def test_lora_form_becomes_an_adapter_input_and_weights_and_densities_move():
    raw = {
        "merge_method": "ties",
        "base_model": "meta/llama",
        "models": [
            {"model": "meta/llama"},  # the base itself: a zero task vector, left out
            {"model": "meta/llama+loras/a", "parameters": {"weight": 0.7, "density": 0.3}},
            {"model": "full/b", "parameters": {"weight": 0.3}},
        ],
        "parameters": {"density": 0.5, "normalize": True},
        "dtype": "bfloat16",
        "tokenizer_source": "base",
    }
    out = from_mergekit(raw)
    assert out["method"] == "ties" and out["base_model"] == "meta/llama"
    assert out["models"] == [
        {"adapter": "loras/a", "weight": 0.7},
        {"model": "full/b", "weight": 0.3},
    ]
    assert out["parameters"] == {
        "density": 0.5,
        "normalize": True,
        "trim": "local",  # mergekit's per-tensor top-k
        "densities": [0.3, 0.5],
    }
    assert out["output"] == {"dtype": "bfloat16"}


def test_out_dtype_wins_over_dtype_and_gradients_pass_through():
    raw = {
        "merge_method": "slerp",
        "base_model": "b",
        "models": [{"model": "b"}, {"model": "m"}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.5}]},
        "dtype": "float32",
        "out_dtype": "float16",
    }
    out = from_mergekit(raw)
    assert out["output"] == {"dtype": "float16"}
    assert out["parameters"]["t"][0]["value"] == [0, 0.5, 1]


def test_weighted_base_is_kept_as_a_zero_delta_model_where_mergekit_merges_it():
    # linear gives the base no role in mergekit: it is one more model, and its weight counts
    models = [{"model": "b", "parameters": {"weight": 0.5}}, {"model": "m", "parameters": {}}]
    models[1]["parameters"]["weight"] = 1.5
    raw = {"merge_method": "linear", "base_model": "b", "models": models}
    want = [{"model": "b", "weight": 0.5}, {"model": "m", "weight": 1.5}]
    assert from_mergekit(raw)["models"] == want


def test_weighted_base_is_left_out_where_mergekit_gives_the_base_its_role():
    # mergekit ignores the base's weight for task arithmetic (checked with mergekit-yaml: a
    # normalized merge of the base (weight 1) and one model (weight 1) gives that model)
    models = [{"model": "b", "parameters": {"weight": 1.0}}, {"model": "m"}]
    raw = {"merge_method": "task_arithmetic", "base_model": "b", "models": models}
    raw["models"][1]["parameters"] = {"weight": 1.0}
    raw["parameters"] = {"normalize": True}
    assert from_mergekit(raw)["models"] == [{"model": "m", "weight": 1.0}]


def test_no_base_model_first_model_is_the_base_for_a_method_without_a_base_role():
    models = [{"model": "x", "parameters": {"weight": 0.6}}, {"model": "y"}]
    models[1]["parameters"] = {"weight": 0.4}
    out = from_mergekit({"merge_method": "linear", "models": models})
    assert out["base_model"] == "x"
    assert out["models"] == [{"model": "x", "weight": 0.6}, {"model": "y", "weight": 0.4}]
    out = from_mergekit({"merge_method": "karcher", "models": [{"model": "x"}, {"model": "y"}]})
    assert out["base_model"] == "x" and out["models"] == [{"model": "x"}, {"model": "y"}]


@pytest.mark.parametrize("method", ["nuslerp", "multislerp", "ties", "slerp"])
def test_no_base_model_is_refused_where_the_base_has_a_role(method):
    raw = {"merge_method": method, "models": [{"model": "x"}, {"model": "y"}]}
    with pytest.raises(ConfigError) as err:
        from_mergekit(raw)
    assert err.value.problems == [
        f"mergekit config: '{method}' needs base_model here (starmerge merges task vectors, "
        "model - base_model): give base_model, the models' common base"
    ]


def test_unlisted_base_of_weighted_linear_needs_a_weight_as_in_mergekit():
    # mergekit-yaml: "Missing required parameter weight for <base>"
    models = [{"model": "x", "parameters": {"weight": 0.6}}, {"model": "y"}]
    models[1]["parameters"] = {"weight": 0.4}
    with pytest.raises(ConfigError) as err:
        from_mergekit({"merge_method": "linear", "base_model": "b", "models": models})
    (problem,) = err.value.problems
    assert "linear merges 'b' as a model (mergekit adds base_model to the models)" in problem


def test_unknown_keys_revisions_and_false_int8_mask():
    raw = {
        "merge_method": "ties",
        "base_model": "b@main",
        "paramters": {"density": 0.5},
        "models": [{"model": "m", "weights": 1.0}],
    }
    with pytest.raises(ConfigError) as err:
        from_mergekit(raw)
    text = "\n".join(err.value.problems)
    assert "unknown key 'paramters'. Did you mean: parameters?" in text
    assert "models[0]: unknown key 'weights'" in text
    assert "pins a revision (mergekit's PATH@REVISION)" in text
    ok = {"merge_method": "ties", "base_model": "b", "models": [{"model": "m"}]}
    assert "int8_mask" not in from_mergekit(ok | {"parameters": {"int8_mask": False}})["parameters"]


def test_global_gradient_cannot_fill_a_per_model_list():
    models = [{"model": "m", "parameters": {"density": 0.3}}, {"model": "n"}]
    raw = {"merge_method": "ties", "base_model": "b", "models": models}
    raw["parameters"] = {"density": [0.2, 0.8]}
    with pytest.raises(ConfigError) as err:
        from_mergekit(raw)
    assert "give every model its own density, or none" in str(err.value)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"merge_method": "passthrough", "slices": [{"sources": []}]}, "layer stacking"),
        ({"merge_method": "ties", "models": [], "tokenizer_source": "union"}, "tokenizer_source"),
        ({"merge_method": "ties", "models": [], "tokenizer": {"source": "union"}}, "tokenizer"),
        ({"merge_method": "ties", "models": [], "parameters": {"int8_mask": True}}, "int8_mask"),
        (
            {"merge_method": "ties", "base_model": "b", "models": [{"model": "x+l"}]},
            "not to the base_model",
        ),
        (
            {"merge_method": "ties", "models": [{"model": "m", "parameters": {"weight": [0, 1]}}]},
            "per-model weight must be one number",
        ),
        (
            {"merge_method": "ties", "models": [{"model": "m", "parameters": {"epsilon": 0.1}}]},
            "per-model epsilon is not a per-model parameter of 'ties'",
        ),
        ({"merge_method": "ties", "models": "m"}, "models must be a list"),
    ],
)
def test_refused_by_name(raw, needle):
    with pytest.raises(ConfigError) as err:
        from_mergekit(raw)
    assert needle in str(err.value)


def test_every_problem_reported_at_once():
    raw = {
        "merge_method": "ties",
        "base_model": "b",
        "slices": [],
        "tokenizer_source": "union",
        "models": [{"model": "m", "parameters": {"gamma": 1}}],
        "parameters": {"int8_mask": True},
    }
    raw["slices"] = [{"sources": []}]
    with pytest.raises(ConfigError) as err:
        from_mergekit(raw)
    assert len(err.value.problems) == 4


def test_karcher_merges_the_base_as_one_more_model():
    raw = {"merge_method": "karcher", "base_model": "b", "models": [{"model": "m"}, {"model": "n"}]}
    assert from_mergekit(raw)["models"] == [{"model": "b"}, {"model": "m"}, {"model": "n"}]
    raw["models"].insert(0, {"model": "b"})  # listed already: not twice
    assert from_mergekit(raw)["models"] == [{"model": "b"}, {"model": "m"}, {"model": "n"}]


def test_global_weight_is_the_weight_of_models_without_one():
    models = [{"model": "m", "parameters": {"weight": 0.5}}, {"model": "n"}]
    raw = {"merge_method": "ties", "base_model": "b", "models": models}
    raw["parameters"] = {"weight": 0.9, "density": 0.5}
    out = from_mergekit(raw)
    assert out["models"] == [{"model": "m", "weight": 0.5}, {"model": "n", "weight": 0.9}]
    assert "weight" not in out["parameters"]
    raw["parameters"]["weight"] = [0.1, 0.9]  # a gradient cannot be a per-model number
    with pytest.raises(ConfigError) as err:
        from_mergekit(raw)
    assert "a global weight must be one number here" in str(err.value)
