"""Localize-and-Stitch: sparse per-task masks, stitched with overlaps averaged.

Paper: "Localize-and-Stitch: Efficient Model Merging via Sparse Task Arithmetic" (He, Hu, Lin,
Zhang, Zhao; TMLR 2025), https://arxiv.org/abs/2408.13656. Reference code:
``uiuctml/Localize-and-Stitch``.

Update rule, over the parameter set P:
    localize: a binary mask gamma_i per task i over P;
        dataless: gamma_i = 1[|tau_i| >= t_i] with t_i the k-th largest |tau_i| over all of P,
                  k = floor(sparsity * N_i) (one global top-k per task);
        trained:  logits S_i = +b on the top-k of |tau_i|, -b elsewhere, then ``steps`` steps of
                  S <- S - (lr * g + l1) * sigma'(S) with g = mean over batches of dL/dtheta * tau_i
                  at theta_0 + sigma(S) * tau_i (the paper's L + l1 ||sigma(S)||_1), and
                  gamma_i = 1[S > 0]  (see :mod:`starmerge.stats.masks`);
    stitch:   delta = sum_i gamma'_i * tau_i, gamma'_i = gamma_i / sum_j gamma_j (0 where no mask
              is on): overlapping entries are averaged, no scaling. Outside P, delta = 0 (theta_0).

Symbols <-> arguments: sparsity = s (k / N); sigmoid_bias = b; lr = the mask learning rate;
l1 = the L1 strength; steps = the reference's "epochs" (one mask step per pass over the data);
regularizer = ``paper`` (above) or ``reference`` (the released code's active line
S <- S - lr * g * sigma'(S) + l1 * sign(S) * sigma'(S), which pushes logits away from 0 instead
of toward sparsity; see ``docs/data_methods.md``).

Parameter set P (``parameter_set``): ``blocks`` (default) = every parameter whose key has a
numbered transformer-block segment (``layers.N.``, ``layer.N.``, ``h.N.``, ``block.N.``,
``blocks.N.``), so in-block norms and biases are in and embeddings, ``lm_head`` and final norms are
out (the language code's ``encoder.layer`` rule, generalised); ``all`` = every merged parameter.

Deviations from the reference code:
- dataless masks use ``>=`` (ties at the threshold kept, as MergeBench; the code's ``>`` drops the
  k-th entry itself) and never include entries where tau_i == 0, so a zero entry cannot dilute an
  overlap; the threshold is exact and streamed (TIES's radix select), not a concatenated copy;
- the trained sparsity default is 0.01 (the paper's reported level) for the initial top-k, not the
  code's 1e-5; the paper regulariser is the default, the code's sign variant is ``reference``;
- the masks are saved with the output (``artifacts.safetensors``, ``<key>::masks``, (T, ...)) and
  their sparsity and overlap are in the manifest;
- called without ``state`` (standalone, dataless), the given parameter is the whole model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from starmerge.methods.base import Merged, Param, in_range, optional, register_method
from starmerge.methods.contract import DataRequest
from starmerge.methods.fisher_regmean import stack_taus
from starmerge.methods.footprint import Footprint, MemoryCase
from starmerge.methods.localize_stitch_fit import (
    LSFitter,
    LSParam,
    in_parameter_set,
    resolve_sparsity,
    top_k_masks,
)
from starmerge.methods.statistics import statistics_param
from starmerge.tensors.delta import Delta, Dense
from starmerge.tensors.sparsify import keep_count, kth_largest_abs


def stitch(taus: Tensor, masks: Tensor) -> Tensor:
    """sum_i gamma_i tau_i / sum_i gamma_i (0 where no mask is on); ``(T, ...)`` -> ``(...)``."""
    count = masks.sum(dim=0)
    total = torch.where(masks, taus, torch.zeros_like(taus)).sum(dim=0)
    return total / count.clamp(min=1).to(taus.dtype)


def _data(params: Mapping[str, Any]) -> DataRequest | None:
    """Trained masks (mode ``trained``) over P with the training settings; else nothing."""
    if params["mode"] != "trained":
        return None
    names = ("steps", "lr", "l1", "regularizer", "sigmoid_bias", "parameter_set")
    masks = {k: params[k] for k in names}
    masks["sparsity"] = resolve_sparsity("trained", params["sparsity"])
    pset = params["parameter_set"]
    return DataRequest(
        masks=masks, covers=lambda key: in_parameter_set(key, pset), reason="mode trained"
    )


def _memory(case: MemoryCase) -> Footprint:
    """Localize-and-Stitch's memory: the taus' stack, the masks and the stitch weights.

    Per task a float32 copy, its |tau| mask, the masks' stack and the weight (3.25 copies with
    the bool masks); the fit's last pass stacks and masks the same way.
    """
    per_task = 3.25 * case.n_tasks
    return Footprint(case.copies(per_task + 3), case.copies(per_task + 2))


@register_method(
    "localize_stitch",
    params={
        "sparsity": Param(
            None,
            "kept fraction per task (null: 0.05 dataless; trained: 0.01 for the initial top-k)",
            optional(in_range(0, 1)),
        ),
    },
    accepts=("dense",),
    fit=LSFitter,
    paper="https://arxiv.org/abs/2408.13656",
    artifacts={"masks": (lambda shape, n_tasks: (n_tasks, *shape), torch.bool)},
    data_params={
        "mode": Param(
            "dataless",
            "masks: top-k by magnitude (dataless) or trained on task data",
            choices=("dataless", "trained"),
        ),
        "parameter_set": Param(
            "blocks",
            "P: transformer blocks (no embeddings/lm_head) or all",
            choices=("blocks", "all"),
        ),
        "regularizer": Param(
            "paper",
            "trained: the paper's L1 step or the code's sign variant (reference)",
            choices=("paper", "reference"),
        ),
        "steps": Param(
            10,
            "trained: mask update steps (one per pass over the data)",
            lambda v: None if v >= 0 else "must be >= 0",
        ),
        "lr": Param(1e7, "trained: mask learning rate", in_range(0, float("inf"))),
        "l1": Param(10.0, "trained: L1 strength", in_range(0, float("inf"), lo_open=False)),
        "sigmoid_bias": Param(5.0, "trained: b, initial logits +b / -b", in_range(0, 1e3)),
        "statistics": statistics_param("trained: precomputed masks, one file per task"),
    },
    data=_data,
    memory=_memory,
)
def localize_stitch(
    deltas: Sequence[Delta],
    *,
    sparsity: float | None = None,
    state: LSParam | None = None,
) -> Merged:
    """Localize-and-Stitch: mask each task, then average the masked deltas where masks overlap.

    Args:
        deltas: One delta per task for this parameter.
        sparsity: Kept fraction per task (dataless, without ``state``; None: 0.05).
        state: This parameter's :class:`LSParam`: its membership in P (``parameter_set``)
            and its thresholds (``mode: dataless``) or trained masks (``mode: trained``), from
            the fit step; without it the parameter is the whole model.

    Returns:
        The stitched delta, ``{"kept": [per task], "numel", "overlap"}`` and the masks artifact.

    Example:
        >>> a, b = Dense(torch.tensor([3.0, 1.0])), Dense(torch.tensor([2.0, 0.5]))
        >>> localize_stitch([a, b], sparsity=0.5).delta.tensor
        tensor([2.5000, 0.0000])
    """
    out_dtype = deltas[0].dtype
    taus = stack_taus(deltas)  # (T, ...)
    if state is not None and not state.in_set:
        masks = torch.zeros_like(taus, dtype=torch.bool)
        return Merged(
            Dense(torch.zeros_like(taus[0]).to(out_dtype)),
            {"in_set": False},
            {"masks": masks.cpu()},
        )
    if state is not None and state.masks is not None:
        masks = torch.stack([m.to(taus.device) for m in state.masks]) & (taus != 0)
    else:
        if state is not None and state.thresholds is not None:
            thresholds = state.thresholds
        else:
            s = resolve_sparsity("dataless", sparsity)
            thresholds = tuple(kth_largest_abs([t], keep_count(s, t.numel())) for t in taus)
        masks = top_k_masks(taus, thresholds)
    merged = stitch(taus, masks)
    on = masks.sum(dim=0)
    stats = {
        "in_set": True,
        "kept": [int(m.sum()) for m in masks],
        "numel": taus[0].numel(),
        "overlap": int((on >= 2).sum()),
    }
    return Merged(Dense(merged.to(out_dtype)), stats, {"masks": masks.cpu()})
