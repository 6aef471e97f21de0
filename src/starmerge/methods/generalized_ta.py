"""mergekit's "generalized task arithmetic", shared by its sparsifying merge methods.

Reference: mergekit (Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language
Models", EMNLP 2024 industry track, https://arxiv.org/abs/2403.13257),
``mergekit/merge_methods/generalized_task_arithmetic.py`` and ``mergekit/sparsify.py``.

Update rule for one parameter, with task deltas tau_t, weights w_t and T tasks:
    sparsify:  s_t = S(tau_t; density_t, ...)            (DARE, Breadcrumbs, DELLA; or s_t = tau_t)
    rescale:   s_t = s_t * ||tau_t||_1 / ||s_t||_1       (``rescale``; skipped when a norm < 1e-7)
    weight:    d_t = w_t * s_t
    consensus (the ``_ties`` variants and DELLA):
               g   = +1 where sum_t d_t >= 0, else -1;  m_t = (sign(d_t) == g)
               mixed = sum_t m_t d_t,  divisor = sum_t m_t w_t  (elementwise; 0 -> 1)
    otherwise: mixed = sum_t d_t,      divisor = sum_t w_t       (|divisor| < 1e-8 -> 1)
    result:    lambda * (mixed / divisor if normalize else mixed)

Symbols <-> arguments: w_t = ``weights`` (models[].weight; None: all 1.0), density_t =
``densities`` (None: ``density`` for every model), likewise ``gammas``/``gamma`` and
``epsilons``/``epsilon``; ``lambda``, ``normalize``, ``rescale`` and ``seed`` as named.

Randomness (DARE, DELLA): the kernel does not receive the parameter's key, and the mask must not
depend on the task's position (a merge is invariant to task order). Each task's uniform draws
come from a CPU ``torch.Generator`` seeded with a blake2b hash of ``seed``, the delta's shape and
its stored bytes (for a LoRA delta: its factors B, A and scale, which are device-independent
where a densified product is not). Hence the same inputs and seed give the same merge on any
device and in any task order; two identical task deltas get the same mask.

Deviations from mergekit: the work is in float32 (mergekit computes in the input dtype, e.g.
bfloat16), the result is cast back; mergekit's ``weight`` is required, here it defaults to 1.0;
sorting is stable (mergekit's ties among equal ``|x|`` are broken arbitrarily); the per-tensor
``torch.bernoulli`` draws come from the hashed generator above instead of torch's global RNG
(mergekit is reproducible only under a fixed global seed and evaluation order).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from starmerge.errors import ConfigError
from starmerge.methods.base import MAX_FACTOR, Merged, Param, factor_range, in_range
from starmerge.methods.footprint import Footprint, MemoryCase, MemoryModel
from starmerge.tensors.delta import Delta, Dense, LowRank
from starmerge.tensors.sparsify import l1_rescale_
from starmerge.tensors.threads import one_thread
from starmerge.tensors.vote import Scratch, SignVote, dense_into

# The scalar parameters that mergekit lets each model set, and their per-model list names.
PER_MODEL = {"weight": "weights", "density": "densities", "gamma": "gammas", "epsilon": "epsilons"}
LAMBDA = "lambda"  # mergekit's name (a Python keyword, so the kernels take **params)
_DIVISOR_EPS = 1e-8  # mergekit: a summed weight below this is replaced by 1

# sparsify(tau_t (float32), the task's delta as given, this task's values, buffers) -> s_t
Sparsifier = Callable[[Tensor, Delta, Mapping[str, Any], Scratch], Tensor]


def number_list(lo: float, hi: float) -> Callable[[Any], str | None]:
    """A ``Param.check``: None, or a list of numbers in ``[lo, hi]`` (one per model)."""

    def check(value: Any) -> str | None:
        if value is None:
            return None
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, Real) and not isinstance(v, bool) for v in value
        )
        if not ok:
            return "must be a list of numbers, one per model (or unset)"
        bad = next((i for i, v in enumerate(value) if not lo <= v <= hi), None)
        if bad is not None:
            return f"must hold numbers in [{lo:g}, {hi:g}] (entry {bad} is not)"
        return None

    return check


def _seed_check(value: int) -> str | None:
    return None if 0 <= value < 2**63 else "must be an integer in [0, 2**63)"


def gta_params(
    *, normalize: bool, rescale: bool, extra: Mapping[str, Param] | None = None
) -> dict[str, Param]:
    """The parameters every generalized-task-arithmetic method takes (mergekit's defaults).

    Args:
        normalize: The method's default for ``normalize``.
        rescale: The method's default for ``rescale``.
        extra: Method-specific parameters (``gamma``, ``epsilon``, ``seed``), added at the end.
    """
    return {
        "density": Param(
            1.0, "fraction of each task's entries kept (mergekit)", in_range(0, 1, lo_open=False)
        ),
        "densities": Param(None, "per-model density (default: density for all)", number_list(0, 1)),
        "weights": Param(
            None,
            "per-model weights w_t (default: models[].weight, else 1.0)",
            number_list(-MAX_FACTOR, MAX_FACTOR),
        ),
        "normalize": Param(normalize, "divide by the summed weights of the kept entries"),
        "rescale": Param(rescale, "rescale each sparsified task to its original L1 norm"),
        LAMBDA: Param(1.0, "lambda: multiplies the merged delta", factor_range()),
        **(extra or {}),
    }


def seed_param() -> dict[str, Param]:
    """The ``seed`` parameter of the random sparsifiers (DARE, DELLA)."""
    return {"seed": Param(0, "seed of the random masks (with each task delta's hash)", _seed_check)}


def per_model(method: str, params: Mapping[str, Any], name: str, n_tasks: int) -> list[float]:
    """One value of ``name`` (``weight``, ``density``, ...) per task.

    From the list parameter (``weights``, ...) when set, else the scalar for every task (1.0
    for ``weight``, which has no scalar).

    Raises:
        ConfigError: The list does not have one entry per task.
    """
    plural = PER_MODEL[name]
    values = params.get(plural)
    if values is None:
        return [float(params.get(name, 1.0))] * n_tasks
    if len(values) != n_tasks:
        raise ConfigError(
            [
                f"{method}: {plural} has {len(values)} entries but there are {n_tasks} models; "
                f"give one per model (models[].{name}) or leave {plural} unset"
            ]
        )
    return [float(v) for v in values]


def task_uniform(delta: Delta, seed: int) -> Tensor:
    """Uniform draws in [0, 1) of the delta's shape, reproducible from ``seed`` and the delta.

    Drawn on the CPU (float32) from a generator seeded by a hash of ``seed``, the shape and the
    delta's stored bytes, then moved to the delta's device.

    Example:
        >>> u = task_uniform(Dense(torch.ones(2, 3)), seed=0)
        >>> u.shape, bool(torch.equal(u, task_uniform(Dense(torch.ones(2, 3)), seed=0)))
        (torch.Size([2, 3]), True)
    """
    digest = hashlib.blake2b(f"{seed}|{tuple(delta.shape)}|".encode(), digest_size=8)
    if isinstance(delta, LowRank):
        digest.update(f"lowrank|{float(delta.scale)!r}|".encode())
        parts = [delta.b, delta.a]
    else:
        parts = [delta.tensor]
    for part in parts:
        data = part.detach().contiguous().reshape(-1).view(torch.uint8).cpu()
        digest.update(data.numpy())  # the buffer itself: no bytes copy
    gen = torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1)
    return torch.rand(delta.shape, generator=gen, dtype=torch.float32).to(delta.device)


def gta_memory(*, consensus: bool, sparsify: float) -> MemoryModel:
    """The footprint of :func:`merge_gta` (``Method.memory``) for a method's sparsifier.

    Tasks stream through one buffer each: a LoRA task's densified copy (1), the sparsifier's
    temporaries and result when some density is below 1 (``sparsify`` copies: DARE's draws
    and mask 2, the argsorts of Breadcrumbs 5 and of DELLA 7), the weighted copy when a
    weight is not 1 (1), a temporary for the rescale or the vote (1), a flag (0.25); then the
    sum (1), or with sign consensus the vote's sum, positive and negative parts (3) and its
    two float32 counts (2).
    """

    def memory(case: MemoryCase) -> Footprint:
        values = [case.params.get("density", 1.0), *(case.params.get("densities") or [])]
        sparse = any(not isinstance(v, Real) or v < 1 for v in values)
        weighted = any(w != 1 for w in case.params.get("weights") or [])
        work = (1 if case.lowrank else 0) + (sparsify if sparse else 0) + (1 if weighted else 0)
        work += 1.25 if consensus or case.params.get("rescale") else 0.25
        sums = 5 if consensus else 1
        return Footprint(case.copies(work + sums))

    return memory


def merge_gta(
    method: str,
    deltas: Sequence[Delta],
    params: Mapping[str, Any],
    sparsify: Sparsifier | None,
    *,
    consensus: bool,
) -> Merged:
    """Sparsify each task and add it to the weighted sum or the sign vote, one task at a time.

    The T sparsified tasks are never held together: each goes into the running sum (or the
    :class:`~starmerge.tensors.vote.SignVote`, mergekit's consensus: a zero sum elects +1),
    which gives the same numbers as summing them afterwards.

    Args:
        method: The registry name (for messages).
        deltas: One delta per task for this parameter.
        params: The resolved kernel parameters (``weights``, ``normalize``, ``rescale``,
            ``lambda``, the per-model values, ``seed``).
        sparsify: ``sparsify(tau_t, delta_t, values_t, scratch) -> s_t``, where ``values_t``
            holds this task's ``density``/``gamma``/``epsilon`` and ``seed``; ``s_t`` is
            ``tau_t`` itself (kept whole), a new tensor, or a ``scratch`` buffer other than
            ``tau``, ``weighted``, ``tmp``, ``total``, ``flag_a`` and the vote's; None keeps
            every entry.
        consensus: Sign consensus (the ``_ties`` variants, DELLA).

    Returns:
        The merged dense delta in the first input's dtype, with ``{"kept", "total"}`` (entries
        kept by the sparsifier, over tasks) and the ``seed`` when the method has one.
    """
    n_tasks = len(deltas)
    weights = per_model(method, params, "weight", n_tasks)
    names = [name for name in ("density", "gamma", "epsilon") if name in params]
    values = {name: per_model(method, params, name, n_tasks) for name in names}
    scratch = Scratch(deltas[0].shape, deltas[0].device)
    vote = SignVote(scratch, weights) if consensus else None
    total = None if consensus else scratch.get("total").zero_()
    kept = 0
    with one_thread():  # elementwise, memory-bound work: a second thread only waits (vote.py)
        for t, delta in enumerate(deltas):
            tau = dense_into(delta, scratch.get("tau"))  # (...) float32
            own = {name: values[name][t] for name in names} | {"seed": params.get("seed", 0)}
            s = tau if sparsify is None else sparsify(tau, delta, own, scratch)
            if params.get("rescale") and s is not tau:
                s = l1_rescale_(tau, s, scratch.get("tmp"))
            w = weights[t]
            p = s if w == 1.0 else torch.mul(s, w, out=scratch.get("weighted"))
            nonzero = None if vote is None else vote.add(p, w)
            kept += nonzero if nonzero is not None and p is s else _count_nonzero(s, scratch)
            if total is not None:
                total += p
        merged = _finish(vote, total, weights, params)
    stats: dict[str, Any] = {"kept": kept, "total": n_tasks * merged.numel()}
    if "seed" in params:
        stats["seed"] = params["seed"]
    return Merged(Dense(merged.to(deltas[0].dtype)), stats)


def _finish(
    vote: SignVote | None, total: Tensor | None, weights: list[float], params: Mapping[str, Any]
) -> Tensor:
    """The vote's disjoint merge (a zero sum elects +1) or the weighted sum; normalised, lambda."""
    normalize, lam = bool(params["normalize"]), float(params[LAMBDA])
    if vote is not None:
        merged = vote.merge(zero="positive", normalize=normalize)
    else:
        assert total is not None  # the sum is kept exactly when there is no vote
        merged, divisor = total, sum(weights)
        if normalize:
            merged.div_(1.0 if abs(divisor) < _DIVISOR_EPS else divisor)
    return merged.mul_(lam) if lam != 1 else merged


def _count_nonzero(x: Tensor, scratch: Scratch) -> int:
    """Nonzero entries of ``x``, counted on a boolean flag (fast; a float count is not)."""
    return int(torch.count_nonzero(torch.ne(x, 0, out=scratch.get("flag_a", torch.bool))))
