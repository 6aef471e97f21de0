"""Model Breadcrumbs: ``breadcrumbs`` and ``breadcrumbs_ties``, with mergekit's semantics.

Paper: "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks" (Davari,
Belilovsky; ECCV 2024), https://arxiv.org/abs/2312.06795.
Reference code: mergekit's ``GeneralizedTaskArithmeticMerge`` with ``sparsification_method=
magnitude_outliers`` (``breadcrumbs``: no consensus; ``breadcrumbs_ties``: TIES' sign
consensus), see :mod:`starmerge.methods.generalized_ta` for the shared rule.

Update rule, per task t and parameter with n entries ordered by |tau_t| ascending:
    target = int(density_t * n),  n_top = int(gamma_t * n),  n_bot = max(0, n - target - n_top)
    s_t    = tau_t on the positions [n_bot, n_bot + target) of that order, 0 elsewhere
             (the gamma share of largest entries and the smallest ones are dropped)
    optional L1 rescale (``rescale``, default false), then weighted sum (``breadcrumbs``) or
    sign consensus + disjoint sum (``breadcrumbs_ties``), divided by the summed weights when
    ``normalize`` (default false), times ``lambda``.

Symbols <-> arguments: the paper's top-beta (outliers dropped) = ``gamma``, its kept share =
``density`` (mergekit's parametrisation: the paper's bottom share is 1 - density - gamma),
per model ``densities`` / ``gammas``; w_t = ``weights``; ``lambda`` scales the result (the
paper's alpha).

Deviations from mergekit (see ``generalized_ta``): float32 work; stable sorting (equal |x| are
ordered by position); ``weight`` defaults to 1.0. The paper masks per layer as mergekit does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from starmerge.methods.base import Merged, Param, in_range, register_method
from starmerge.methods.generalized_ta import gta_memory, gta_params, merge_gta, number_list
from starmerge.tensors.delta import Delta
from starmerge.tensors.sparsify import outlier_trim
from starmerge.tensors.vote import Scratch

_PAPER = "https://arxiv.org/abs/2312.06795"
_GAMMA = {
    "gamma": Param(0.01, "share of the largest-|x| entries dropped", in_range(0, 1, lo_open=False)),
    "gammas": Param(None, "per-model gamma (default: gamma for all)", number_list(0, 1)),
}


def breadcrumbs_sparsify(
    tau: Tensor, delta: Delta, own: Mapping[str, Any], scratch: Scratch
) -> Tensor:
    """Breadcrumbs' mask of one task: drop the gamma largest, then the smallest entries."""
    return outlier_trim(tau, own["density"], own["gamma"])


@register_method(
    "breadcrumbs",
    params=gta_params(normalize=False, rescale=False, extra=_GAMMA),
    accepts=("dense",),
    paper=_PAPER,
    memory=gta_memory(consensus=False, sparsify=5),
)
def breadcrumbs(deltas: Sequence[Delta], **params: Any) -> Merged:
    """Model Breadcrumbs: drop each task's outliers and small entries, weighted sum.

    Args:
        deltas: One delta per task for this parameter (densified if ``LowRank``).
        **params: ``density`` (1.0), ``densities``, ``gamma`` (0.01), ``gammas``, ``weights``,
            ``normalize`` (false), ``rescale`` (false), ``lambda`` (1.0), as registered.

    Returns:
        The merged dense delta and ``{"kept", "total"}``.
    """
    return merge_gta("breadcrumbs", deltas, params, breadcrumbs_sparsify, consensus=False)


@register_method(
    "breadcrumbs_ties",
    params=gta_params(normalize=False, rescale=False, extra=_GAMMA),
    accepts=("dense",),
    paper=_PAPER,
    memory=gta_memory(consensus=True, sparsify=5),
)
def breadcrumbs_ties(deltas: Sequence[Delta], **params: Any) -> Merged:
    """Model Breadcrumbs with TIES' sign consensus (mergekit breadcrumbs_ties).

    Args:
        deltas: One delta per task for this parameter (densified if ``LowRank``).
        **params: ``density`` (1.0), ``densities``, ``gamma`` (0.01), ``gammas``, ``weights``,
            ``normalize`` (false), ``rescale`` (false), ``lambda`` (1.0), as registered.

    Returns:
        The merged dense delta and ``{"kept", "total"}``.
    """
    return merge_gta("breadcrumbs_ties", deltas, params, breadcrumbs_sparsify, consensus=True)
