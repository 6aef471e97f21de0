"""Closed-form Fisher merging and RegMean (the systems MaTS solves by conjugate gradient).

Papers:
- "Merging Models with Fisher-Weighted Averaging" (Matena, Raffel; NeurIPS 2022),
  https://arxiv.org/abs/2111.09832.
- "Dataless Knowledge Fusion by Merging Weights of Language Models" (Jin, Ren, Preotiuc-Pietro,
  Cheng; ICLR 2023), https://arxiv.org/abs/2212.09849.

Update rules (in delta space; both are weighted means, so theta_0 + delta equals the papers'
merge of the full weights theta_i = theta_0 + tau_i):
    fisher_merging: delta = sum_i w_i * tau_i / sum_i w_i, w_i = c_i * max(F_i, floor)
                    (elementwise), c_i = 1 / ||F_i||_2 over all merged entries when normalize,
                    else 1;
    regmean:        delta = (sum_i tau_i G^_i) (sum_i G^_i)^-1 per Linear weight (out, in),
                    G^ = shrinkage * G + (1 - shrinkage) * diag(G), G the input Gram (in, in).
Parameters without statistics (biases, norms, embeddings, modules that were not hooked) are
averaged: delta = mean_i tau_i, as in both reference codes.

Symbols <-> arguments: floor = the Fisher floor (1e-6 in Matena's code, 1e-8 in MaTS's);
normalize = ``normalize_fishers``; shrinkage = RegMean's alpha (``reduce_non_diag``, 0.9 here as
recommended for decoder LLMs; the authors' configs use 0.1 for RoBERTa/T5 emotion);
fisher = which labels the Fisher used (recorded in the statistics; ``empirical`` or ``true``).

Deviations from the reference code:
- Fisher: uniform model weights (no lambda grid); the floor applies to every model (no target
  model); the "true" Fisher is one sampled label per token, not the expectation over classes
  (infeasible for a vocabulary); the Fisher is of the per-example loss averaged over its target
  tokens (MaTS), see ``docs/data_methods.md``;
- RegMean: Grams exclude padding and are divided by the number of non-pad tokens (MaTS's Grams;
  RegMean's code averages over all rows, padding included); the solve is in float64 with
  ``torch.linalg.solve`` and falls back to the pseudo-inverse when the system is singular
  (minimum-norm in the null space; the reference ``torch.inverse`` would fail there);
- both: computed on deltas, on the deltas' device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from starmerge.io.statistics import StatsFile
from starmerge.methods.base import Merged, Param, in_range, register_method
from starmerge.methods.contract import DataRequest
from starmerge.methods.footprint import F64, Footprint, MemoryCase
from starmerge.methods.statistics import StatsFitter, TaskStatistics, statistics_param
from starmerge.tensors.delta import Delta, Dense

_STATISTICS = statistics_param("precomputed statistics, one file per task (else `data:`)")


def shrink(m: Tensor, shrinkage: float) -> Tensor:
    """``shrinkage * M + (1 - shrinkage) * diag(M)``: scale the off-diagonal entries.

    Example:
        >>> shrink(torch.ones(2, 2), 0.5)
        tensor([[1.0000, 0.5000],
                [0.5000, 1.0000]])
    """
    if shrinkage == 1.0:
        return m
    return shrinkage * m + (1.0 - shrinkage) * torch.diag_embed(torch.diagonal(m))


def stack_taus(deltas: Sequence[Delta], dtype: torch.dtype = torch.float32) -> Tensor:
    """The dense task deltas as one tensor ``(T, ...)`` in ``dtype``."""
    return torch.stack([d.to_dense(dtype) for d in deltas])


def averaged(taus: Tensor, out_dtype: torch.dtype, reason: str) -> Merged:
    """The mean delta, for parameters the data says nothing about."""
    return Merged(Dense(taus.mean(dim=0).to(out_dtype)), {"solved": False, "reason": reason})


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be >= 0"


def _fit_fisher(
    n_tasks: int, *, statistics: Sequence[StatsFile] | None = None, **params: Any
) -> StatsFitter:
    norms = bool(params["normalize"])
    return StatsFitter(n_tasks, "fisher_merging", statistics, ["fisher"], fisher_norms=norms)


def _fit_regmean(
    n_tasks: int, *, statistics: Sequence[StatsFile] | None = None, **params: Any
) -> StatsFitter:
    return StatsFitter(n_tasks, "regmean", statistics, ["gram_in"])


def _data_fisher(params: Mapping[str, Any]) -> DataRequest:
    """Each task's diagonal Fisher, with the chosen labels."""
    return DataRequest(("fisher",), params["fisher"])


def _data_regmean(params: Mapping[str, Any]) -> DataRequest:
    """Each task's input Gram matrices."""
    return DataRequest(("gram_in",))


def _fisher_memory(case: MemoryCase) -> Footprint:
    """Fisher merging's memory: the taus, the Fisher weights and their product (3 T copies).

    Kernel: those, the weights' sum and the mean; fit: a Fisher's square and sum for its norm.
    """
    return Footprint(case.copies(3 * case.n_tasks + 2), case.copies(4))


@register_method(
    "fisher_merging",
    params={
        "floor": Param(1e-6, "lower bound on every Fisher entry", _non_negative),
        "normalize": Param(True, "divide each task's Fisher by its global L2 norm"),
    },
    accepts=("dense",),
    fit=_fit_fisher,
    paper="https://arxiv.org/abs/2111.09832",
    data_params={
        "fisher": Param(
            "empirical",
            "labels of the Fisher: dataset (empirical) or sampled (true)",
            choices=("empirical", "true"),
        ),
        "statistics": _STATISTICS,
    },
    data=_data_fisher,
    memory=_fisher_memory,
)
def fisher_merging(
    deltas: Sequence[Delta],
    *,
    floor: float = 1e-6,
    normalize: bool = True,
    state: dict[str, Any] | TaskStatistics | None = None,
) -> Merged:
    """Fisher merging: the Fisher-weighted mean of the task deltas, elementwise.

    Args:
        deltas: One delta per task for this parameter.
        floor: Every Fisher entry is raised to at least ``floor``.
        normalize: Weight task i by 1 / ||F_i|| (its global Fisher norm, from the fit step).
        state: ``{"fisher": [F_i], "fisher_norms": [...]}`` for this parameter.

    Returns:
        The merged delta; ``{"solved": True}`` or the reason it was averaged.

    Example:
        >>> f = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 3.0])]
        >>> fisher_merging([Dense(torch.ones(2)), Dense(torch.zeros(2))], normalize=False,
        ...                floor=0.0, state={"fisher": f}).delta.tensor
        tensor([0.5000, 0.0000])
    """
    out_dtype = deltas[0].dtype
    taus = stack_taus(deltas)  # (T, ...)
    stats = _as_dict(state)
    if "fisher" not in stats:
        return averaged(taus, out_dtype, "no fisher")
    weights = torch.stack([f.to(taus) for f in stats["fisher"]]).clamp(min=floor)  # (T, ...)
    if normalize:  # c_i = 1 / ||F_i|| (a task whose Fisher is all zero keeps c_i = 1)
        norms = torch.tensor(stats["fisher_norms"], dtype=taus.dtype, device=taus.device)
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        weights = weights / norms.view(-1, *[1] * (taus.ndim - 1))
    total = weights.sum(dim=0)
    merged = (weights * taus).sum(dim=0) / torch.where(total > 0, total, torch.ones_like(total))
    merged = torch.where(total > 0, merged, taus.mean(dim=0))
    return Merged(Dense(merged.to(out_dtype)), {"solved": True})


def _regmean_memory(case: MemoryCase) -> Footprint:
    """RegMean's memory: the taus and T shrunk (in, in) Grams in float64, and the solve.

    The taus (2 T copies), right-hand side and result; the Grams (the read ones are mapped, the
    shrunk ones float64), their sum, its eigenvectors and eigh's workspace.
    """
    if not case.matrix:
        return Footprint(case.copies(2 * case.n_tasks + 2))
    n_in = case.dims[1]
    return Footprint(case.copies(2 * case.n_tasks + 4) + case.square(n_in, case.n_tasks + 3, F64))


@register_method(
    "regmean",
    params={
        "shrinkage": Param(0.9, "alpha: scale of the Grams' off-diagonal entries", in_range(0, 1)),
    },
    accepts=("dense",),
    fit=_fit_regmean,
    paper="https://arxiv.org/abs/2212.09849",
    data_params={"statistics": _STATISTICS},
    data=_data_regmean,
    memory=_regmean_memory,
)
def regmean(
    deltas: Sequence[Delta],
    *,
    shrinkage: float = 0.9,
    state: dict[str, Any] | TaskStatistics | None = None,
) -> Merged:
    """RegMean: the least-squares merge of Linear layers given their input Gram matrices.

    Args:
        deltas: One delta per task for this parameter.
        shrinkage: alpha in (0, 1]; 1 keeps the Grams as they are.
        state: ``{"gram_in": [G_i]}`` for this parameter (a Linear weight ``(out, in)``).

    Returns:
        The merged delta; ``{"solved": True, "singular": bool}`` or why it was averaged.

    Example:
        >>> g = [torch.eye(2), torch.eye(2)]
        >>> regmean([Dense(torch.ones(1, 2)), Dense(torch.zeros(1, 2))],
        ...         state={"gram_in": g}).delta.tensor
        tensor([[0.5000, 0.5000]])
    """
    out_dtype = deltas[0].dtype
    taus = stack_taus(deltas, torch.float64)  # (T, out, in)
    grams = _as_dict(state).get("gram_in")
    if grams is None or taus.ndim != 3 or grams[0].shape[0] != taus.shape[2]:
        return averaged(taus, out_dtype, "no gram_in")
    shrunk = [shrink(g.to(taus), shrinkage) for g in grams]  # T x (in, in)
    rhs = sum(t @ g for t, g in zip(taus, shrunk, strict=True))  # (out, in)
    system = sum(shrunk)  # (in, in), symmetric
    inverse, singular = psd_inverse(system)
    merged = rhs @ inverse
    return Merged(Dense(merged.to(out_dtype)), {"solved": True, "singular": singular})


def psd_inverse(m: Tensor) -> tuple[Tensor, bool]:
    """The (pseudo-)inverse of a symmetric PSD matrix, and whether it is singular.

    By eigendecomposition; eigenvalues below ``n * eps * max`` count as 0, which gives the
    minimum-norm solution of a singular system.

    Example:
        >>> psd_inverse(torch.diag(torch.tensor([2.0, 0.0], dtype=torch.float64)))[1]
        True
    """
    evals, evecs = torch.linalg.eigh(m)
    eps, tiny = torch.finfo(m.dtype).eps, torch.finfo(m.dtype).tiny
    tol = evals.abs().max().clamp(min=tiny) * m.shape[0] * eps
    keep = evals > tol
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), 0.0)
    return (evecs * inv) @ evecs.T, bool((~keep).any())


def _as_dict(state: dict[str, Any] | TaskStatistics | None) -> dict[str, Any]:
    """A per-parameter state as a dict (``{}`` when there is none)."""
    if state is None:
        return {}
    if isinstance(state, TaskStatistics):  # a whole state passed by hand: nothing per key
        return dict(state.extra)
    return state
