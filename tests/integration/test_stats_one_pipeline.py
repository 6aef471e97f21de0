"""One statistics pipeline: the CLI and the demo describe the same task alike and share its entry.

A tiny llama base, two PEFT adapters (laid out as the demo caches them: ``<dir>/adapter``) and
two local task files. ``starmerge merge`` with a ``data:`` section collects each task's entry;
then the demo's statistics, on the same base model files, the same adapters and the same
batches (a demo tier whose task loss is the HF wrappers' causal-LM loss), find those very
entries and compute nothing.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from tests.conftest import make_adapter
from tests.integration.helpers import run_cli, write_config
from tests.unit.data_fixtures import make_tokenizer, write_copy_task, write_sentiment_task

from starmerge.demo.assets import TaskData
from starmerge.demo.statistics import DemoStatistics
from starmerge.demo.train import TaskAdapter
from starmerge.eval.tasks import load_task
from starmerge.io.adapter import load_adapter
from starmerge.methods import METHODS
from starmerge.stats import hf
from starmerge.stats.source import HF_LOSS

pytest.importorskip("peft")

N, BATCH, MAX_LENGTH, SEED = 4, 2, 32, 0
CASES = [("regmean", {}), ("fisher_merging", {}), ("localize_stitch", {"mode": "trained"})]


class CausalStatistics(DemoStatistics):
    """A demo tier on a causal LM whose task loss is the HF wrappers' (as ``starmerge merge``)."""

    def __init__(self, examples, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.examples = examples  # task -> its examples, as the CLI samples them

    def has_task_loss(self) -> bool:
        return True

    def loss_kind(self, task: str) -> str:
        return HF_LOSS

    def _task_batches(self, task, items):
        spec, examples = self.examples[task]
        chosen = [examples[i] for i in items]
        batches = hf.build_batches(
            self.tokenizer, "causal_lm", spec, chosen, BATCH, self.max_length, SEED
        )
        return batches, hf.make_loss_fn("causal_lm")


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("one_pipeline")
    base = root / "base"
    shutil.copytree(tiny_models["llama"], base)
    make_tokenizer().save_pretrained(base)
    names = ["sentiment", "copy"]
    dirs = [root / "adapters" / f"{name}-0123456789abcdef" for name in names]
    for i, path in enumerate(dirs):
        make_adapter(base, path / "adapter", targets=["q_proj", "v_proj"], seed=i + 1)
    tasks = [write_sentiment_task(root / "tasks"), write_copy_task(root / "tasks")]
    return {"root": root, "base": base, "dirs": dirs, "names": names, "tasks": tasks}


def _cli(capsys, tmp_path, setup, method, params, cache):
    cfg = write_config(
        tmp_path / f"{method}.yaml",
        method=method,
        parameters=params,
        base_model=str(setup["base"]),
        models=[{"adapter": str(d / "adapter")} for d in setup["dirs"]],
        data={
            "tasks": [str(t) for t in setup["tasks"]],
            "n_examples": N,
            "seed": SEED,
            "batch_size": BATCH,
            "max_length": MAX_LENGTH,
            "cache_dir": str(cache),
        },
    )
    code, _, err = run_cli(capsys, "merge", cfg, tmp_path / "out", "--quiet")
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "starmerge.json").read_text())
    return manifest["statistics"]["state"]


def _demo(setup, cache):
    """The demo's statistics over the same base files, adapters and examples."""
    examples, train, adapters = {}, {}, {}
    for name, task, path in zip(setup["names"], setup["tasks"], setup["dirs"], strict=True):
        spec = load_task(task)
        spec = dataclasses.replace(
            spec, sampling=dataclasses.replace(spec.sampling, n=N, seed=SEED)
        )
        examples[name] = (spec, spec.examples())
        train[name] = TaskData(name, ("x",) * N, (0,) * N, ("a",), "test")  # n items: all
        lora = load_adapter(path / "adapter")
        deltas = {k: lora.get(k) for k in lora.keys()}
        adapters[name] = TaskAdapter(name, deltas, None, None, path, {})
    model = hf.load_model(setup["base"], "causal_lm")
    tokenizer = hf.load_tokenizer(setup["base"])
    return CausalStatistics(
        examples, model, tokenizer, adapters, train, cache, N, SEED, MAX_LENGTH, "tiny"
    )


@pytest.mark.parametrize(("method", "params"), CASES)
def test_the_demo_finds_the_cli_entries_and_computes_nothing(
    tmp_path, capsys, setup, method, params
):
    demo = _demo(setup, tmp_path / "cache")
    state = _cli(capsys, tmp_path, setup, method, params, demo.root)  # the demo's cache dir
    entries = sorted(demo.root.iterdir())
    assert len(entries) == 2  # one per task, written by the CLI
    request = METHODS.get(method).data(METHODS.get(method).resolve(params))
    paths = [demo.entry(name, request) for name in setup["names"]]
    assert sorted(paths) == entries  # the same keys, the same directories
    if "statistics" in state:  # the entries the fit step read, in task order
        assert [str(p) for p in paths] == state["statistics"]
    assert demo.seconds == {} and demo.peak_bytes == {}  # nothing collected or trained
    assert sorted(demo.root.iterdir()) == entries
    completed = demo.complete(method, setup["names"], params)
    assert completed["statistics"] == [str(p) for p in paths]
