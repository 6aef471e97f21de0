"""No NaN or Inf in, none out: parameter checks, input tensor checks, the merged-delta check."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from starmerge.api import merge_deltas
from starmerge.errors import ConfigError, InputError
from starmerge.io.checkpoint import TensorIndex
from starmerge.io.full import FullFineTune
from starmerge.methods import METHODS
from starmerge.tensors.delta import Dense, LowRank
from starmerge.tensors.finite import all_finite, delta_finite

NAN, INF = math.nan, math.inf


@pytest.mark.parametrize(
    ("tensor", "finite"),
    [
        (torch.ones(8, 4), True),
        (torch.tensor([1.0, NAN]), False),
        (torch.tensor([-INF, 0.0]), False),
        (torch.full((4,), 3e38), True),  # the sum overflows float32, the entries do not
        (torch.tensor([1.0, INF], dtype=torch.bfloat16), False),
        (torch.tensor([1, 2], dtype=torch.int32), True),
    ],
)
def test_all_finite(tensor, finite):
    assert all_finite(tensor) is finite
    assert bool(torch.isfinite(tensor).all()) is finite


def test_all_finite_over_several_chunks():
    """Sums run per chunk of 2**22 entries: a NaN in a later chunk, and sums that overflow."""
    big = torch.full((2**23 + 5,), 60000.0, dtype=torch.float16)  # every chunk sum overflows
    assert all_finite(big)
    big[-1] = math.nan
    assert not all_finite(big)
    strided = torch.zeros(4, 2**22)[:, ::2]  # not contiguous
    strided[3, -1] = math.inf
    assert not all_finite(strided) and all_finite(strided[:3])


@pytest.mark.parametrize(
    ("delta", "finite"),
    [
        (Dense(torch.ones(3, 2)), True),
        (Dense(torch.tensor([[NAN]])), False),
        (LowRank(torch.ones(3, 1), torch.ones(1, 2), 2.0), True),
        (LowRank(torch.ones(3, 1), torch.ones(1, 2), INF), False),
        (LowRank(torch.ones(3, 1), torch.ones(1, 2), NAN), False),
        (LowRank(torch.tensor([[NAN], [1.0]]), torch.ones(1, 2), 1.0), False),
        # finite factors whose product overflows float32: 1e20 * 1e20 = 1e40 > 3.4e38
        (LowRank(torch.full((3, 1), 1e20), torch.full((1, 2), 1e20), 1.0), False),
        # the Cauchy-Schwarz bound exceeds float32's range but every entry is finite
        (LowRank(torch.full((2, 1), 1e19), torch.full((1, 2), 1e19), 1.0), True),
        (LowRank(torch.zeros(3, 0), torch.zeros(0, 2), 1.0), True),
        (LowRank(torch.ones(3, 1), torch.tensor([[1.0, -INF]]), 1.0), False),
        (LowRank(torch.ones(3, 1, dtype=torch.bfloat16), torch.full((1, 2), NAN), 1.0), False),
        # a float16 norm overflows (1e4 * sqrt(2) > 65504): checked in float64, finite
        (LowRank(*(torch.full(s, 1e4, dtype=torch.float16) for s in ((2, 1), (1, 2))), 1.0), True),
    ],
)
def test_delta_finite(delta, finite):
    assert delta_finite(delta) is finite
    assert bool(torch.isfinite(delta.to_dense(torch.float32)).all()) is finite


# Every numeric parameter of every method refuses NaN and +-inf (the cases first).
NON_FINITE = [
    ("task_arithmetic", "scaling", NAN, "task_arithmetic: scaling must be a finite number, got n"),
    ("task_arithmetic", "scaling", INF, "task_arithmetic: scaling must be a finite number, got i"),
    ("ties", "scaling", INF, "ties: scaling must be a finite number, got inf"),
    ("consensus", "alpha", INF, "consensus: alpha must be a finite number, got inf"),
    ("tall_masks", "alpha", -INF, "tall_masks: alpha must be a finite number, got -inf"),
    ("tall_masks", "mask_lambda", INF, "tall_masks: mask_lambda must be a finite number, got inf"),
    ("ties", "density", NAN, "ties: density must be a finite number, got nan"),
    ("star", "eta", NAN, "star: eta must be a finite number, got nan"),
    ("mats", "init_scaling", INF, "mats: init_scaling must be a finite number, got inf"),
    ("mats", "tolerance", NAN, "mats: tolerance must be a finite number, got nan"),
    ("mats", "shrinkage", NAN, "mats: shrinkage must be a finite number, got nan"),
    ("regmean", "shrinkage", INF, "regmean: shrinkage must be a finite number, got inf"),
    ("fisher_merging", "floor", INF, "fisher_merging: floor must be a finite number, got inf"),
    ("localize_stitch", "sparsity", NAN, "localize_stitch: sparsity must be a finite number"),
    ("localize_stitch", "lr", INF, "localize_stitch: lr must be a finite number, got inf"),
    ("localize_stitch", "l1", INF, "localize_stitch: l1 must be a finite number, got inf"),
    ("localize_stitch", "sigmoid_bias", NAN, "localize_stitch: sigmoid_bias must be a finite"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "key", "value", "message"), NON_FINITE)
def test_non_finite_parameters_refused(method, key, value, message):
    with pytest.raises(ConfigError) as err:
        METHODS.get(method).resolve({key: value})
    assert str(err.value).startswith(message), str(err.value)
    assert "fix the value in `parameters:`" in str(err.value)


def test_every_float_parameter_is_covered():
    """Each float parameter of every registered method is in NON_FINITE or refuses inf anyway."""
    for name in METHODS.names():
        method = METHODS.get(name)
        for key, param in method.params.items():
            if isinstance(param.default, float):
                with pytest.raises(ConfigError, match=f"{name}: {key} must be a finite number"):
                    method.resolve({key: INF})


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        (
            "task_arithmetic",
            {"scaling": 1e308},
            "task_arithmetic: scaling must be in [-1000, 1000], got 1e+308",
        ),
        ("ties", {"scaling": -2000}, "ties: scaling must be in [-1000, 1000], got -2000"),
        ("consensus", {"alpha": 1e308}, "consensus: alpha must be in [-1000, 1000], got 1e+308"),
        (
            "task_arithmetic",
            {"weights": [NAN, 1]},
            "task_arithmetic: weights must hold finite numbers (entry 0 is nan), got [nan, 1]",
        ),
        (
            "task_arithmetic",
            {"weights": [1, 1e308]},
            "task_arithmetic: weights must hold numbers in [-1000, 1000] (entry 1 is not), "
            "got [1, 1e+308]",
        ),
        (
            "localize_stitch",
            {"sparsity": "x"},
            "localize_stitch: sparsity must be a number or null, got 'x'",
        ),
    ],
)
def test_out_of_range_parameters_refused(method, params, message):
    with pytest.raises(ConfigError) as err:
        METHODS.get(method).resolve(params)
    assert str(err.value).startswith(message), str(err.value)


def test_in_range_parameters_accepted():
    assert METHODS.get("task_arithmetic").resolve({"scaling": -1000, "weights": [0.5, 1000]}) == {
        "scaling": -1000,
        "weights": [0.5, 1000],
        "normalize": False,
    }
    assert METHODS.get("localize_stitch").resolve({"sparsity": None})["sparsity"] is None


def test_merged_overflow_stops_the_merge():
    """Finite inputs and parameters whose product overflows float32: refused by key."""
    tasks = [{"layer.weight": Dense(torch.full((2, 2), 3e37))} for _ in range(2)]
    with pytest.raises(InputError) as err:
        merge_deltas("task_arithmetic", tasks, {"scaling": 10.0})
    assert str(err.value) == (
        "the task_arithmetic merge of 'layer.weight' is not finite (NaN or Inf) with parameters "
        "{'scaling': 10.0, 'weights': None, 'normalize': False}; lower the parameters "
        "(scaling, weights, alpha) or check the inputs of this parameter"
    )
    ok = merge_deltas("task_arithmetic", tasks, {"scaling": 1.0})
    assert torch.equal(ok.deltas["layer.weight"].tensor, torch.full((2, 2), 6e37))


def test_merged_lowrank_overflow_stops_the_merge():
    big = LowRank(torch.full((3, 1), 1e19), torch.full((1, 2), 1e19), 1.0)  # entries 1e38
    with pytest.raises(InputError, match="merge of 'm.weight' is not finite"):
        merge_deltas("task_arithmetic", [{"m.weight": big}] * 2, {"scaling": 2.0})


@pytest.mark.parametrize("bad", [NAN, INF])
def test_api_refuses_non_finite_task_deltas(bad):
    tasks = [{"w": Dense(torch.ones(2))}, {"w": Dense(torch.tensor([1.0, bad]))}]
    with pytest.raises(InputError, match=r"^task 1 has NaN or Inf in w; pass finite deltas$"):
        merge_deltas("simple_average", tasks)


def _checkpoint(directory, tensors):
    directory.mkdir()
    save_file(tensors, directory / "model.safetensors")
    return TensorIndex.open(directory)


@pytest.mark.parametrize("where", ["ft", "base"])
def test_full_fine_tune_non_finite_refused(tmp_path, where):
    base_ok, ft_ok = {"w": torch.ones(2, 2), "b": torch.zeros(2)}, {"w": torch.full((2, 2), 3.0)}
    nan_b = {"b": torch.tensor([0.0, NAN])}
    base = _checkpoint(tmp_path / "base", {**base_ok, **(nan_b if where == "base" else {})})
    ft = _checkpoint(tmp_path / "ft", {**base_ok, **ft_ok, **(nan_b if where == "ft" else {})})
    task = FullFineTune(base, ft, "news")
    assert torch.equal(task.get("w").tensor, torch.full((2, 2), 2.0))  # the other key is fine
    name = f"model news ({tmp_path / 'ft'})" if where == "ft" else f"base model {tmp_path / 'base'}"
    with pytest.raises(InputError) as err:
        task.get("b")
    assert str(err.value) == (
        f"{name}: tensor 'b' contains NaN or Inf values; give a checkpoint with finite weights "
        "(re-export or re-train it)"
    )


def test_full_fine_tune_checks_a_copy_on_disk_unchanged(tmp_path):
    """Reading (and refusing) never writes: the checkpoint bytes stay as they were."""
    base = _checkpoint(tmp_path / "base", {"w": torch.tensor([INF])})
    shutil.copytree(tmp_path / "base", tmp_path / "ft")
    before = (tmp_path / "base" / "model.safetensors").read_bytes()
    with pytest.raises(InputError, match="contains NaN or Inf"):
        FullFineTune(base, TensorIndex.open(tmp_path / "ft"), "t").get("w")
    assert (tmp_path / "base" / "model.safetensors").read_bytes() == before
    assert torch.isinf(load_file(tmp_path / "ft" / "model.safetensors")["w"]).all()
