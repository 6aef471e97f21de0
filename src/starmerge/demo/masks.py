"""The demo's trained Localize-and-Stitch masks (``localize_stitch mode=trained``): their summary.

Each task's masks over P are trained by the statistics pipeline
(:func:`starmerge.stats.gather_statistics`, which ``starmerge merge`` runs too): the plain model
theta_0 plus sigmoid(S) * tau, the tier's task loss (the encoder's head and labels, the
decoder's answer tokens), over the batches the statistics use (the same seeded ``n`` *training*
items; never test items). Each entry holds ``<key>::mask`` per parameter (what the method reads)
and, in ``index.json``, the items, the cost and the training loss of the hard masks next to the
dataless top-k mask that keeps as many entries. :func:`mask_summary` counts what the merge keeps.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from starmerge.demo.train import TaskAdapter
from starmerge.io.statistics import open_statistics
from starmerge.methods.localize_stitch_fit import LSFitter


def settings_label(settings: Mapping[str, Any]) -> str:
    """``masks-`` and a short hash of the mask-training settings (how a row files its entries).

    Example:
        >>> settings_label({"sparsity": 0.01, "steps": 10})  # doctest: +SKIP
        'masks-3f2a9c1d'
    """
    blob = json.dumps(dict(settings), sort_keys=True, default=str).encode()
    return f"masks-{hashlib.sha256(blob).hexdigest()[:8]}"


def mask_summary(
    adapters: Mapping[str, TaskAdapter], entries: Sequence[Path], parameter_set: str
) -> dict[str, Any]:
    """Per-task sparsity and the overlap of the stored masks, counted as the merge counts them.

    One counting pass of the method's own fit step (``LSFitter``) over the entries.
    """
    fitter = LSFitter(
        len(entries),
        mode="trained",
        parameter_set=parameter_set,
        statistics=open_statistics(entries),
    )
    keys = dict.fromkeys(k for a in adapters.values() for k in a.deltas)
    for key in keys:
        fitter.observe(key, [a.deltas.get(key) for a in adapters.values()])
    summary = fitter.state().summary()
    return {k: summary[k] for k in ("sparsity", "kept", "total", "overlap_fraction")}
