"""Task statistics for the demo's data methods (MaTS, Fisher, RegMean), and its output files.

For each task, the plain model with that task's adapter applied in memory (``applied``) and the
tier's task loss (the encoder's head, or the decoder's answer tokens: each tier subclasses
:class:`DemoStatistics`) is run by :func:`starmerge.stats.collect_statistics` over ``n`` of the
task's own *training* items (a seeded choice; never test items). Each (task adapter, kind, n) is
written once into the demo cache as a statistics entry (``index.json`` records the split, n,
the items and the cost) and its path is passed to ``merge_deltas`` as ``statistics``. Only the
kinds a method's parameters need (its registry entry's ``data(params)``) are collected.
Trained Localize-and-Stitch masks (``mode: trained``) come from the same items and batches, one
cached entry per (adapter, n, mask settings): see :mod:`starmerge.demo.masks`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from starmerge.demo.assets import TaskData
from starmerge.demo.train import TaskAdapter, _seed_for, applied
from starmerge.errors import StarmergeError
from starmerge.methods import METHODS
from starmerge.methods.contract import DataRequest

STATS_VERSION = 1  # bump when collection changes what an entry holds
BATCH_SIZE = 16


class DemoStatistics:
    """Collects (once, cached) and hands out per-task statistics for the data methods.

    Args:
        encoder: The plain demo encoder (the adapters are applied to it in turn, then undone).
        tokenizer: Its tokenizer.
        adapters: The task adapters (deltas and heads), by task.
        train: Each task's training items (the statistics' only source).
        cache: The demo cache root; entries go to ``demo/<model>/stats/``.
        n: Training items per task.
        seed: Seeds the choice of items.
        max_length: Token limit (the recipe's).
        model: The backbone name.
    """

    def __init__(self, encoder: torch.nn.Module, tokenizer: Any,
                 adapters: Mapping[str, TaskAdapter], train: Mapping[str, TaskData], cache: Path,
                 n: int, seed: int, max_length: int, model: str = "minilm"):  # fmt: skip
        self.encoder, self.tokenizer, self.adapters = encoder, tokenizer, adapters
        self.train = train
        self.n, self.seed, self.max_length = n, seed, max_length
        self.root = Path(cache) / "demo" / model / "stats"
        self.seconds: dict[str, float] = {}  # kind -> collection time this run (all tasks)
        self.peak_bytes: dict[str, int] = {}  # kind -> largest accumulator footprint
        self.entries: dict[tuple[str, str], Path] = {}

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
            return None if self.has_task_loss() else (
                "needs trained Localize-and-Stitch masks, and this tier gives no task loss "
                "to train them with")  # fmt: skip
        if req.fisher != "empirical":
            return f"needs {req.fisher!r} Fisher labels; the demo collects empirical ones"
        return None

    def complete(self, method: str, tasks: Sequence[str],
                 params: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
        """``params`` plus ``statistics`` (one entry per task) when ``method`` needs data."""
        req = self.request(method, params)
        if req is None:
            return dict(params)
        reason = self.unavailable(method, params)
        if reason:
            raise StarmergeError(f"{method}: {reason}")
        if req.masks is not None:
            paths = [self.mask_entry(t, req.masks) for t in tasks]
        else:
            paths = [self.entry(t, req.kinds) for t in tasks]
        return {**params, "statistics": [str(p) for p in paths]}

    def used(self, method: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """What data a row used, for the results."""
        req = self.request(method, params)
        if req is None:
            return {"data": "none"}
        if req.masks is not None:
            return self._masks_used(req.masks)
        kinds, label = list(req.kinds), "+".join(req.kinds)
        paths = [self.entries[(t, label)] for t in self.adapters if (t, label) in self.entries]
        return {"data": f"{self.n} training items per task", "split": "train", "n": self.n,
                "kinds": kinds, "fisher": req.fisher if "fisher" in kinds else None,
                "entries": [p.name for p in paths],
                **_recorded_cost(paths)}  # fmt: skip

    def entry(self, task: str, kinds: Sequence[str]) -> Path:
        """The cached statistics entry of ``task`` for ``kinds``, collecting it when missing."""
        from starmerge.stats.cache import StatsWriter, entry_path

        label = "+".join(kinds)
        adapter = self.adapters[task]
        key = f"{adapter.path.name}-{label}-n{self.n}-v{STATS_VERSION}"
        path = entry_path(self.root, key)
        if path is None:
            items = self._items(task)
            meta = {"task": task, "split": "train", "n": len(items), "kinds": list(kinds),
                    "fisher": "empirical", "adapter": adapter.path.name, "seed": self.seed,
                    "max_length": self.max_length, "items": items}  # fmt: skip
            start = time.perf_counter()
            with StatsWriter(self.root, key, meta) as writer:
                peak = self._collect(task, items, kinds, writer)
                writer.meta.update(seconds=round(time.perf_counter() - start, 3), peak_bytes=peak)
            path = self.root / key
            self.seconds[label] = round(self.seconds.get(label, 0.0)
                                        + time.perf_counter() - start, 3)  # fmt: skip
            self.peak_bytes[label] = max(self.peak_bytes.get(label, 0), peak)
        self.entries[(task, label)] = path
        return path

    def mask_entry(self, task: str, settings: Mapping[str, Any]) -> Path:
        """The cached trained-mask entry of ``task`` for ``settings``, training it when missing."""
        from starmerge.demo import masks as demo_masks
        from starmerge.stats.cache import StatsWriter, entry_path

        adapter = self.adapters[task]
        key = demo_masks.mask_key(adapter, settings, self.n)
        path = entry_path(self.root, key)
        if path is None:
            items = self._items(task)
            meta = {"task": task, "split": "train", "n": len(items), "masks": dict(settings),
                    "adapter": adapter.path.name, "seed": self.seed,
                    "max_length": self.max_length, "items": items}  # fmt: skip
            pset = settings.get("parameter_set", "blocks")
            taus = demo_masks.task_taus(self.adapters, task, pset)
            batches, loss_fn = self._task_batches(task, items)
            start = time.perf_counter()
            with StatsWriter(self.root, key, meta) as writer:
                peak = demo_masks.train_entry(writer, self.encoder, taus, batches, loss_fn,
                                              settings)  # fmt: skip
                writer.meta.update(seconds=round(time.perf_counter() - start, 3), peak_bytes=peak)
            path = self.root / key
            self.seconds["masks"] = round(self.seconds.get("masks", 0.0)
                                          + time.perf_counter() - start, 3)  # fmt: skip
            self.peak_bytes["masks"] = max(self.peak_bytes.get("masks", 0), peak)
        self.entries[(task, demo_masks.settings_label(settings))] = path
        return path

    def _masks_used(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """The trained-mask row's data: items, entries, per-task sparsity, overlap and losses."""
        from starmerge.demo.masks import mask_summary, settings_label

        label = settings_label(settings)
        tasks = [t for t in self.adapters if (t, label) in self.entries]
        paths = [self.entries[(t, label)] for t in tasks]
        out = {"data": f"{self.n} training items per task", "split": "train", "n": self.n,
               "kinds": ["masks"], "masks": dict(settings),
               "entries": [p.name for p in paths], **_recorded_cost(paths)}  # fmt: skip
        if len(tasks) == len(self.adapters):
            out.update(mask_summary(self.adapters, paths, settings.get("parameter_set", "blocks")))
            out["loss"] = {t: entry_meta(p)["loss"] for t, p in zip(tasks, paths, strict=True)}
        return out

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

    def _collect(self, task: str, items: list[int], kinds: Sequence[str], sink) -> int:
        """Run the collector on base + ``task``'s adapter (and its loss); return the peak bytes."""
        from starmerge.stats import ByteCounter, collect_statistics
        from starmerge.stats.hf import make_mask_fn

        adapter = self.adapters[task]
        batches, loss_fn = self._task_batches(task, items)
        modules = [k.removesuffix(".weight") for k in adapter.deltas]  # the deltas' own keys
        counter = ByteCounter()
        with applied(self.encoder, adapter.deltas):
            collect_statistics(self.encoder, batches, loss_fn, modules, kinds,
                               mask_fn=make_mask_fn("classifier"), sink=sink,
                               counter=counter)  # fmt: skip
        return counter.peak


def _recorded_cost(paths: Sequence[Path]) -> dict[str, float | int]:
    """What writing ``paths`` cost (this run or an earlier one): seconds in all, largest peak."""
    metas = [entry_meta(p) for p in paths]
    return {"seconds": round(sum(m.get("seconds", 0.0) for m in metas), 3),
            "peak_bytes": max((m.get("peak_bytes", 0) for m in metas), default=0)}  # fmt: skip


def entry_meta(path: str | Path) -> dict[str, Any]:
    """The ``meta`` a statistics entry records (split, n, items, kinds, cost)."""
    return json.loads((Path(path) / "index.json").read_text())["meta"]


def write_outputs(data: dict[str, Any], out: Path, stem: str, echo: bool) -> dict[str, str]:
    """Results JSON, table, plots and HTML report; prints the table when ``echo``."""
    import os

    from starmerge.report.costs import render_costs
    from starmerge.report.html import write_html
    from starmerge.report.plots import plot_curve, plot_eta_sweep, plot_normalized
    from starmerge.report.tables import render_table

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
