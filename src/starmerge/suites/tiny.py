"""Tiny offline replicas of the suites, for tests and smoke runs (no hub access).

:func:`make_tiny_suite` builds, under one directory, a tiny random model of the suite's
architecture (T5, Llama or Mistral, built from a config with the real module names) with a small
word-level tokenizer (BOS, EOS, and the suite's chat template: Llama-3-style with its date line,
or Mistral's ``[INST]``), PEFT adapters made with ``peft`` on it (and, for Flan-T5's full
checkpoints, fine-tuned copies whose q/v weights changed), a local mirror of every task's hub
dataset in the hub's schema, and a suite file that ``include``s the built-in suite and points it
at these. ``starmerge reproduce <that file> --data-dir <mirror>`` then runs end to end offline.
The model, tokenizer and adapters come from ``tiny_models.py``; this module writes the mirror
(:func:`write_mirror`) and the suite file.

Needs ``transformers``, ``tokenizers`` and ``peft``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starmerge.eval.matching import words
from starmerge.suites import Suite, load_suite
from starmerge.suites.tiny_models import WORDS, build_model, make_adapter, make_full_checkpoint

AG_NEWS = ["World", "Sports", "Business", "Sci/Tech"]


# ---- hub-schema rows ------------------------------------------------------------------------


def _text(rng: random.Random, n: int = 6) -> str:
    return " ".join(rng.choice(WORDS[:-14]) for _ in range(n))  # varied inputs, varied outputs


def _glue(config: str) -> Callable[[random.Random, int, int], dict[str, Any]]:
    cols = {
        "mnli_matched": ("premise", "hypothesis", 3), "mrpc": ("sentence1", "sentence2", 2),
        "qnli": ("question", "sentence", 2), "qqp": ("question1", "question2", 2),
        "rte": ("sentence1", "sentence2", 2), "sst2": ("sentence", None, 2),
        "cola": ("sentence", None, 2), "stsb": ("sentence1", "sentence2", 0),
    }[config]  # fmt: skip

    def row(rng: random.Random, i: int, _: int) -> dict[str, Any]:
        out: dict[str, Any] = {cols[0]: _text(rng)}
        if cols[1]:
            out[cols[1]] = _text(rng)
        out["label"] = round(rng.uniform(0, 5), 3) if cols[2] == 0 else i % cols[2]
        return {**out, "idx": i}

    return row


def _super_glue(config: str) -> Callable[[random.Random, int, int], dict[str, Any]]:
    def row(rng: random.Random, i: int, _: int) -> dict[str, Any]:
        t = lambda: _text(rng)  # noqa: E731
        base = {"wic": {"word": "cat", "sentence1": t(), "sentence2": t(), "start1": 0,
                        "start2": 0, "end1": 3, "end2": 3},
                "cb": {"premise": t(), "hypothesis": t()},
                "multirc": {"paragraph": t(), "question": t(), "answer": t()},
                "copa": {"premise": t(), "choice1": t(), "choice2": t(),
                         "question": rng.choice(["cause", "effect"])},
                "wsc": {"text": t(), "span1_index": 0, "span2_index": 3, "span1_text": "cat",
                        "span2_text": "dog"}}[config]  # fmt: skip
        idx: Any = {"paragraph": 0, "question": i, "answer": i} if config == "multirc" else i
        return {**base, "idx": idx, "label": i % (3 if config == "cb" else 2)}

    return row


def _lots_of_loras(spec: Any) -> Callable[[random.Random, int, int], dict[str, Any]]:
    words = [v[0] for v in (spec.label_words or {}).values()]

    def row(rng: random.Random, i: int, _: int) -> dict[str, Any]:
        if spec.metadata.get("transform") == "lots_of_loras_prefix":  # dream
            gold = f"{words[i % len(words)]} {_text(rng, 3)}"
        elif words:
            gold = words[i % len(words)]
        else:
            gold = _text(rng, 2)
        return {"input": f"Question: {_text(rng)}? Answer:", "output": [gold], "id": f"t-{i}"}

    return row


def _row_maker(spec: Any) -> Callable[[random.Random, int, int], dict[str, Any]]:
    src = spec.source
    if src.path == "nyu-mll/glue":
        return _glue(str(src.config))
    if src.path == "aps/super_glue":
        return _super_glue(str(src.config))
    if src.path.startswith("Lots-of-LoRAs/"):
        return _lots_of_loras(spec)
    makers: dict[str, Callable[[random.Random, int, int], dict[str, Any]]] = {
        "stanfordnlp/imdb": lambda r, i, _: {"text": _text(r, 12), "label": i % 2},
        "takala/financial_phrasebank": lambda r, i, _: {"sentence": _text(r), "label": i % 3},
        "SetFit/ag_news": lambda r, i, _: {"text": _text(r), "label": i % 4,
                                           "label_text": AG_NEWS[i % 4]},
        "Rowan/hellaswag": lambda r, i, _: {
            "ind": i, "activity_label": "cat", "ctx_a": _text(r), "ctx_b": "the",
            "ctx": _text(r), "endings": [_text(r, 3) for _ in range(4)], "source_id": f"s{i}",
            "split": "val", "split_type": "indomain", "label": str(i % 4)},
        "google/boolq": lambda r, i, _: {"question": _text(r), "answer": bool(i % 2),
                                         "passage": _text(r, 10)},
        "ybisk/piqa": lambda r, i, _: {"goal": _text(r), "sol1": _text(r), "sol2": _text(r),
                                       "label": i % 2},
    }  # fmt: skip
    return makers[src.path]


def write_mirror(
    suite: Suite, data_dir: Path, rows: int = 12, seed: int = 0, train_rows: int | None = None
) -> Path:
    """A local mirror of every task's hub split, in the hub schema (JSON lines).

    Each task's training split (``train:`` in the suite) gets ``train_rows`` rows (default
    ``rows``) unless it is the evaluated split itself (financial_phrasebank).
    """
    from starmerge.suites.training import train_spec

    rng = random.Random(seed)
    for task in suite.tasks.values():
        _write_split(task.spec().source, _row_maker(task.spec()), data_dir, rows, rng, True)
    for task in suite.tasks.values():  # after the evaluated splits, which stay as they were
        if task.train is not None:
            src = train_spec(task.spec(), task.train).source
            _write_split(src, _row_maker(task.spec()), data_dir, train_rows or rows, rng)
    return Path(data_dir)


def _write_split(
    src: Any, maker: Callable, data_dir: Path, rows: int, rng: random.Random, replace: bool = False
) -> None:
    path = Path(data_dir) / src.path / (src.config or "default") / f"{src.split}.jsonl"
    if path.exists() and not replace:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(maker(rng, i, rows)) for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")


_ARCH = {
    "flan-t5-large": ("t5", ["q", "v"]),
    "llama-3.2-3b-instruct": ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                        "up_proj"]),
    "mistral-7b-instruct": ("mistral", ["q_proj", "k_proj", "v_proj"]),
}  # fmt: skip


def make_tiny_suite(
    name: str, root: Path, tasks: list[str] | None = None, rows: int = 12,
    train_rows: int | None = None,
) -> tuple[Path, Path]:  # fmt: skip
    """Build a tiny offline copy of built-in suite ``name`` under ``root``.

    ``rows`` rows per evaluated split, ``train_rows`` (default ``rows``) per training split.

    Returns:
        ``(suite file, data mirror directory)``.

    Example:
        >>> suite_file, data = make_tiny_suite("flan-t5-large", tmp_path)  # doctest: +SKIP
        >>> reproduce(suite_file, out, runtime=Runtime(data_dir=str(data)))  # doctest: +SKIP
    """
    root = Path(root)
    builtin = load_suite(name)
    kind, targets = _ARCH[name]
    answers = [w for t in builtin.tasks.values() for ws in (t.spec().label_words or {}).values()
               for v in ws for w in words(v)]  # fmt: skip
    base = build_model(kind, root / "base", answers=answers or None)
    entries = {}
    for i, task in enumerate(tasks or list(builtin.tasks)):
        spec = builtin.task(task)
        if spec.adapter:
            path = make_adapter(base, root / "adapters" / task, targets, seed=100 + i)
            entries[task] = {"adapter": str(path)}
        else:
            path = make_full_checkpoint(base, root / "models" / task, seed=100 + i)
            entries[task] = {"model": str(path)}
    suite_file = root / f"{name}-tiny.yaml"
    data = {"include": name, "base_model": str(base), "tasks": entries, "batch_size": 4}
    suite_file.write_text(json.dumps(data, indent=1) + "\n")
    write_mirror(load_suite(suite_file), root / "data", rows=rows, train_rows=train_rows)
    return suite_file, root / "data"
