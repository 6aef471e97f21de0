"""MetaGPT: task arithmetic with closed-form, norm-proportional weights.

Paper: "MetaGPT: Merging Large Language Models Using Model Exclusive Task Arithmetic" (Zhou,
Song, Wang, Chen; EMNLP 2024), https://arxiv.org/abs/2406.11385.

Update rule: merged = sum_t lambda_t * tau_t with
    lambda_t = ||tau_t||^2 / sum_j ||tau_j||^2,
the norms taken over all merged parameters of each task (one global lambda_t per task, from one
fit pass over the model). No hyperparameters.

Symbols <-> arguments: none (lambda_t are computed, and reported in the manifest).

Deviations from the reference code (IBM/STAR ``merger/metagpt.py``):
- the norms are streamed per parameter (no concatenated copy of each task), and for ``LowRank``
  deltas come from the factors: ||s B A||_F^2 = s^2 * sum((B^T B) * (A A^T)), never densified;
- when every task vector is zero the seed code divides 0 by 0; here lambda_t = 1/T (uniform), which
  gives the same (zero) merge without NaN;
- low-rank inputs give an exact low-rank result (factor concatenation, rank sum_t r_t);
- called without ``state`` (standalone), the norms are those of the given parameter only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from starmerge.methods.base import Merged, register_method
from starmerge.methods.footprint import F64, Footprint, MemoryCase, summed
from starmerge.tensors.delta import Delta, Dense, LowRank
from starmerge.tensors.factors import concat_lowrank, sq_frobenius


def metagpt_lambdas(sq_norms: Sequence[float]) -> tuple[float, ...]:
    """lambda_t = n_t / sum_j n_j from squared norms; uniform when they are all 0.

    Example:
        >>> metagpt_lambdas([1.0, 3.0])
        (0.25, 0.75)
    """
    total = float(sum(sq_norms))
    if total == 0.0:
        return tuple(1.0 / len(sq_norms) for _ in sq_norms)
    return tuple(float(n) / total for n in sq_norms)


@dataclass(frozen=True)
class MetaGPTState:
    """The squared task-vector norms over the whole model and the resulting lambdas."""

    sq_norms: tuple[float, ...]
    lambdas: tuple[float, ...]

    def at(self, key: str) -> MetaGPTState:
        """The lambdas are global: every parameter gets the whole state."""
        return self

    def summary(self) -> dict[str, Any]:
        """Lambdas and squared norms per task for the manifest."""
        return {"lambdas": list(self.lambdas), "sq_norms": list(self.sq_norms)}


class MetaGPTFitter:
    """One pass accumulating ||tau_t||^2 over every parameter (``None``: the task lacks it).

    Args:
        n_tasks: Number of tasks T.
    """

    def __init__(self, n_tasks: int, **_: Any):
        self.sq_norms = [0.0] * n_tasks

    def observe(self, key: str, deltas: Sequence[Delta | None]) -> None:
        """Add this parameter's squared norm to each task's total."""
        for t, delta in enumerate(deltas):
            if delta is not None:
                self.sq_norms[t] += sq_frobenius(delta)

    def end_pass(self) -> bool:
        """One pass suffices."""
        return False

    def state(self) -> MetaGPTState:
        """The lambdas from the accumulated norms."""
        norms = tuple(self.sq_norms)
        return MetaGPTState(norms, metagpt_lambdas(norms))


def _fit_metagpt(n_tasks: int, **params: Any) -> MetaGPTFitter:
    return MetaGPTFitter(n_tasks, **params)


def _memory(case: MemoryCase) -> Footprint:
    """Kernel: a weighted sum; fit: each dense task's float64 copy and its square (4 copies)."""
    return Footprint(summed(case).kernel, case.factors(1, F64) if case.lowrank else case.copies(4))


@register_method(
    "metagpt",
    accepts=("dense", "lowrank"),
    fit=_fit_metagpt,
    lowrank_output=True,
    paper="https://arxiv.org/abs/2406.11385",
    memory=_memory,
)
def metagpt(deltas: Sequence[Delta], *, state: MetaGPTState | None = None) -> Merged:
    """MetaGPT: sum_t lambda_t tau_t with lambda_t proportional to ||tau_t||^2.

    Args:
        deltas: One delta per task for this parameter, all ``Dense`` or all ``LowRank``.
        state: The fitted :class:`MetaGPTState`; without it the norms of this parameter are used.

    Returns:
        The weighted sum, factored when the inputs are ``LowRank``, in the first input's dtype.

    Example:
        >>> metagpt([Dense(torch.tensor([1.0, 0.0])), Dense(torch.tensor([0.0, 2.0]))]).delta.tensor
        tensor([0.2000, 1.6000])
    """
    if state is None:
        lambdas = metagpt_lambdas([sq_frobenius(d) for d in deltas])
    else:
        lambdas = state.lambdas
    if all(isinstance(d, LowRank) for d in deltas):
        return Merged(concat_lowrank(deltas, lambdas))  # type: ignore[arg-type]
    total = torch.zeros_like(deltas[0].to_dense(torch.float32))
    for d, lam in zip(deltas, lambdas, strict=True):
        total += d.to_dense(torch.float32) * lam
    return Merged(Dense(total.to(deltas[0].dtype)))
