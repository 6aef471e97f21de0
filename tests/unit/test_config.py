from __future__ import annotations

import pytest

from starmerge.config import apply_overrides, load_config, parse_config
from starmerge.errors import ConfigError, StarmergeError


def _base(**kw):
    cfg = {
        "method": "simple_average",
        "base_model": "b",
        "models": [{"adapter": "a1"}, {"adapter": "a2"}],
    }
    cfg.update(kw)
    return cfg


def test_minimal_config_fills_defaults():
    cfg = parse_config(_base(method="star"))
    assert cfg.parameters == {"eta": 40.0}
    assert cfg.output.format == "model" and cfg.output.max_shard_size == "5GB"
    assert [m.kind for m in cfg.models] == ["adapter", "adapter"]


def test_every_problem_listed_once():
    raw = _base(
        method="star",
        parameters={"eta": 0, "etaa": 1},
        outptu={},
        models=[{"adapter": "a", "model": "b"}, {"adaptr": "c"}],
        output={"format": "gguf", "dtype": "fp8"},
    )
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    text = "\n".join(info.value.problems)
    for needle in [
        "unknown key outptu. Did you mean: output?",
        "eta must be in (0, 100], got 0",
        "'etaa'",
        "models[0] needs exactly",
        "unknown key models[1].adaptr. Did you mean: adapter?",
        "output.format",
        "output.dtype",
    ]:
        assert needle in text
    assert len(info.value.problems) >= 7


def test_unknown_method_did_you_mean():
    with pytest.raises(ConfigError, match="Did you mean: ties"):
        parse_config(_base(method="tie"))


def test_base_required_for_model_output_and_full_models():
    raw = _base()
    del raw["base_model"]
    with pytest.raises(ConfigError, match="base_model is required"):
        parse_config(raw)
    raw["output"] = {"format": "adapter"}
    assert parse_config(raw).base_model is None  # adapter-only merge into an adapter


def test_weights_only_for_methods_that_take_them():
    models = [{"adapter": "a", "weight": 2.0}, {"adapter": "b"}]
    with pytest.raises(ConfigError, match="does not use per-model weights"):
        parse_config(_base(models=models))
    assert parse_config(_base(method="task_arithmetic", models=models)).models[0].weight == 2.0


def test_overrides_parse_values_and_alias_method_prefix(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: star\nbase_model: b\nmodels: [{adapter: a}]\n")
    cfg = load_config(path, ["method.eta=20", "output.dtype=bfloat16"])
    assert cfg.parameters["eta"] == 20 and cfg.output.dtype == "bfloat16"
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["eta"])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(StarmergeError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [star\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_elementwise_adapter_output_needs_rank():
    with pytest.raises(ConfigError, match="output.rank"):
        parse_config(_base(method="ties", output={"format": "adapter"}))
    assert parse_config(_base(method="ties", output={"format": "adapter", "rank": 8}))
