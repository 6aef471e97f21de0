"""A suite task's rows and examples: hub (or a local mirror), a named transform, the seed's sampler.

Rows come from ``datasets.load_dataset(path, config, split=..., revision=...)`` (``revision`` from
the task's ``metadata.revision``: ``refs/convert/parquet`` for datasets the seed loaded through a
loading script, which ``datasets`` >= 4 refuses), or, with ``data_dir``, from a local mirror laid
out as ``<data_dir>/<hub path>/<config or default>/<split>.{jsonl,json,parquet,csv}`` in the hub
schema (what the tests use; also how to run without hub access).

``metadata.transform`` names a row transform from :data:`TRANSFORMS` (e.g. HellaSwag's endings
list into ``ending0..3`` columns for the template). The sample is drawn exactly as the seed code
draws it (``util.random_balanced_sample`` / ``random_sample``: Python ``random`` seeded with
``sampling.seed``), so a reproduction evaluates the same rows as the seed given the same data.
"""

from __future__ import annotations

import random
import string
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from starmerge.errors import StarmergeError
from starmerge.eval.matching import match_choice
from starmerge.eval.sources import Source, load_rows
from starmerge.eval.tasks import Example, TaskSpec

Rows = list[dict[str, Any]]
_MIRROR_FORMATS = ("jsonl", "json", "parquet", "csv")


def mirror_file(data_dir: Path, source: Source) -> Path | None:
    """The mirror file of a hub source under ``data_dir``, or None when there is none."""
    folder = Path(data_dir) / source.path / (source.config or "default")
    for fmt in _MIRROR_FORMATS:
        path = folder / f"{source.split}.{fmt}"
        if path.exists():
            return path
    return None


def hub_rows(source: Source, revision: str | None, task: str) -> Rows:
    """All rows of a hub split, through ``datasets`` (imported only here)."""
    try:
        import datasets
    except ImportError:
        raise StarmergeError(
            f"task {task!r}: loading {source.path!r} from the Hugging Face hub needs the datasets "
            "package; pip install 'starmerge[eval]', or give --data-dir with a local mirror"
        ) from None
    args = (source.path, source.config) if source.config else (source.path,)
    try:
        ds = datasets.load_dataset(*args, split=source.split, revision=revision)
    except Exception as err:  # offline, gated, missing: the user's to fix
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise StarmergeError(
            f"task {task!r}: cannot load {source.path!r} (config {source.config}, split "
            f"{source.split}, revision {revision}) from the hub: {first}; check the network, or "
            "give --data-dir with a local mirror"
        ) from None
    return ds.to_list()


def load_task_rows(spec: TaskSpec, data_dir: Path | None = None) -> Rows:
    """The task's raw rows (before the transform): mirror, hub, or the task's local file."""
    source = spec.source
    if source.type != "hub":
        return load_rows(source, spec.name)
    if data_dir is not None:
        path = mirror_file(data_dir, source)
        if path is None:
            want = Path(data_dir) / source.path / (source.config or "default") / source.split
            raise StarmergeError(
                f"task {spec.name!r}: no mirror file {want}.{{jsonl,json,parquet,csv}} under "
                f"--data-dir {data_dir}; add it (hub schema) or drop --data-dir to use the hub"
            )
        return load_rows(Source(type="local", path=str(path)), spec.name)
    return hub_rows(source, spec.metadata.get("revision"), spec.name)


# ---- transforms (metadata.transform) -------------------------------------------------------


def _hellaswag_endings(rows: Rows, spec: TaskSpec) -> Rows:
    """``endings`` (a list of 4) -> ``ending0`` .. ``ending3`` for the template."""
    return [{**r, **{f"ending{i}": e for i, e in enumerate(r["endings"])}} for r in rows]


def _round_label(rows: Rows, spec: TaskSpec) -> Rows:
    """STS-B: the gold score rounded to one decimal, as the seed scores it."""
    return [{**r, "label": round(float(r["label"]), 1)} for r in rows]


def _seed_test_split(rows: Rows, spec: TaskSpec) -> Rows:
    """``train_test_split(test_size=0.1, seed=42)['test']`` of ``datasets``, re-implemented.

    ``datasets`` draws ``np.random.default_rng(seed).permutation(n)`` and takes the first
    ``ceil(0.1 n)`` indices as the test split, in permutation order.
    """
    test_size, seed = spec.metadata.get("test_size", 0.1), spec.metadata.get("split_seed", 42)
    n_test = int(np.ceil(test_size * len(rows)))
    perm = np.random.default_rng(seed).permutation(len(rows))
    return [rows[int(i)] for i in perm[:n_test]]


def _seed_train_split(rows: Rows, spec: TaskSpec) -> Rows:
    """The rest of :func:`_seed_test_split`: ``train_test_split(...)['train']``'s rows."""
    test_size, seed = spec.metadata.get("test_size", 0.1), spec.metadata.get("split_seed", 42)
    n_test = int(np.ceil(test_size * len(rows)))
    perm = np.random.default_rng(seed).permutation(len(rows))
    return [rows[int(i)] for i in perm[n_test:]]


def _gold_key(gold: str, words: Mapping[str, tuple[str, ...]], prefix: bool) -> str | None:
    """The label whose words contain ``gold`` exactly (the seed's rule), or start it (prefix)."""
    for key, variants in words.items():
        if gold in variants or (prefix and any(gold.startswith(v) for v in variants)):
            return key
    hit = match_choice(gold, list(words.values()))  # case/punctuation-insensitive fallback
    return None if hit is None else list(words)[hit]


def _lots_of_loras(rows: Rows, spec: TaskSpec, prefix: bool = False) -> Rows:
    """Lots-of-LoRAs rows: ``gold`` = ``output[0]``; ``label`` = its label key.

    A gold answer outside the seed's label map keeps itself as its label (key and word): the
    seed code reused the previous example's gold there (or raised NameError on the first).
    """
    out = []
    for r in rows:
        gold = r["output"][0] if isinstance(r["output"], list) else str(r["output"])
        key = _gold_key(gold, spec.label_words or {}, prefix) if spec.label_words else None
        out.append({**r, "gold": gold, "label": key if key is not None else gold})
    return out


TRANSFORMS: dict[str, Callable[[Rows, TaskSpec], Rows]] = {
    "hellaswag_endings": _hellaswag_endings,
    "round_label": _round_label,
    "seed_test_split": _seed_test_split,
    "seed_train_split": _seed_train_split,
    "lots_of_loras": _lots_of_loras,
    "lots_of_loras_prefix": lambda rows, spec: _lots_of_loras(rows, spec, prefix=True),
}


# ---- sampling and examples -----------------------------------------------------------------


def seed_sample(n_rows: int, n: int | None, seed: int, balance: bool, labels: list[Any] | None):
    """Row indices exactly as the seed code samples them.

    Balanced (``random_balanced_sample``): ``k = min(n // n_labels, rarest label count)`` rows per
    label, labels in first-appearance order, drawn with ``random.seed(seed)`` then
    ``random.sample`` per label. Uniform (``random_sample``): ``random.sample`` of ``min(n,
    rows)`` rows. ``n`` None: every row, in order.

    Example:
        >>> seed_sample(6, 4, 42, True, list("abbbbb"))
        [0, 1]
    """
    rnd = random.Random(seed)  # the same stream as random.seed(seed)
    if not balance:
        return list(range(n_rows)) if n is None else rnd.sample(range(n_rows), min(n, n_rows))
    counts = Counter(labels)
    per_label = min(counts.values()) if n is None else min(n // len(counts), min(counts.values()))
    picked: list[int] = []
    for label in counts:
        members = [i for i, lab in enumerate(labels or []) if lab == label]
        picked.extend(rnd.sample(members, per_label))
    return picked


def _with_extra_labels(spec: TaskSpec, rows: Rows) -> tuple[TaskSpec, list[str]]:
    """Labels found in the data but not in ``label_words`` become their own label word."""
    if not spec.label_words or not spec.label_column:
        return spec, []
    extra = sorted({str(r[spec.label_column]) for r in rows} - set(spec.label_words))
    if not extra:
        return spec, []
    if not str(spec.metadata.get("transform", "")).startswith("lots_of_loras"):
        raise StarmergeError(
            f"task {spec.name!r}: label(s) {extra} in column {spec.label_column!r} have no "
            f"label_words (known: {', '.join(spec.label_words)}); add them to label_words"
        )
    words = {**spec.label_words, **{e: (e,) for e in extra}}
    return replace(spec, label_words=words), extra


def _transformed(spec: TaskSpec, rows: Rows) -> tuple[TaskSpec, Rows, list[str]]:
    """Apply the task's transform and check the columns; the spec gains any extra labels."""
    transform = spec.metadata.get("transform")
    if transform is not None:
        if transform not in TRANSFORMS:
            raise StarmergeError(f"task {spec.name!r}: unknown metadata.transform {transform!r}")
        rows = TRANSFORMS[transform](rows, spec)
    if not rows:
        raise StarmergeError(f"task {spec.name!r}: the source has no rows")
    spec, extra = _with_extra_labels(spec, rows)
    missing = [c for c in _columns(spec) if c not in rows[0]]
    if missing:
        raise StarmergeError(
            f"task {spec.name!r}: column(s) {missing} not in the data (columns: {list(rows[0])})"
        )
    return spec, rows, extra


def _eval_sample(spec: TaskSpec, rows: Rows) -> list[int]:
    """The evaluated rows (indices into the transformed ``rows``), drawn the seed's way."""
    labels = [str(r[spec.label_column]) for r in rows] if spec.label_column else None
    s = spec.sampling
    return seed_sample(len(rows), s.n, s.seed, s.balance, labels)


def build_examples(
    spec: TaskSpec, rows: Rows, limit: int | None = None
) -> tuple[TaskSpec, list[Example], dict[str, Any]]:
    """Transform, sample (the seed's way) and render a task's rows.

    Returns:
        The spec (with any extra gold labels added), the examples, and notes for the results
        (``extra_labels``, ``n_rows``).
    """
    spec, rows, extra = _transformed(spec, rows)
    picked = _eval_sample(spec, rows)
    if limit is not None:
        picked = picked[:limit]
    examples = [_example(spec, rows[i], i) for i in picked]
    return spec, examples, {"extra_labels": extra, "n_rows": len(rows)}


def _columns(spec: TaskSpec) -> list[str]:
    fields = [f for _, f, _, _ in string.Formatter().parse(spec.input_template) if f]
    return [c for c in (*fields, spec.label_column, spec.target_column) if c]


def _example(spec: TaskSpec, row: dict[str, Any], index: int) -> Example:
    label: str | float | None = None
    if spec.label_column:
        value = row[spec.label_column]
        label = str(value) if spec.label_words else float(value)
    target = str(row[spec.target_column]) if spec.target_column else None
    return Example(spec.input_template.format(**row), label, target, index)
