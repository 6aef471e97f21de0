"""MaTS: merging by matching models in task parameter subspaces, solved by conjugate gradient.

Paper: "Merging by Matching Models in Task Parameter Subspaces" (Tam, Bansal, Raffel; TMLR 2024),
https://arxiv.org/abs/2312.04339. Reference code: ``r-three/mats``.

Update rule, per parameter block, in delta space (tau_i = theta_i - theta_0):
    solve (sum_i C_i) delta = sum_i C_i tau_i by conjugate gradient from
    delta_0 = init_scaling * sum_i tau_i (the task-arithmetic merge), for at most ``iterations``
    steps or until ||b - A delta|| <= tolerance * ||b||; the merged weight is theta_0 + delta.
C_i per ``objective`` (W a Linear weight (out, in), X a delta block of the same shape):
    average:         C_i = I                          A X = T X            (returns the mean)
    diagonal_fisher: C_i = diag(F_i)                  A X = (sum_i F_i) * X
    regmean:         C_i = G^_i (x) I_out             A X = X (sum_i G^_i)  (G = input Gram)
    kfac:            C_i = A^_i (x) G^_i              A X = sum_i G^_i X A^_i
                     (A = input Gram (in, in), G = output-gradient Gram (out, out))
with M^ = shrinkage * M + (1 - shrinkage) * diag(M). Parameters without the statistics the
objective needs (biases, norms, embeddings; ``lm_head`` under kfac) are averaged: mean_i tau_i.

Symbols <-> arguments: objective = the reference script (``conjugateGradient_{average,
diagonalFisher,fisherMerging}``, kfac = ``--use_backward``); iterations = ``--num_iterations``;
init_scaling = the lambda of the task-arithmetic initialisation (0 = start from theta_0);
shrinkage = ``--model_lambda``; tolerance = our explicit relative tolerance in delta space.

Default objective: ``regmean``. For full fine-tunes the published recipes are the RegMean
objective or K-FAC, both with 100 iterations and a TA(0.3) init; the blockwise-Fisher (IA)^3 recipe
does not apply to LoRA/full weights. RegMean needs only forward passes (no labels, no backward,
in^2 per Linear), K-FAC also a backward and out^2 per Linear (820 MB per 7B MLP layer and task).

Deviations from the reference code:
- solved on deltas, not on full weights (same solution, better float32 conditioning), by our
  torch CG on the deltas' device (no scipy, no CPU<->GPU copies per matvec);
- the tolerance is explicit and relative to the *delta-space* right-hand side (scipy's default
  1e-5 * ||b|| on full weights stops early, see methods.md 1.7); ``tolerance = 0`` runs until
  the residual reaches rounding level (or ``iterations``);
- the init is task arithmetic for every objective (the reference uses no init for the diagonal
  Fisher and the average for ``average``; set init_scaling to 0 / 1/T for those);
- ``lm_head``: under kfac it has no output Gram and is averaged (as the reference); under regmean it
  is solved when it is merged (the reference silently keeps the pretrained ``lm_head``);
- statistics (see ``docs/data_methods.md``) mask padding and are normalised by non-pad tokens;
- ``precision`` selects float32 (default) or float64 CG.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from starmerge.errors import ConfigError
from starmerge.io.statistics import StatsFile
from starmerge.methods.base import Merged, Param, factor_range, in_range, register_method
from starmerge.methods.contract import DataRequest
from starmerge.methods.fisher_regmean import averaged, shrink, stack_taus
from starmerge.methods.footprint import F32, Footprint, MemoryCase
from starmerge.methods.statistics import StatsFitter, statistics_param
from starmerge.tensors.cg import conjugate_gradient
from starmerge.tensors.delta import Delta, Dense

OBJECTIVE_KINDS: dict[str, tuple[str, ...]] = {
    "average": (),
    "diagonal_fisher": ("fisher",),
    "regmean": ("gram_in",),
    "kfac": ("gram_in", "gram_out"),
}

Operator = tuple[Callable[[Tensor], Tensor], Tensor]  # (x -> A x, b)


class _NoStats:
    """The ``average`` objective's fitter: nothing to read."""

    def observe(self, key: str, deltas: Sequence[Delta | None]) -> None:
        """Nothing to observe."""

    def end_pass(self) -> bool:
        """One pass."""
        return False

    def state(self) -> None:
        """No state."""
        return None


def _fit(
    n_tasks: int, *, statistics: Sequence[StatsFile] | None = None, **params: Any
) -> StatsFitter | _NoStats:
    objective = params["objective"]
    if not OBJECTIVE_KINDS[objective]:
        return _NoStats()
    need = f"objective {objective!r}"
    return StatsFitter(n_tasks, "mats", statistics, OBJECTIVE_KINDS[objective], need=need)


def _data(params: Mapping[str, Any]) -> DataRequest | None:
    """The statistics the objective reads (none for ``average``), with the Fisher's labels."""
    kinds = OBJECTIVE_KINDS[params["objective"]]
    if not kinds:
        return None
    return DataRequest(kinds, params["fisher"], reason=f"objective {params['objective']}")


def _operator(
    objective: str, stats: dict[str, Any], taus: Tensor, shrinkage: float
) -> Operator | None:
    """The CG operator and right-hand side for one block, or None without statistics."""
    n_tasks = taus.shape[0]
    if objective == "average":
        return (lambda x: n_tasks * x), taus.sum(dim=0)
    if objective == "diagonal_fisher":
        if "fisher" not in stats:
            return None
        fishers = torch.stack([f.to(taus) for f in stats["fisher"]])  # (T, ...)
        total = fishers.sum(dim=0)
        return (lambda x: total * x), (fishers * taus).sum(dim=0)
    if taus.ndim != 3 or "gram_in" not in stats or stats["gram_in"][0].shape[0] != taus.shape[2]:
        return None
    a = [shrink(g.to(taus), shrinkage) for g in stats["gram_in"]]  # T x (in, in)
    if objective == "regmean":
        a_sum = sum(a)
        return (lambda x: x @ a_sum), sum(t @ ai for t, ai in zip(taus, a, strict=True))
    if "gram_out" not in stats or stats["gram_out"][0].shape[0] != taus.shape[1]:
        return None
    g = [shrink(m.to(taus), shrinkage) for m in stats["gram_out"]]  # T x (out, out)
    return (
        (lambda x: sum(gi @ x @ ai for gi, ai in zip(g, a, strict=True))),
        sum(gi @ t @ ai for gi, t, ai in zip(g, taus, a, strict=True)),
    )


def _memory(case: MemoryCase) -> Footprint:
    """MaTS's memory: the taus and the CG vectors in the CG precision, with the Grams.

    T + 8 copies (taus, x, r, p, A p, b, x0, ...), the summed input Gram (regmean, kfac), the
    output Grams' products (kfac) or the Fisher weights (diagonal_fisher).
    """
    m, n = case.dims
    objective = case.params.get("objective", "regmean")
    extra = {"regmean": n * n, "kfac": n * n + m * m, "diagonal_fisher": 2 * case.numel}
    scale = 2 if case.params.get("precision") == "float64" else 1
    return Footprint(scale * (case.copies(case.n_tasks + 8) + F32 * extra.get(objective, 0)))


@register_method(
    "mats",
    params={
        "objective": Param(
            "regmean",
            "C_t: average, diagonal_fisher, regmean (input Gram) or "
            "kfac (input x output-gradient Gram)",
            choices=tuple(OBJECTIVE_KINDS),
        ),
        "iterations": Param(
            100,
            "maximum conjugate-gradient steps per parameter",
            lambda v: None if v >= 0 else "must be >= 0",
        ),
        "tolerance": Param(
            1e-5,
            "stop when ||b - A x|| <= tolerance * ||b|| (delta space); 0: run to rounding level",
            in_range(0, 1, lo_open=False),
        ),
        "init_scaling": Param(0.3, "CG init = init_scaling * sum of task deltas", factor_range()),
        "shrinkage": Param(1.0, "lambda: scale of the Grams' off-diagonal entries", in_range(0, 1)),
        "precision": Param("float32", "CG arithmetic", choices=("float32", "float64")),
    },
    accepts=("dense",),
    fit=_fit,
    paper="https://arxiv.org/abs/2312.04339",
    data_params={
        "fisher": Param(
            "empirical",
            "labels of the gradient statistics: dataset (empirical) "
            "or sampled from the model (true)",
            choices=("empirical", "true"),
        ),
        "statistics": statistics_param("precomputed statistics, one file per task (else `data:`)"),
    },
    data=_data,
    memory=_memory,
)
def mats(
    deltas: Sequence[Delta],
    *,
    objective: str = "regmean",
    iterations: int = 100,
    tolerance: float = 1e-5,
    init_scaling: float = 0.3,
    shrinkage: float = 1.0,
    precision: str = "float32",
    state: dict[str, Any] | None = None,
) -> Merged:
    """MaTS: conjugate gradient on (sum_t C_t) delta = sum_t C_t tau_t from the TA merge.

    Args:
        deltas: One delta per task for this parameter.
        objective: Which C_t (see the module docstring).
        iterations: Maximum CG steps.
        tolerance: Relative residual at which CG stops (0: never early).
        init_scaling: The CG init is ``init_scaling * sum_t tau_t``.
        shrinkage: Off-diagonal scale of the Gram matrices (1: none).
        precision: ``float32`` or ``float64`` arithmetic.
        state: ``{kind: [tensor per task]}`` for this parameter (from the fit step).

    Returns:
        The merged delta and ``{"solved", "iterations", "residual"}`` (or why it was averaged).

    Raises:
        ConfigError: A data objective without statistics.

    Example:
        >>> mats([Dense(torch.ones(2)), Dense(torch.zeros(2))], objective="average").delta.tensor
        tensor([0.5000, 0.5000])
    """
    if objective != "average" and state is None:
        raise ConfigError(
            [
                f"mats: objective {objective!r} needs statistics; add a `data:` section to the "
                "config or pass parameters.statistics (one statistics file per task)"
            ]
        )
    out_dtype = deltas[0].dtype
    taus = stack_taus(deltas, getattr(torch, precision))  # (T, ...)
    op = _operator(objective, state or {}, taus, shrinkage)
    if op is None:
        return averaged(taus, out_dtype, f"no statistics for {objective}")
    apply, b = op
    x0 = init_scaling * taus.sum(dim=0)
    result = conjugate_gradient(apply, b, x0, iterations=iterations, tolerance=tolerance)
    stats = {"solved": True, "iterations": result.iterations, "residual": result.residual}
    return Merged(Dense(result.x.to(out_dtype)), stats)
