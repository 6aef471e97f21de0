import json
import sys
import types
from collections import Counter

import pytest
import yaml

from starmerge.errors import ConfigError, StarmergeError, UnknownNameError
from starmerge.eval.sources import Sampling, sample_indices
from starmerge.eval.tasks import list_tasks, load_task, task_from_dict


def _rows(n_pos=30, n_neg=10):
    rows = [{"sentence": f"good film {i}", "label": 1} for i in range(n_pos)]
    rows += [{"sentence": f"bad film {i}", "label": 0} for i in range(n_neg)]
    return rows


def _task(tmp_path, **overrides):
    data = {
        "name": "sent",
        "metadata": {"version": 2},
        "source": {"type": "local", "path": "data.jsonl"},
        "sampling": {"n": 10, "seed": 7, "balance": True},
        "input_template": "Review: {sentence}\nSentiment:",
        "label_column": "label",
        "label_words": {0: "negative", 1: ["positive", "pos"]},
    }
    data.update(overrides)
    path = tmp_path / "sent.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def data_dir(tmp_path):
    with (tmp_path / "data.jsonl").open("w") as f:
        for row in _rows():
            f.write(json.dumps(row) + "\n")
    return tmp_path


def test_builtin_example_task_loads_and_samples():
    assert "example_sst2" in list_tasks()
    task = load_task("example_sst2")
    assert (task.name, task.version, task.metric) == ("example_sst2", 1, "accuracy")
    examples = task.examples()
    assert len(examples) == 16
    assert Counter(e.label for e in examples) == {"0": 8, "1": 8}
    assert examples[0].input.startswith("Review: ") and examples[0].input.endswith("Sentiment:")


def test_seeded_sampling_is_reproducible_and_balanced(data_dir):
    task = load_task(_task(data_dir))
    first, again = task.examples(), task.examples()
    assert first == again
    assert Counter(e.label for e in first) == {"0": 5, "1": 5}
    assert task.label_words == {"0": ("negative",), "1": ("positive", "pos")}
    other = load_task(_task(data_dir, sampling={"n": 10, "seed": 8, "balance": True}))
    assert [e.index for e in other.examples()] != [e.index for e in first]


def test_balanced_sampling_caps_at_the_rarest_label():
    labels = ["a"] * 3 + ["b"] * 50
    picked = sample_indices(len(labels), Sampling(n=40, seed=0, balance=True), labels)
    assert Counter(labels[i] for i in picked) == {"a": 3, "b": 3}
    assert picked == sorted(picked)


def test_uniform_sampling_takes_at_most_n():
    assert len(sample_indices(5, Sampling(n=10), None)) == 5
    assert sample_indices(100, Sampling(n=7, seed=1), None) == sample_indices(
        100, Sampling(n=7, seed=1), None
    )


def test_unknown_keys_did_you_mean_and_every_error_at_once(tmp_path):
    path = _task(
        tmp_path,
        sampel={"n": 3},
        sampling={"n": 0, "sead": 1},
        source={"type": "lokal", "path": "x.jsonl"},
        metric="acuracy",
        metadata={},
    )
    with pytest.raises(ConfigError) as err:
        load_task(path)
    problems = err.value.problems
    text = " | ".join(problems)
    assert "unknown key sampel. Did you mean: sampling?" in text
    assert "unknown key sampling.sead. Did you mean: seed?" in text
    assert (
        "source.type must be one of local, hub, python, got 'lokal'. Did you mean: local?" in text
    )
    assert "metric must be one of" in text and "Did you mean: accuracy?" in text
    assert "metadata.version must be an int, got None" in text
    assert "sampling.n must be >= 1" in text
    assert len(problems) == 6
    assert all(p.startswith(f"task {path}: ") for p in problems)


def test_inconsistent_metric_keys(tmp_path):
    with pytest.raises(ConfigError) as err:
        task_from_dict(
            {
                "name": "t",
                "metadata": {"version": 1},
                "source": {"type": "hub", "path": "x"},
                "input_template": "{q",
                "metric": "exact_match",
            }
        )
    text = str(err.value)
    assert "input_template is not a valid format string" in text
    assert "metric exact_match needs target_column" in text


def test_include_overrides_key_by_key(data_dir):
    base = _task(data_dir)
    child = data_dir / "child.yaml"
    child_data = {"include": base.name, "name": "child", "sampling": {"n": 4}}
    child.write_text(yaml.safe_dump({**child_data, "metadata": {"version": 3}}))
    task = load_task(child)
    assert (task.name, task.version) == ("child", 3)
    assert task.sampling == Sampling(n=4, seed=7, balance=True)
    assert len(task.examples()) == 4  # the data path resolves against the included file


def test_include_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("include: b.yaml\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_task(tmp_path / "a.yaml")


def test_unknown_task_name():
    with pytest.raises(UnknownNameError, match="Did you mean: example_sst2"):
        load_task("example_sst")


def test_missing_data_file_says_which(tmp_path):
    task = load_task(_task(tmp_path))
    with pytest.raises(StarmergeError, match=r"data file .*data.jsonl does not exist"):
        task.examples()


def test_missing_column_and_unknown_label(data_dir):
    task = load_task(_task(data_dir, input_template="{text}"))
    with pytest.raises(StarmergeError, match=r"column\(s\) text not in the data"):
        task.examples()
    task = load_task(_task(data_dir, label_words={1: "positive"}))
    with pytest.raises(StarmergeError, match="label '0' in column 'label' has no entry"):
        task.examples()


@pytest.mark.parametrize("fmt", ["json", "csv", "parquet"])
def test_local_formats(tmp_path, fmt):
    rows = _rows(4, 4)
    path = tmp_path / f"data.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        path.write_text(
            "sentence,label\n" + "".join(f"{r['sentence']},{r['label']}\n" for r in rows)
        )
    else:
        pq = pytest.importorskip("pyarrow.parquet")
        import pyarrow as pa

        pq.write_table(pa.Table.from_pylist(rows), path)
    task = load_task(_task(tmp_path, source={"type": "local", "path": path.name}))
    assert Counter(e.label for e in task.examples()) == {"0": 4, "1": 4}


def test_generation_tasks(tmp_path):
    rows = [{"q": f"q{i}", "a": f"answer {i}", "score": i / 2} for i in range(6)]
    (tmp_path / "qa.json").write_text(json.dumps(rows))
    common = {"metadata": {"version": 1}, "source": {"type": "local", "path": "qa.json"}}
    em = {"name": "qa", "input_template": "Q: {q}", "metric": "exact_match", "target_column": "a"}
    em = task_from_dict({**common, **em}, base_dir=tmp_path)
    assert [e.target for e in em.examples()][:2] == ["answer 0", "answer 1"]
    sts = {"name": "sts", "input_template": "{q}", "metric": "spearman", "label_column": "score"}
    sts = task_from_dict({**common, **sts}, base_dir=tmp_path)
    assert [e.label for e in sts.examples()][:3] == [0.0, 0.5, 1.0]


def test_hub_source_calls_datasets(monkeypatch, tmp_path):
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return _rows(3, 3)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    source = {"type": "hub", "path": "nyu-mll/glue", "config": "sst2", "split": "validation"}
    task = load_task(_task(tmp_path, source=source, sampling=None))
    assert len(task.examples()) == 6
    assert calls == [(("nyu-mll/glue", "sst2"), {"split": "validation"})]


def test_hub_source_without_datasets_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    source = {"type": "hub", "path": "nyu-mll/glue", "config": "sst2", "split": "validation"}
    task = load_task(_task(tmp_path, source=source))
    with pytest.raises(StarmergeError, match=r"needs the datasets package; pip install"):
        task.examples()


def test_python_source(monkeypatch, tmp_path):
    module = types.ModuleType("fake_rows")
    module.rows = lambda split: [r for r in _rows(2, 2) if split == "test"]
    monkeypatch.setitem(sys.modules, "fake_rows", module)
    source = {"type": "python", "path": "fake_rows:rows", "split": "test"}
    assert len(load_task(_task(tmp_path, source=source, sampling=None)).examples()) == 4
    bad = load_task(_task(tmp_path, source={**source, "path": "no_such_mod:rows"}))
    with pytest.raises(StarmergeError, match="cannot import source.path 'no_such_mod:rows'"):
        bad.examples()
