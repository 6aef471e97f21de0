"""WUDI merging: the merged delta that least disturbs each task's own inputs.

Paper: "Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via Task
Vectors" (Cheng, Zhou, Wang, Zhan, Hu, Ye, Tao; ICML 2025), https://arxiv.org/abs/2503.08099.
Reference code: FusionBench ``fusion_bench/method/wudi/wudi.py`` (``wudi_merging``), a port of
the authors' ``get_redundant_task_vector``.

Objective, per 2-D matrix, with w_t = 1 / ||D_t||_F^2 (a zero delta has no term):
    L(X) = sum_t w_t ||(X - D_t) D_t^T||_F^2
    grad = 2 (X G - H),  G = sum_t w_t D_t^T D_t (n x n),  H = sum_t w_t D_t D_t^T D_t (m x n)
``solver="adam"`` (the paper's procedure): X starts at S = sum_t D_t and takes ``steps`` Adam
steps (betas 0.9 / 0.999, eps 1e-8, no weight decay) with learning rate ``lr``; dense, float32.
``solver="exact"``: the minimiser itself, X = H G^+ (X G = H, so the gradient is zero; the
minimum-norm one, rows in the row space of the deltas). Parameters that are not 2-D matrices are
averaged, as in the reference.

Symbols <-> arguments: steps = ``iter_num`` (300), lr = Adam's learning rate (1e-5, fixed in the
reference). The default solver is ``adam``, the paper's and FusionBench's procedure; ``exact``
is what that procedure approximates (no peer computes it).

Low-rank inputs (D_t = s_t B_t A_t) are never densified. ``adam``: G = P^T K P and H = L P with
P = [A_1; ..; A_T] (R x n, R = sum_t r_t), K = blockdiag(w_t s_t^2 B_t^T B_t) and
L = [w_t s_t^3 B_t (A_t A_t^T)(B_t^T B_t)]_t, so a step costs O(m n R) instead of O(m n^2); X
itself is dense (Adam's step is elementwise). ``exact``: with Q an orthonormal basis of the rows
of P (n x q), D_t = C_t Q^T with C_t = s_t B_t (A_t Q), so G = Q g Q^T, H = h Q^T and
X = (h g^+) Q^T, an exact ``LowRank`` of rank q <= R at O((m + n) R^2 + T R^3), float64. Dense
inputs use the same coordinates (Q from the stacked deltas' rows when T m < n, else Q = I).

Deviations from the reference code:
- the gradient is the closed form 2 (X G - H) with G, H formed once, not autograd through the
  T products; equal up to float32 rounding (the golden test's tolerance);
- a zero delta is left out of the objective (the reference divides by ||0||^2 = 0 and returns
  NaN); all deltas zero give zero;
- w_t uses ||D_t||_F^2 in float64; Adam's update is written out (the formula of torch's
  single-tensor Adam), deterministic, with no randomness anywhere;
- ``exact``'s pseudo-inverse drops the eigenvalues of g at or below rtol^2 * max, rtol the
  numerical-rank cut-off ``max(m, n) * eps`` of the data's precision (noise directions).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from starmerge.methods.base import Merged, Param, in_range, register_method
from starmerge.methods.footprint import F64, Footprint, MemoryCase
from starmerge.tensors.delta import Delta, Dense, LowRank
from starmerge.tensors.factors import sq_frobenius
from starmerge.tensors.spectral import numerical_rtol, orthonormal_factor

Gradient = Callable[[Tensor], Tensor]  # X (m, n) -> dL/dX (m, n)
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults, as in the reference


def _memory(case: MemoryCase) -> Footprint:
    """WUDI's memory: Adam's X, moments and gradient, or the exact solve's float64 systems.

    Adam: X, its two moments, the gradient's temporaries and the (n, n) Gram (the T stacked
    taus while S is formed; while G is summed, one task's Gram and its weighted copy); exact:
    the taus twice in float64, the basis of their rows (n or T m wide), Gram, eigh, H and X.
    """
    n_tasks, (m, n_in) = case.n_tasks, case.dims
    if case.params.get("solver") == "exact":
        if case.lowrank:
            return Footprint(case.factors(3.5, F64))
        side = min(n_in, n_tasks * m)  # the basis of the tasks' rows
        return Footprint(case.copies(4 * n_tasks + 8) + case.square(side, 10))
    if case.lowrank:  # X from the factors (its float64 product), the moments, the gradient
        return Footprint(case.copies(7) + case.factors(2, F64))
    loop = case.copies(max(n_tasks + 3, 8)) + case.square(n_in)
    return Footprint(max(loop, case.copies(2) + case.square(n_in, 3)))


@register_method(
    "wudi",
    params={
        "solver": Param(
            "adam",
            "adam (the paper's procedure) or exact (the minimiser)",
            choices=("adam", "exact"),
        ),
        "steps": Param(300, "Adam steps (solver adam)", in_range(0, 100_000, lo_open=False)),
        "lr": Param(1e-5, "Adam learning rate (solver adam)", in_range(0, 1)),
    },
    accepts=("dense", "lowrank"),
    lowrank_output=lambda params: params["solver"] == "exact",
    paper="https://arxiv.org/abs/2503.08099",
    memory=_memory,
)
def wudi(
    deltas: Sequence[Delta],
    *,
    solver: Literal["adam", "exact"] = "adam",
    steps: int = 300,
    lr: float = 1e-5,
) -> Merged:
    """WUDI: minimise sum_t ||(X - D_t) D_t^T||^2 / ||D_t||^2 (Adam from S, or exactly).

    Args:
        deltas: One delta per task for this parameter (all ``LowRank`` stay factored).
        solver: ``adam`` (the paper's: ``steps`` Adam steps from the sum) or ``exact``.
        steps: Number of Adam steps (``adam`` only).
        lr: Adam's learning rate (``adam`` only).

    Returns:
        The merged delta in the first input's dtype (``Dense`` for ``adam``; ``LowRank`` for
        ``exact`` on ``LowRank`` inputs) and ``{"solver": solver}`` for matrices.

    Example:
        >>> x = Dense(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
        >>> torch.equal(wudi([x], solver="exact").delta.tensor, x.tensor)  # one task: itself
        True
    """
    first = deltas[0]
    if len(first.shape) != 2:
        return _average(deltas)
    weights = [1.0 / n2 if n2 > 0 else 0.0 for n2 in map(sq_frobenius, deltas)]
    live = [(d, w) for d, w in zip(deltas, weights, strict=True) if w > 0]
    lowrank = all(isinstance(d, LowRank) for d in deltas)
    if solver == "exact":
        merged = _exact(live, first, lowrank)
    else:
        merged = Dense(_adam(live, first, lowrank, steps, lr).to(first.dtype))
    return Merged(merged, {"solver": solver})


def _adam(
    live: list[tuple[Delta, float]], first: Delta, lowrank: bool, steps: int, lr: float
) -> Tensor:
    """``steps`` Adam steps on L from X = S (float32); S itself when no delta is non-zero."""
    m, n = first.shape
    if not live:
        return torch.zeros(m, n, dtype=torch.float32, device=first.device)
    x, grad_fn = _lowrank_problem(live) if lowrank else _dense_problem(live)
    exp_avg, exp_avg_sq = torch.zeros_like(x), torch.zeros_like(x)
    for step in range(1, steps + 1):
        grad = grad_fn(x)
        exp_avg.lerp_(grad, 1 - BETA1)
        exp_avg_sq.mul_(BETA2).addcmul_(grad, grad, value=1 - BETA2)
        bias1, bias2 = 1 - BETA1**step, 1 - BETA2**step
        denom = (exp_avg_sq.sqrt() / bias2**0.5).add_(EPS)
        x.addcdiv_(exp_avg, denom, value=-lr / bias1)
    return x


def _dense_problem(live: list[tuple[Delta, float]]) -> tuple[Tensor, Gradient]:
    """X0 = S and grad(X) = 2 (X G - H) with G (n x n) and H (m x n) formed once (float32)."""
    taus = [d.to_dense(torch.float32) for d, _ in live]
    gram = torch.zeros(
        taus[0].shape[1], taus[0].shape[1], dtype=torch.float32, device=taus[0].device
    )
    h = torch.zeros_like(taus[0])
    for tau, (_, w) in zip(taus, live, strict=True):
        g_t = tau.T @ tau  # (n, n)
        gram += w * g_t
        h += w * (tau @ g_t)
    x = torch.stack(taus).sum(dim=0)

    def grad(x: Tensor) -> Tensor:
        return 2 * (x @ gram - h)

    return x, grad


def _lowrank_problem(live: list[tuple[Delta, float]]) -> tuple[Tensor, Gradient]:
    """X0 = S and grad(X) = 2 ((X P^T) K - L) P from the factors (float64 cores, float32 loop)."""
    blocks_k, blocks_l, bs, as_ = [], [], [], []
    for d, w in live:
        s = float(d.scale)  # type: ignore[union-attr]
        b, a = d.b.to(torch.float64), d.a.to(torch.float64)  # type: ignore[union-attr]
        gram_b = b.T @ b  # (r, r)
        blocks_k.append((w * s * s) * gram_b)
        blocks_l.append((w * s**3) * (b @ ((a @ a.T) @ gram_b)))  # (m, r)
        bs.append(s * b)
        as_.append(a)
    p = torch.cat(as_, dim=0).to(torch.float32)  # (R, n)
    k = torch.block_diag(*blocks_k).to(torch.float32)  # (R, R)
    ell = torch.cat(blocks_l, dim=1).to(torch.float32)  # (m, R)
    x = (torch.cat(bs, dim=1) @ torch.cat(as_, dim=0)).to(torch.float32)  # S (m, n)

    def grad(x: Tensor) -> Tensor:
        return 2 * (((x @ p.T) @ k - ell) @ p)

    return x, grad


def _exact(live: list[tuple[Delta, float]], first: Delta, lowrank: bool) -> Delta:
    """X = H G^+ in the coordinates of an orthonormal basis Q of the deltas' rows (float64)."""
    m, n = first.shape
    device = first.device
    if not live:
        if lowrank:
            zero_b = torch.zeros(m, 0, dtype=first.dtype, device=device)
            return LowRank(zero_b, torch.zeros(0, n, dtype=first.dtype, device=device), 1.0)
        return Dense(torch.zeros(m, n, dtype=first.dtype, device=device))
    if lowrank:  # D_t = (s_t B_t) A_t: the rows are spanned by the stacked A_t
        pairs = [(d.b.to(torch.float64) * float(d.scale), d.a.to(torch.float64)) for d, _ in live]
    else:  # D_t = I_m D_t
        pairs = [(None, d.to_dense(torch.float64)) for d, _ in live]
    stacked = torch.cat([right for _, right in pairs], dim=0)  # (R, n)
    if lowrank or stacked.shape[0] < n:
        q = orthonormal_factor(stacked.T[None])[0][0]  # (n, q)
    else:
        q = torch.eye(n, dtype=torch.float64, device=device)
    g = torch.zeros(q.shape[1], q.shape[1], dtype=torch.float64, device=device)
    h = torch.zeros(m, q.shape[1], dtype=torch.float64, device=device)
    for (left, right), (_, w) in zip(pairs, live, strict=True):
        e = right @ q  # (r, q), or C_t (m, q) for dense
        g_t = e.T @ e if left is None else e.T @ ((left.T @ left) @ e)  # C_t^T C_t (q, q)
        g += w * g_t
        h += w * (e @ g_t if left is None else left @ (e @ g_t))  # C_t C_t^T C_t (m, q)
    x = h @ _psd_pinv(g, numerical_rtol((m, n), _data_dtype(first)) ** 2)  # (m, q)
    if lowrank:
        return LowRank(x.to(first.dtype), q.T.to(first.dtype), 1.0)
    return Dense((x @ q.T).to(first.dtype))


def _psd_pinv(g: Tensor, rtol: float) -> Tensor:
    """Pseudo-inverse of a symmetric PSD matrix, eigenvalues <= rtol * max counted as 0."""
    eig, vec = torch.linalg.eigh(g)
    top = float(eig[-1]) if eig.numel() else 0.0
    keep = eig > rtol * top if top > 0 else torch.zeros_like(eig, dtype=torch.bool)
    inv = torch.where(keep, 1.0 / torch.where(keep, eig, 1.0), 0.0)
    return (vec * inv) @ vec.T


def _data_dtype(delta: Delta) -> torch.dtype:
    """The precision the data carries (sets the noise cut-off): float64 kept, else float32."""
    return torch.float64 if delta.dtype == torch.float64 else torch.float32


def _average(deltas: Sequence[Delta]) -> Merged:
    """Non-matrix parameters: the plain mean over tasks (as the reference)."""
    total = torch.zeros_like(deltas[0].to_dense(torch.float32))
    for d in deltas:
        total += d.to_dense(torch.float32)
    return Merged(Dense((total / len(deltas)).to(deltas[0].dtype)))
