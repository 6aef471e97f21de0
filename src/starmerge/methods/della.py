"""DELLA-Merging (MagPrune): ``della`` and ``della_linear``, with mergekit's semantics.

Paper: "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling"
(Deep, Bhardwaj, Poria; 2024), https://arxiv.org/abs/2406.11617.
Reference code: mergekit's ``GeneralizedTaskArithmeticMerge`` with ``sparsification_method=
della_magprune`` (``della``: TIES' sign consensus, normalize and rescale on; ``della_linear``:
no consensus, no normalize), see :mod:`starmerge.methods.generalized_ta` for the shared rule.

Update rule, per task t and parameter (p = density_t, e = epsilon_t):
    along dim 1 (a 1-D tensor is one row), rank r = 1..n of |tau_t| (1 = smallest):
    p_r   = (p - e) + (r - 1) / (n - 1) * 2e            (from p - e up to p + e)
    m_t   ~ Bernoulli(p_r) elementwise;  s_t = m_t * tau_t
    s_t   = s_t * ||tau_t||_1 / ||s_t||_1                 (``rescale``, default true)
    then sign consensus + disjoint sum (``della``) or weighted sum (``della_linear``), divided
    by the summed weights when ``normalize`` (``della`` true, ``della_linear`` false), times
    ``lambda``.

Symbols <-> arguments: p = ``density``, e = ``epsilon`` (per model ``densities``,
``epsilons``); w_t = ``weights``; the paper's lambda = ``lambda``; ``seed`` seeds the masks.
With 0 < p < 1, p - e and p + e must lie in (0, 1) (checked when the merge starts).

Deviations: from the paper, the rescale matches each task's L1 norm over the whole tensor
(mergekit) instead of dividing each kept entry by its own p_r; from mergekit (see
``generalized_ta``): float32 work, stable ranking (equal |x| ranked by position), masks from a
generator seeded by ``seed`` and each task delta's hash, ``weight`` defaulting to 1.0; a row of
one entry (a (m, 1) matrix, a 1-element bias) gets p_r = p, where mergekit's 0/0 rank makes
``torch.bernoulli`` raise. LoRA inputs are densified here (taken factored to hash the factors).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from starmerge.errors import ConfigError
from starmerge.methods.base import Merged, Param, in_range, register_method
from starmerge.methods.generalized_ta import (
    gta_memory,
    gta_params,
    merge_gta,
    number_list,
    per_model,
    seed_param,
    task_uniform,
)
from starmerge.tensors.delta import Delta
from starmerge.tensors.sparsify import della_keep_probs, random_keep
from starmerge.tensors.vote import Scratch

_PAPER = "https://arxiv.org/abs/2406.11617"
_EPSILON = {
    "epsilon": Param(
        0.15,
        "e: keep probabilities span density -/+ e by magnitude rank",
        in_range(0, 0.5, lo_open=False, hi_open=True),
    ),
    "epsilons": Param(None, "per-model epsilon (default: epsilon for all)", number_list(0, 0.5)),
    **seed_param(),
}


def della_sparsify(tau: Tensor, delta: Delta, own: Mapping[str, Any], scratch: Scratch) -> Tensor:
    """MagPrune of one task: keep each entry with its rank's probability p_r."""
    density = own["density"]
    if density >= 1:
        return tau
    if density <= 0:
        return torch.zeros_like(tau)
    probs = della_keep_probs(tau, density, own["epsilon"])
    return random_keep(tau, probs, task_uniform(delta, own["seed"]))


def check_epsilon(method: str, params: Mapping[str, Any], n_tasks: int) -> None:
    """Refuse a density -/+ epsilon outside (0, 1) for a model with 0 < density < 1.

    Raises:
        ConfigError: Naming the model, its density and epsilon, and the fix.
    """
    densities = per_model(method, params, "density", n_tasks)
    epsilons = per_model(method, params, "epsilon", n_tasks)
    for t, (p, e) in enumerate(zip(densities, epsilons, strict=True)):
        if 0 < p < 1 and (p + e >= 1 or p - e <= 0):
            raise ConfigError(
                [
                    f"{method}: density - epsilon and density + epsilon must lie in (0, 1), got "
                    f"density {p:g} and epsilon {e:g} for model {t}; choose epsilon below "
                    f"{min(p, 1 - p):g}"
                ]
            )


def _della(method: str, deltas: Sequence[Delta], params: Mapping[str, Any], consensus: bool):
    check_epsilon(method, params, len(deltas))
    return merge_gta(method, deltas, params, della_sparsify, consensus=consensus)


@register_method(
    "della",
    params=gta_params(normalize=True, rescale=True, extra=_EPSILON),
    accepts=("dense", "lowrank"),
    paper=_PAPER,
    # sparsify: |tau|, the int64 order and ranks (2 P each) and the stable sort's int64 buffers:
    # 7 P at its peak, measured (tests/integration/test_memory_prediction.py)
    memory=gta_memory(consensus=True, sparsify=7),
)
def della(deltas: Sequence[Delta], **params: Any) -> Merged:
    """DELLA: magnitude-ranked random drop, rescale, TIES' sign consensus (mergekit della).

    Args:
        deltas: One delta per task for this parameter.
        **params: ``density`` (1.0), ``densities``, ``epsilon`` (0.15), ``epsilons``,
            ``weights``, ``normalize`` (true), ``rescale`` (true), ``lambda`` (1.0),
            ``seed`` (0), as registered.

    Returns:
        The merged dense delta and ``{"kept", "total", "seed"}``.

    Raises:
        ConfigError: density -/+ epsilon outside (0, 1) for some model.
    """
    return _della("della", deltas, params, consensus=True)


@register_method(
    "della_linear",
    params=gta_params(normalize=False, rescale=True, extra=_EPSILON),
    accepts=("dense", "lowrank"),
    paper=_PAPER,
    memory=gta_memory(consensus=False, sparsify=7),  # as della's sparsifier
)
def della_linear(deltas: Sequence[Delta], **params: Any) -> Merged:
    """DELLA without sign consensus: magnitude-ranked drop, rescale, weighted sum.

    Args:
        deltas: One delta per task for this parameter.
        **params: ``density`` (1.0), ``densities``, ``epsilon`` (0.15), ``epsilons``,
            ``weights``, ``normalize`` (false), ``rescale`` (true), ``lambda`` (1.0),
            ``seed`` (0), as registered.

    Returns:
        The merged dense delta and ``{"kept", "total", "seed"}``.

    Raises:
        ConfigError: density -/+ epsilon outside (0, 1) for some model.
    """
    return _della("della_linear", deltas, params, consensus=False)
