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


def test_weighted_base_is_kept_as_a_zero_delta_model():
    models = [{"model": "b", "parameters": {"weight": 0.5}}, {"model": "m"}]
    raw = {"merge_method": "linear", "base_model": "b", "models": models}
    assert from_mergekit(raw)["models"] == [{"model": "b", "weight": 0.5}, {"model": "m"}]


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"merge_method": "passthrough", "slices": [{"sources": []}]}, "layer stacking"),
        ({"merge_method": "ties", "models": [], "tokenizer_source": "union"}, "tokenizer_source"),
        ({"merge_method": "ties", "models": [], "tokenizer": {"source": "union"}}, "tokenizer"),
        ({"merge_method": "ties", "models": [], "parameters": {"int8_mask": True}}, "int8_mask"),
        (
            {"merge_method": "ties", "base_model": "b", "models": [{"model": "x+l"}]},
            "not the base_model",
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
