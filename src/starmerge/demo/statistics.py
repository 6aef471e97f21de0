"""Task statistics for the demo's data methods (MaTS, Fisher, RegMean, trained L&S masks).

For each task, the plain model with that task's adapter applied in memory (``applied``) and the
tier's task loss (the encoder's head, or the decoder's answer tokens: each tier subclasses
:class:`DemoStatistics`) is described as a :class:`~starmerge.stats.source.TaskSource` over
``n`` of the task's own *training* items (a seeded choice; never test items), and its entry comes
from :func:`starmerge.stats.gather_statistics`: the pipeline and cache-key recipe that
``starmerge merge`` and sweeps use (base model and adapter by their weight files' sha256, the
batches' tokens, the model and loss kinds, the statistic kinds or mask settings, the merged
keys). Entries live in the demo cache (``demo/<model>/stats/``); ``index.json`` records the
split, n, the items and the cost, and their paths are passed to ``merge_deltas`` as
``statistics``. Only what a method's parameters need (its registry entry's ``data(params)``) is
collected. Trained Localize-and-Stitch masks (``mode: trained``) come from the same items and
batches; :mod:`starmerge.demo.masks` summarises them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from starmerge.demo.assets import TaskData
from starmerge.demo.env import training_threads
from starmerge.demo.masks import mask_summary, settings_label
from starmerge.demo.train import TaskAdapter, _seed_for, applied
from starmerge.errors import StarmergeError
from starmerge.io.adapter import load_adapter
from starmerge.methods import METHODS
from starmerge.methods.contract import DataRequest
from starmerge.report.costs import render_costs
from starmerge.report.html import write_html
from starmerge.report.plots import plot_curve, plot_eta_sweep, plot_normalized
from starmerge.report.tables import render_table
from starmerge.stats.gather import gather_statistics
from starmerge.stats.source import TaskSource, model_identity, weights_identity

BATCH_SIZE = 16


class DemoStatistics:
    """Collects (once, cached) and hands out per-task statistics for the data methods.

    Args:
        encoder: The plain demo model (the adapters are applied to it in turn, then undone).
        tokenizer: Its tokenizer.
        adapters: The task adapters (deltas and heads), by task.
        train: Each task's training items (the statistics' only source).
        cache: The demo cache root; entries go to ``demo/<model>/stats/``.
        n: Training items per task.
        seed: Seeds the choice of items.
        max_length: Token limit (the recipe's).
        model: The backbone name.
    """

    def __init__(
        self,
        encoder: torch.nn.Module,
        tokenizer: Any,
        adapters: Mapping[str, TaskAdapter],
        train: Mapping[str, TaskData],
        cache: Path,
        n: int,
        seed: int,
        max_length: int,
        model: str = "minilm",
    ):
        self.encoder, self.tokenizer, self.adapters = encoder, tokenizer, adapters
        self.train = train
        self.n, self.seed, self.max_length = n, seed, max_length
        self.root = Path(cache) / "demo" / model / "stats"
        self.seconds: dict[str, float] = {}  # kind -> collection time this run (all tasks)
        self.peak_bytes: dict[str, int] = {}  # kind -> largest accumulator footprint
        self.entries: dict[tuple[str, str], Path] = {}
        self._base_id: list[str] | None = None

    def request(self, method: str, params: Mapping[str, Any]) -> DataRequest | None:
        """What ``method`` needs at ``params`` (defaults filled; None: nothing)."""
        spec = METHODS.get(method)
        return spec.data(spec.resolve(params)) if spec.data is not None else None

    def unavailable(self, method: str, params: Mapping[str, Any]) -> str | None:
        """Why the demo cannot provide the data ``method`` needs (None: it can, or none needed)."""
        req = self.request(method, params)
        if req is None:
            return None
        if req.masks is not None:
            if self.has_task_loss():
                return None
            return (
                "needs trained Localize-and-Stitch masks, and this tier gives no task loss "
                "to train them with"
            )
        if req.fisher != "empirical":
            return f"needs {req.fisher!r} Fisher labels; the demo collects empirical ones"
        return None

    def complete(
        self, method: str, tasks: Sequence[str], params: Mapping[str, Any]
    ) -> dict[str, Any]:
        """``params`` plus ``statistics`` (one entry per task) when ``method`` needs data."""
        req = self.request(method, params)
        if req is None:
            return dict(params)
        reason = self.unavailable(method, params)
        if reason:
            raise StarmergeError(f"{method}: {reason}")
        return {**params, "statistics": [str(self.entry(t, req)) for t in tasks]}

    def used(self, method: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """What data a row used, for the results."""
        req = self.request(method, params)
        if req is None:
            return {"data": "none"}
        label = _label(req)
        tasks = [t for t in self.adapters if (t, label) in self.entries]
        paths = [self.entries[(t, label)] for t in tasks]
        out = {"data": f"{self.n} training items per task", "split": "train", "n": self.n}
        if req.masks is None:
            kinds = list(req.kinds)
            fisher = req.fisher if "fisher" in kinds else None
            out.update(kinds=kinds, fisher=fisher)
        else:
            out.update(kinds=["masks"], masks=dict(req.masks))
        out.update(entries=[p.name for p in paths], **_recorded_cost(paths))
        if req.masks is not None and len(tasks) == len(self.adapters):
            pset = req.masks.get("parameter_set", "blocks")
            out.update(mask_summary(self.adapters, paths, pset))
            out["loss"] = {t: entry_meta(p)["loss"] for t, p in zip(tasks, paths, strict=True)}
        return out

    def entry(self, task: str, request: DataRequest) -> Path:
        """The cached entry of ``task`` for ``request``, collected (or trained) when missing."""
        with training_threads():  # the same bits on any machine and load (see env.py)
            (found,) = gather_statistics(request, [self.source(task)], self.root)
        if found.computed:
            cost = "+".join(request.kinds) if request.kinds else "masks"
            self.seconds[cost] = round(self.seconds.get(cost, 0.0) + found.seconds, 3)
            self.peak_bytes[cost] = max(self.peak_bytes.get(cost, 0), found.peak_bytes)
        self.entries[(task, _label(request))] = found.path
        return found.path

    def source(self, task: str) -> TaskSource:
        """``task`` as the statistics pipeline sees it: base + its adapter, its loss and items."""
        adapter = self.adapters[task]
        items = self._items(task)
        batches, loss_fn = self._task_batches(task, items)
        shapes = {k: d.shape for a in self.adapters.values() for k, d in a.deltas.items()}
        if self._base_id is None:
            self._base_id = model_identity(self.encoder)
        return TaskSource(
            base=self._base_id,
            model=_adapter_identity(adapter),
            model_kind=self.model_kind(),
            loss_kind=self.loss_kind(task),
            batches=batches,
            make_loss=lambda fisher: loss_fn,  # empirical labels (see ``unavailable``)
            shapes=shapes,
            task_model=lambda: self._applied(adapter),
            base_model=lambda: self.encoder,
            tau=adapter.deltas.get,
            meta={
                "task": task,
                "split": "train",
                "items": items,
                "seed": self.seed,
                "adapter": adapter.path.name,
                "max_length": self.max_length,
            },
        )

    def model_kind(self) -> str:
        """``causal_lm`` for a model with an output embedding, else ``classifier``.

        A ``classifier`` here is an encoder whose task heads lie outside it; both kinds count
        every non-pad token in the Grams.
        """
        get = getattr(self.encoder, "get_output_embeddings", None)
        return "causal_lm" if get is not None and get() is not None else "classifier"

    def loss_kind(self, task: str) -> str:
        """The tier's task loss (its class) and, where it has one, the task's head."""
        name = f"{type(self).__module__}.{type(self).__qualname__}"
        adapter = self.adapters[task]
        if adapter.head_weight is None:
            return name
        head = torch.cat([adapter.head_weight.flatten(), adapter.head_bias.flatten()])
        return f"{name}:{hashlib.sha256(head.float().numpy().tobytes()).hexdigest()}"

    @contextmanager
    def _applied(self, adapter: TaskAdapter) -> Iterator[torch.nn.Module]:
        with applied(self.encoder, adapter.deltas):
            yield self.encoder

    def _items(self, task: str) -> list[int]:
        """A seeded choice of ``n`` training-item indices."""
        train = self.train[task]
        gen = torch.Generator().manual_seed(_seed_for(task, self.seed) + 2)
        return sorted(torch.randperm(len(train), generator=gen)[: self.n].tolist())

    def has_task_loss(self) -> bool:
        """Whether :meth:`_task_batches` can give each task a loss (for trained masks)."""
        return False

    def _task_batches(self, task: str, items: list[int]) -> tuple[list[dict[str, Tensor]], Any]:
        """``items``' batches and the per-example loss ``loss_fn(model, batch) -> (B,)``.

        Each tier's statistics give their own (the base class knows no model's loss).
        """
        raise NotImplementedError(f"{type(self).__name__} gives no task loss")


def _label(request: DataRequest) -> str:
    """What a row's entries are filed under: the statistic kinds, or the mask settings."""
    return "+".join(request.kinds) if request.kinds else settings_label(request.masks or {})


def _adapter_identity(adapter: TaskAdapter) -> list[str]:
    """The adapter's weight files' sha256, as ``starmerge merge`` names an adapter input.

    An adapter held only in memory (no directory) is named by a hash of its deltas.
    """
    if (adapter.path / "adapter").is_dir():
        return weights_identity(load_adapter(adapter.path / "adapter").files)
    digest = hashlib.sha256()
    for key in sorted(adapter.deltas):
        digest.update(key.encode())
        digest.update(adapter.deltas[key].to_dense(torch.float32).numpy().tobytes())
    return [digest.hexdigest()]


def _recorded_cost(paths: Sequence[Path]) -> dict[str, float | int]:
    """What writing ``paths`` cost (this run or an earlier one): seconds in all, largest peak."""
    metas = [entry_meta(p) for p in paths]
    return {
        "seconds": round(sum(m.get("seconds", 0.0) for m in metas), 3),
        "peak_bytes": max((m.get("peak_bytes", 0) for m in metas), default=0),
    }


def entry_meta(path: str | Path) -> dict[str, Any]:
    """The ``meta`` a statistics entry records (split, n, items, kinds, cost)."""
    return json.loads((Path(path) / "index.json").read_text())["meta"]


def write_outputs(data: dict[str, Any], out: Path, stem: str, echo: bool) -> dict[str, str]:
    """Results JSON, table, plots and HTML report; prints the table when ``echo``."""
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "results": out / f"{stem}.json",
        "table": out / "table.txt",
        "costs": out / "costs.txt",
    }
    table, costs = render_table(data), render_costs(data)
    files["table"].write_text(table + "\n", encoding="utf-8")
    files["costs"].write_text(costs + "\n", encoding="utf-8")
    files["normalized"] = plot_normalized([data], out / "normalized.png")
    images = [files["normalized"]]
    if "eta_sweep" in data:
        base = next(r.get("normalized") for r in data["rows"] if r["name"] == "base")
        files["eta_sweep"] = plot_eta_sweep(data["eta_sweep"], out / "eta_sweep.png", base=base)
        files["curve"] = plot_curve(data["curve"], out / "curve.png")
        images += [files["eta_sweep"], files["curve"]]
    title = f"starmerge demo: LoRA adapters of {data.get('model', 'the demo model')} merged"
    files["report"] = write_html([data], out / "report.html", images, title=title)
    written = {k: str(v) for k, v in files.items()}
    tmp = files["results"].with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({**data, "files": written}, indent=1, default=str) + "\n")
    os.replace(tmp, files["results"])
    if echo:
        print(table, costs, sep="\n\n")
        print("\n".join(f"{k}: {v}" for k, v in written.items()))
    return written
