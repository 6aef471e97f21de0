"""Shared checks run on every registered method (sklearn-style conformance).

Every merge goes through the shipped pipeline (``starmerge.pipeline.fit_state`` and
``merge_params``, as ``starmerge merge`` and ``starmerge.api.merge_deltas`` run it): parameters
resolved, every parameter streamed through the method's fitter pass after pass, then the kernel
called per parameter with its kernel parameters and ``state=state.at(key)``, on the deltas
brought into the form it accepts (low rank densified to float32 where it takes entries) and a
zero delta for a task that lacks the parameter. A separable method's declared per-task
transform, combined, must give its kernel's merge.

A method that declares ``needs_base`` gets the base model's tensor of each parameter (``make_base``
below, in the tasks' dtype) as the engine gives it. A method defined on a fixed number of models
(mergekit's slerp, nearswap, ...) refuses other counts with a ``ConfigError``; the checks run it
with the largest count it takes (``n_tasks``).
"""

import copy
import dataclasses
import functools
import json
import tempfile
from pathlib import Path

import pytest
import torch
from tests.unit.data_fixtures import statistics_from_deltas

from starmerge.errors import ConfigError
from starmerge.methods import METHODS
from starmerge.pipeline import combine_tasks, fit_state, merge_params, transform_task
from starmerge.tensors.delta import Dense, LowRank

SHAPES = {"q": (8, 4), "v": (4, 6), "bias": (6,)}


def drive(name, model, *, device="cpu", method=None, base=None, **params):
    """Merge ``model`` (key -> one delta or None per task) with the pipeline: key -> ``Merged``.

    A method that declares ``needs_base`` gets ``base`` (key -> tensor; default: ``make_base``
    in the dtype of the tasks' deltas).
    """
    method = method or METHODS.get(name)
    if method.data is not None and "statistics" not in params:  # stand-ins from the deltas
        params["statistics"] = statistics_from_deltas(Path(tempfile.mkdtemp()), model)
    resolved = method.resolve(params)
    n_tasks = len(next(iter(model.values())))
    shapes = {k: SHAPES[k] for k in model}
    if method.needs_base and base is None:
        base = make_base(next(d for ds in model.values() for d in ds if d is not None).dtype)
    read_base = base.__getitem__ if method.needs_base else None
    read = model.__getitem__
    state = fit_state(method, resolved, n_tasks, shapes, read, base=read_base, device=device)
    if state is not None:
        json.dumps(state.summary())
    merged = merge_params(method, resolved, state, shapes, read, base=read_base, device=device)
    out = dict(merged)
    for result in out.values():
        json.dumps(dict(result.stats))
    return out


@functools.cache
def n_tasks(name):
    """The most tasks (3, 2 or 1) ``name`` merges with its default parameters."""
    for count in (3, 2, 1):
        try:
            drive(name, make_model(99, False, n_tasks=count))
        except ConfigError:
            continue
        return count
    raise AssertionError(f"{name} merges neither 3, 2 nor 1 tasks")


def received_dtype(method, deltas):
    """The dtype the kernel gets: the inputs', or float32 where low rank had to be densified."""
    first = next(d for d in deltas if d is not None)
    densified = isinstance(first, LowRank) and "lowrank" not in method.accepts
    return torch.float32 if densified else first.dtype


def make_model(seed, lowrank, dtype=torch.float32, n_tasks=3, zero=False):
    g = torch.Generator().manual_seed(seed)
    model = {}
    for key, shape in SHAPES.items():
        deltas = []
        for t in range(n_tasks):
            if lowrank and len(shape) == 2:
                r = 2 + t % 2
                b = torch.zeros(shape[0], r) if zero else torch.randn(shape[0], r, generator=g)
                a = torch.randn(r, shape[1], generator=g)
                deltas.append(LowRank(b.to(dtype), a.to(dtype), 0.5))
            else:
                x = torch.zeros(shape) if zero else torch.randn(shape, generator=g)
                deltas.append(Dense(x.to(dtype)))
        model[key] = deltas
    return model


def make_base(dtype=torch.float32, seed=100):
    """The base model's tensor per key (the weights the task deltas are added to)."""
    g = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=g).to(dtype) for key, shape in SHAPES.items()}


def dense(delta):
    return delta.to_dense(torch.float32) if isinstance(delta, LowRank) else delta.tensor.float()


@pytest.fixture(params=METHODS.names())
def name(request):
    return request.param


@pytest.mark.parametrize("lowrank", [False, True])
def test_zero_in_zero_out(name, lowrank):
    out = drive(name, make_model(0, lowrank, n_tasks=n_tasks(name), zero=True))
    for key, merged in out.items():
        assert torch.equal(dense(merged.delta), torch.zeros(SHAPES[key])), key


@pytest.mark.parametrize("lowrank", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_and_shape_kept_and_finite(name, lowrank, dtype):
    model = make_model(1, lowrank, dtype, n_tasks=n_tasks(name))
    out = drive(name, model)
    for key, merged in out.items():
        assert merged.delta.dtype == received_dtype(METHODS.get(name), model[key]), key
        assert merged.delta.shape == SHAPES[key], key
        assert torch.isfinite(dense(merged.delta)).all(), key


@pytest.mark.parametrize("lowrank", [False, True])
def test_task_order_is_irrelevant(name, lowrank):
    model = make_model(2, lowrank, n_tasks=n_tasks(name))
    fwd = drive(name, model)
    rev = drive(name, {k: v[::-1] for k, v in model.items()})
    for key in model:
        torch.testing.assert_close(
            dense(fwd[key].delta), dense(rev[key].delta), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("lowrank", [False, True])
def test_inputs_are_not_modified(name, lowrank):
    model, base = make_model(3, lowrank, n_tasks=n_tasks(name)), make_base()
    before, base_before = copy.deepcopy(model), copy.deepcopy(base)
    drive(name, model, base=base)
    for key in model:
        assert torch.equal(base[key], base_before[key])
        for got, want in zip(model[key], before[key], strict=True):
            for attr in ("tensor", "b", "a"):
                if hasattr(want, attr):
                    assert torch.equal(getattr(got, attr), getattr(want, attr))


def test_missing_task_parameter_is_handled(name):
    count = n_tasks(name)
    model = make_model(4, True, n_tasks=count)
    model["v"][min(1, count - 1)] = None  # with one task: no task has it (a zero delta)
    model["bias"][0] = None
    out = drive(name, model)
    for key, merged in out.items():
        assert torch.isfinite(dense(merged.delta)).all(), key


def test_defaults_resolve_and_are_documented(name):
    method = METHODS.get(name)
    resolved = method.resolve({})
    assert list(resolved) == [*method.params, *method.data_params]
    assert not set(method.params) & set(method.data_params)
    assert (method.data is None) == (not method.data_params)  # a data step declares both
    assert "full" in method.spaces and method.spaces <= {"full", "core", "knots"}
    if method.needs_base or method.data is not None or method.artifacts:
        assert method.spaces == {"full"}  # inputs tied to the full parameter
    assert method.summary and method.paper.startswith("https://")
    assert method.accepts <= {"dense", "lowrank"}
    module = __import__(method.fn.__module__, fromlist=["_"])
    assert method.paper in module.__doc__


def test_lowrank_output_methods_return_lowrank(name):
    method = METHODS.get(name)
    if not method.exact_lowrank(method.resolve({})):
        pytest.skip(f"{name} has no exact low-rank output")
    out = drive(name, make_model(5, True, n_tasks=n_tasks(name)))
    assert isinstance(out["q"].delta, LowRank) and isinstance(out["v"].delta, LowRank)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("lowrank", [False, True])
def test_cuda_merge_computes_on_cuda_and_equals_cpu(name, lowrank):
    model = make_model(6, lowrank, n_tasks=n_tasks(name))
    on_gpu = {k: [_to(d, "cuda") for d in ds] for k, ds in model.items()}
    method, devices = METHODS.get(name), []

    def spy(deltas, **kwargs):  # the kernel's own result, before the pipeline moves it to CPU
        merged = method.fn(deltas, **kwargs)
        devices.append(_device(merged.delta))
        return merged

    cpu = drive(name, model)
    gpu = drive(name, on_gpu, device="cuda", method=dataclasses.replace(method, fn=spy))
    assert devices and all(d.type == "cuda" for d in devices)
    for key in model:
        torch.testing.assert_close(
            dense(gpu[key].delta), dense(cpu[key].delta), rtol=1e-4, atol=1e-5
        )


def _device(delta):
    return delta.b.device if isinstance(delta, LowRank) else delta.tensor.device


def _to(delta, device):
    if isinstance(delta, LowRank):
        return LowRank(delta.b.to(device), delta.a.to(device), delta.scale)
    return Dense(delta.tensor.to(device))


@pytest.mark.parametrize("lowrank", [False, True])
def test_separable_parts_combine_to_the_kernel(name, lowrank):
    method = METHODS.get(name)
    if method.separable is None:
        pytest.skip(f"{name} is not separable")
    model = make_model(7, lowrank)
    model["v"][1] = None  # a task without the parameter: its part is the zero delta's
    params = method.resolve({})
    tasks = [{k: ds[t] for k, ds in model.items() if ds[t] is not None} for t in range(3)]
    parts = [transform_task(method, params, task, t, len(tasks)) for t, task in enumerate(tasks)]
    combined, stats = combine_tasks(method, params, parts)
    direct = drive(name, model)
    for key in model:
        torch.testing.assert_close(
            dense(combined[key]), dense(direct[key].delta), rtol=1e-5, atol=1e-5
        )
        assert stats.get(key, {}) == dict(direct[key].stats), key
