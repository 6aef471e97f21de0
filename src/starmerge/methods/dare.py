"""DARE (Drop And REscale): ``dare_linear`` and ``dare_ties``, with mergekit's semantics.

Paper: "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
Lunch" (Yu, Yu, Yu, Huang, Li; ICML 2024), https://arxiv.org/abs/2311.03099.
Reference code: mergekit's ``GeneralizedTaskArithmeticMerge`` with ``sparsification_method=
random`` (``dare_linear``: no consensus; ``dare_ties``: TIES' sign consensus), see
:mod:`starmerge.methods.generalized_ta` for the shared rule.

Update rule, per task t and parameter (p = density_t):
    m_t  ~ Bernoulli(p) elementwise;  s_t = m_t * tau_t
    s_t  = s_t * ||tau_t||_1 / ||s_t||_1            (``rescale``, default true; the paper: / p)
    then weighted sum (``dare_linear``) or sign consensus + disjoint sum (``dare_ties``),
    divided by the summed weights when ``normalize`` (default false), times ``lambda``.

Symbols <-> arguments: p = ``density`` (the paper's drop rate is 1 - p), per model ``densities``;
w_t = ``weights``; ``lambda`` scales the result; ``seed`` seeds the masks.

Deviations: from the paper, the rescale matches each task's L1 norm (mergekit's rule) instead of
dividing by p (equal in expectation on large tensors); from mergekit, see ``generalized_ta``:
float32 work, the masks drawn from a generator seeded by ``seed`` and a hash of each task's
delta (reproducible on any device and task order) instead of torch's global RNG, ``weight``
defaulting to 1.0. ``density >= 1`` keeps every entry and skips the rescale, as mergekit.
LoRA inputs are densified here (the kernel takes them factored only to hash the factors).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from starmerge.methods.base import Merged, register_method
from starmerge.methods.generalized_ta import (
    gta_memory,
    gta_params,
    merge_gta,
    seed_param,
    task_uniform,
)
from starmerge.tensors.delta import Delta
from starmerge.tensors.sparsify import random_keep
from starmerge.tensors.vote import Scratch

_PAPER = "https://arxiv.org/abs/2311.03099"


def dare_sparsify(tau: Tensor, delta: Delta, own: Mapping[str, Any], scratch: Scratch) -> Tensor:
    """DARE's random drop of one task: keep each entry with probability ``own["density"]``.

    The comparison and the result go to ``scratch`` buffers (``flag_b``, ``kept``).
    """
    density = own["density"]
    if density >= 1:
        return tau
    flag, out = scratch.get("flag_b", torch.bool), scratch.get("kept")
    return random_keep(tau, density, task_uniform(delta, own["seed"]), flag, out)


@register_method(
    "dare_linear",
    params=gta_params(normalize=False, rescale=True, extra=seed_param()),
    accepts=("dense", "lowrank"),
    paper=_PAPER,
    memory=gta_memory(consensus=False, sparsify=2.25),
)
def dare_linear(deltas: Sequence[Delta], **params: Any) -> Merged:
    """DARE: drop each task's entries at random, rescale, weighted sum (mergekit dare_linear).

    Args:
        deltas: One delta per task for this parameter.
        **params: ``density``, ``densities``, ``weights``, ``normalize`` (false), ``rescale``
            (true), ``lambda`` (1.0), ``seed`` (0), as registered.

    Returns:
        The merged dense delta and ``{"kept", "total", "seed"}``.

    Example:
        >>> dare_linear([Dense(torch.ones(2))], density=1.0, densities=None, weights=None,
        ...             normalize=False, rescale=True, seed=0, **{"lambda": 1.0}).delta.tensor
        tensor([1., 1.])
    """
    return merge_gta("dare_linear", deltas, params, dare_sparsify, consensus=False)


@register_method(
    "dare_ties",
    params=gta_params(normalize=False, rescale=True, extra=seed_param()),
    accepts=("dense", "lowrank"),
    paper=_PAPER,
    memory=gta_memory(consensus=True, sparsify=2.25),
)
def dare_ties(deltas: Sequence[Delta], **params: Any) -> Merged:
    """DARE-TIES: random drop and rescale, then TIES' sign consensus (mergekit dare_ties).

    Args:
        deltas: One delta per task for this parameter.
        **params: ``density``, ``densities``, ``weights``, ``normalize`` (false), ``rescale``
            (true), ``lambda`` (1.0), ``seed`` (0), as registered.

    Returns:
        The merged dense delta and ``{"kept", "total", "seed"}``.

    Example:
        >>> dare_ties([Dense(torch.tensor([1.0, -2.0])), Dense(torch.tensor([3.0, 1.0]))],
        ...           density=1.0, densities=None, weights=None, normalize=False,
        ...           rescale=True, seed=0, **{"lambda": 1.0}).delta.tensor
        tensor([ 4., -2.])
    """
    return merge_gta("dare_ties", deltas, params, dare_sparsify, consensus=True)
