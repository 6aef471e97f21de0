"""The peers' dense formulations (float32) and float64 references for ``bench_spectral.py``.

Written for the benchmark from the papers' and peers' formulas; nothing here imports starmerge or
a peer package.

Peers (float32, one parameter's T dense task deltas ``(m, n)``, full thin SVDs as FusionBench):
- ``tsv_m``: per task ``svd``, its first ``int(p / T)`` triplets (p = min(m, n)) placed in
  ``U (m, p)``, ``s (p,)``, ``V^T (p, n)``, then the polar factors of U and V^T from one more
  SVD each: ``polar(U) diag(s) polar(V^T)`` (FusionBench ``compute_and_sum_svd_mem_reduction``);
- ``iso_c``: SVD of the sum, every singular value replaced by their mean (FusionBench ``iso_c``);
- ``iso_cts``: FusionBench's ``iso_cts`` sizes (common part ``int(0.8 p)`` from the sum's SVD,
  ``round((p - c) / T)`` directions per task from the SVD of its residual, polar factors, flat
  spectrum);
- ``cart``: the mean plus ``2.0`` x the rank-``int(0.12 p)`` SVD truncations of each task's
  deviation from it (the CART code's configuration);
- ``wudi`` (exact): ``X = H G^+``, ``G = sum_t w_t D_t^T D_t``, ``H = sum_t w_t D_t G_t``,
  ``w_t = 1 / ||D_t||^2``, with a dense pseudo-inverse (no peer computes the minimiser; this is
  the direct dense formula);
- ``ties``: per task the top 20 % entries by magnitude of the tensor, sign election by mass,
  disjoint mean (PEFT's and mergekit's per-tensor TIES);
- ``knots_ties``, ``knots_tsv_m``: KnOTS' own formulation of a merge in its space
  (``gstoica27/KnOTS`` ``task_merger.py``, ``SVDMerger.apply_svd``): the T dense deltas side by
  side, ``[D_1 .. D_T]`` (m x T n), one float64 thin SVD of that matrix, the singular values
  above 1e-5 kept, each task's ``diag(s) V_t^T`` merged by the method above, lifted with ``U``.

References (float64, independent of the library): the issue's formula of each method, with
singular values above ``CUT`` x the largest counted as the support (the inputs are exactly low
rank: B A of float32 factors, formed in float64). The merge spaces' bases are computed from the
factors with ``torch.linalg.svd`` / ``qr`` (Core Space: SVDs of the stacked factors; KnOTS: the
SVD of ``[D_1 .. D_T] = B_cat blockdiag(A_t)`` through a QR of ``B_cat``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

CUT = 1e-10  # float64 support cut-off, relative to the largest singular value
F64 = torch.float64


# --------------------------------------------------------------------------- the peers (float32)
def peer_tsv_m(ds: Sequence[Tensor]) -> Tensor:
    n_tasks = len(ds)
    for i, d in enumerate(ds):
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        if i == 0:
            sum_u, sum_s, sum_vh = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(vh)
        k = int(s.shape[0] * (1 / n_tasks))
        sum_u[:, i * k : (i + 1) * k] = u[:, :k]
        sum_s[i * k : (i + 1) * k] = s[:k]
        sum_vh[i * k : (i + 1) * k] = vh[:k]
    u_u, _, vh_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_v, _, vh_v = torch.linalg.svd(sum_vh, full_matrices=False)
    return torch.linalg.multi_dot((u_u, vh_u, torch.diag(sum_s), u_v, vh_v))


def peer_iso_c(ds: Sequence[Tensor]) -> Tensor:
    u, s, vh = torch.linalg.svd(sum(ds), full_matrices=False)
    return (u * s.mean()) @ vh


def peer_iso_cts(ds: Sequence[Tensor], common_fraction: float = 0.8) -> Tensor:
    n_tasks, p = len(ds), min(ds[0].shape)
    common = int(p * common_fraction)
    common = p - round((p - common) / n_tasks) * n_tasks
    per_task = int((p - common) / n_tasks)
    u, s, vh = torch.linalg.svd(sum(ds), full_matrices=False)
    u_c = u[:, :common]
    us, ss, vhs = [], [], []
    for d in ds:
        u_t, s_t, vh_t = torch.linalg.svd(d - u_c @ (u_c.T @ d), full_matrices=False)
        us.append(u_t[:, :per_task])
        ss.append(s_t[:per_task])
        vhs.append(vh_t[:per_task])
    big_u = torch.cat([*us, u_c], dim=1)  # (m, p)
    big_vh = torch.cat([*vhs, vh[:common]], dim=0)  # (p, n)
    level = torch.cat([*ss, s[:common]]).mean()
    pu, _, qu = torch.linalg.svd(big_u, full_matrices=False)
    pv, _, qv = torch.linalg.svd(big_vh, full_matrices=False)
    return ((pu @ qu) * level) @ (pv @ qv)


def peer_cart(ds: Sequence[Tensor], scaling: float = 2.0, rank_fraction: float = 0.12) -> Tensor:
    mean = sum(ds) / len(ds)
    k = max(1, int(rank_fraction * min(mean.shape)))
    total = torch.zeros_like(mean)
    for d in ds:
        u, s, vh = torch.linalg.svd(d - mean, full_matrices=False)
        total += (u[:, :k] * s[:k]) @ vh[:k]
    return mean + scaling * total


def peer_wudi_exact(ds: Sequence[Tensor]) -> Tensor:
    n = ds[0].shape[1]
    gram = torch.zeros(n, n, dtype=ds[0].dtype)
    h = torch.zeros_like(ds[0])
    for d in ds:
        w = 1.0 / float((d * d).sum())
        g_t = d.T @ d  # (n, n)
        gram += w * g_t
        h += w * (d @ g_t)
    return h @ torch.linalg.pinv(gram, hermitian=True)


def peer_ties(ds: Sequence[Tensor], density: float = 0.2) -> Tensor:
    stack = torch.stack(list(ds))  # (T, m, n)
    flat = stack.abs().flatten(1)
    k = int(density * flat.shape[1])
    thr = flat.kthvalue(flat.shape[1] - k + 1, dim=1).values  # k-th largest per task
    trimmed = torch.where(stack.abs() >= thr[:, None, None], stack, 0.0)
    elected = torch.sign(trimmed.sum(dim=0))
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    count = agree.sum(dim=0).clamp(min=1)
    return (trimmed * agree).sum(dim=0) / count


def peer_knots_svd(ds: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """KnOTS' basis: the float64 SVD of ``[D_1 .. D_T]``; ``U`` and each ``diag(s) V_t^T``."""
    n = ds[0].shape[1]
    u, s, vh = torch.linalg.svd(torch.cat(list(ds), dim=1).to(F64), full_matrices=False)
    keep = s > 1e-5
    u, s, vh = u[:, keep].float(), s[keep].float(), vh[keep].float()
    return u, [s[:, None] * vh[:, t * n : (t + 1) * n] for t in range(len(ds))]


def peer_knots(ds: Sequence[Tensor], merge) -> Tensor:
    """KnOTS: ``merge`` on each task's ``diag(s) V_t^T``, lifted by ``U``."""
    u, coords = peer_knots_svd(ds)
    return u @ merge(coords)


PEERS = {
    "tsv_m": peer_tsv_m,
    "iso_c": peer_iso_c,
    "iso_cts": peer_iso_cts,
    "cart": peer_cart,
    "wudi": peer_wudi_exact,
    "ties": peer_ties,
    "knots_ties": lambda ds: peer_knots(ds, peer_ties),
    "knots_tsv_m": lambda ds: peer_knots(ds, peer_tsv_m),
}
KNOTS_MERGE = {"knots_ties": peer_ties, "knots_tsv_m": peer_tsv_m}  # KnOTS' peers: the method


# --------------------------------------------------------------------------- float64 helpers
def svd64(x: Tensor, bound: int) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of float64 ``x`` (rank at most ``bound``) at its support (``CUT``).

    Dense LAPACK SVD for small matrices; otherwise the exact range route: ``Q`` from a QR of
    ``x @ omega`` (``bound + 32`` seeded Gaussian probes) spans the range of x, and the SVD of
    ``Q^T x`` is the SVD of x.
    """
    probes = bound + 32
    if min(x.shape) <= 2 * probes:
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
    else:
        g = torch.Generator().manual_seed(0)
        omega = torch.randn(x.shape[1], probes, generator=g, dtype=F64)
        q, _ = torch.linalg.qr(x @ omega)  # (m, probes)
        u_s, s, vh = torch.linalg.svd(q.T @ x, full_matrices=False)
        u = q @ u_s
    k = support(s)
    return u[:, :k], s[:k], vh[:k]


def support(s: Tensor) -> int:
    if s.numel() == 0 or float(s[0]) <= 0:
        return 0
    return int((s > CUT * s[0]).sum())


def polar64(x: Tensor) -> Tensor:
    """``P Q^T`` of ``x = P diag(s) Q^T`` on its support."""
    p, s, qh = torch.linalg.svd(x, full_matrices=False)
    k = support(s)
    return p[:, :k] @ qh[:k]


# --------------------------------------------------------------------------- references (float64)
def ref_tsv_m(ds: Sequence[Tensor], bound: int) -> Tensor:
    cap = min(ds[0].shape) // len(ds)  # fraction null: floor(p / T)
    us, ss, vhs = [], [], []
    for d in ds:
        u, s, vh = svd64(d, bound)
        k = min(cap, s.numel())
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    u, s, vh = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vhs, dim=0)
    return (polar64(u) * s) @ polar64(vh.T).T


def ref_iso_c(ds: Sequence[Tensor], bound: int) -> Tensor:
    u, s, vh = svd64(sum(ds), bound)
    return (u * s.mean()) @ vh


def ref_iso_cts(ds: Sequence[Tensor], bound: int, common_fraction: float = 0.8) -> Tensor:
    n_tasks = len(ds)
    u, s, vh = svd64(sum(ds), bound)
    rho = s.numel()
    common = math.floor(round(common_fraction * rho, 9))
    per_task = round((rho - common) / n_tasks)
    if per_task * n_tasks > rho:
        per_task -= 1
    common = rho - per_task * n_tasks
    u_c = u[:, :common]
    us, ss, vhs = [u_c], [s[:common]], [vh[:common]]
    for d in ds if per_task else []:
        u_t, s_t, vh_t = svd64(d - u_c @ (u_c.T @ d), bound)
        us.append(u_t[:, :per_task])
        ss.append(s_t[:per_task])
        vhs.append(vh_t[:per_task])
    big_u, big_vh, level = torch.cat(us, dim=1), torch.cat(vhs, dim=0), torch.cat(ss).mean()
    return (polar64(big_u) * level) @ polar64(big_vh.T).T


def ref_cart(
    ds: Sequence[Tensor], bound: int, scaling: float = 2.0, rank_fraction: float = 0.12
) -> Tensor:
    mean = sum(ds) / len(ds)
    budget = max(1, math.floor(round(rank_fraction * min(mean.shape), 9)))
    total = torch.zeros_like(mean)
    for d in ds:
        u, s, vh = svd64(d - mean, bound)
        k = min(budget, s.numel())
        total += (u[:, :k] * s[:k]) @ vh[:k]
    return mean + scaling * total


def ref_wudi_exact(ds: Sequence[Tensor], bound: int) -> Tensor:
    live = [d for d in ds if float((d * d).sum()) > 0]
    gram = torch.zeros(ds[0].shape[1], ds[0].shape[1], dtype=F64)
    h = torch.zeros_like(ds[0])
    for d in live:
        w = 1.0 / float((d * d).sum())
        g_t = d.T @ d
        gram += w * g_t
        h += w * (d @ g_t)
    return h @ torch.linalg.pinv(gram, hermitian=True, rtol=CUT)


def ref_ties(coords: Sequence[Tensor], thresholds: Sequence[float | None]) -> tuple[Tensor, int]:
    """TIES (normalize, unit weights, scaling 1) with the fitted per-task global thresholds.

    An entry is kept when ``|c| >= thr * (1 - 2 eps32)``: the threshold is a float32 value of
    the method's float32 coordinates, which differ from these float64 ones by float32 rounding.
    Returns the merged coordinates and how many entries lie within that rounding of a threshold
    (where the float32 and float64 decisions could differ).
    """
    band = 2 * torch.finfo(torch.float32).eps
    trimmed, ambiguous = [], 0
    for c, thr in zip(coords, thresholds, strict=True):
        if thr is None:
            trimmed.append(torch.zeros_like(c))
            continue
        mag = c.abs()
        ambiguous += int(((mag >= thr * (1 - band)) & (mag <= thr * (1 + band))).sum())
        trimmed.append(torch.where(mag >= thr * (1 - band), c, 0.0))
    stack = torch.stack(trimmed)
    elected = torch.sign(stack.sum(dim=0))
    agree = (torch.sign(stack) == elected) & (stack != 0)
    total = (stack * agree).sum(dim=0)
    count = agree.sum(dim=0)
    return torch.where(count > 0, total / count.clamp(min=1), 0.0), ambiguous


# --------------------------------------------------------------------------- merge spaces (float64)
def core_space(parts: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Core Space from ``(s_t B_t, A_t)`` float64: ``U_B (m, p)``, ``V_A (n, q)``, cores."""
    u, s, _ = torch.linalg.svd(torch.cat([b for b, _ in parts], dim=1), full_matrices=False)
    u_b = u[:, : support(s)]
    _, s, vh = torch.linalg.svd(torch.cat([a for _, a in parts], dim=0), full_matrices=False)
    v_a = vh[: support(s)].T
    return u_b, v_a, [(u_b.T @ b) @ (a @ v_a) for b, a in parts]


def knots_space(
    parts: Sequence[tuple[Tensor, Tensor]], dense: bool = False
) -> tuple[Tensor, list[Tensor]]:
    """KnOTS: ``U S (m, rho)`` and every task's ``V_t^T (rho, n)`` of ``[D_1 .. D_T]``.

    ``dense``: the SVD of the formed ``m x T n`` matrix (a cross-check of the factor route:
    ``B_cat = Q R``, then the SVD of ``R blockdiag(A_1 .. A_T)``, ``R x T n``).
    """
    n = parts[0][1].shape[1]
    if dense:
        u, s, vh = torch.linalg.svd(torch.cat([b @ a for b, a in parts], 1), full_matrices=False)
    else:
        q, r = torch.linalg.qr(torch.cat([b for b, _ in parts], dim=1))  # (m, R), (R, R)
        u_s, s, vh = torch.linalg.svd(r @ torch.block_diag(*[a for _, a in parts]), False)
        u = q @ u_s
    k = support(s)
    coords = [vh[:k, t * n : (t + 1) * n] for t in range(len(parts))]
    return u[:, :k] * s[:k], coords
