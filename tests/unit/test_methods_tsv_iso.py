"""TSV-M, Iso-C and Iso-CTS against plain float64 dense references; LoRA vs dense; properties."""

import pytest
import torch

from starmerge.errors import ConfigError
from starmerge.methods import METHODS
from starmerge.methods.iso import iso_c, iso_cts
from starmerge.methods.tsv_m import tsv_m
from starmerge.tensors.delta import Dense, LowRank

# ---- independent float64 references (textbook formulas on dense matrices) ----------------


def svd_support(x):
    """Thin SVD of a float64 matrix with singular values below 1e-9 * s_1 dropped."""
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    rank = int((s > 1e-9 * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    return u[:, :rank], s[:rank], vh[:rank]


def orth(x):
    """Polar factor P Q^T of a full-rank (column or row) matrix."""
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def ref_tsv_m(mats, fraction=None, scaling=1.0):
    p = min(mats[0].shape)
    cap = p // len(mats) if fraction is None else int(round(fraction * p, 9))
    us, ss, vhs = [], [], []
    for x in mats:
        u, s, vh = svd_support(x)
        us.append(u[:, :cap]), ss.append(s[:cap]), vhs.append(vh[:cap])
    u, s, vh = torch.cat(us, 1), torch.cat(ss), torch.cat(vhs, 0)
    if s.numel() == 0:
        return torch.zeros_like(mats[0])
    return scaling * orth(u) @ torch.diag(s) @ orth(vh.T).T


def ref_iso_c(mats, scaling=1.0):
    u, s, vh = svd_support(sum(mats))
    return scaling * s.mean() * u @ vh if s.numel() else torch.zeros_like(mats[0])


def ref_iso_cts(mats, common_fraction=0.8, scaling=1.0):
    u, s, vh = svd_support(sum(mats))
    rho, n_tasks = s.numel(), len(mats)
    c = int(round(common_fraction * rho, 9))
    d = round((rho - c) / n_tasks)
    d = d - 1 if d * n_tasks > rho else d
    c = rho - d * n_tasks
    us, ss, vhs = [u[:, :c]], [s[:c]], [vh[:c]]
    for x in mats:
        ru, rs, rvh = svd_support(x - u[:, :c] @ u[:, :c].T @ x)
        us.append(ru[:, :d]), ss.append(rs[:d]), vhs.append(rvh[:d])
    s = torch.cat(ss)
    if s.numel() == 0:
        return torch.zeros_like(mats[0])
    return scaling * s.mean() * orth(torch.cat(us, 1)) @ orth(torch.cat(vhs, 0).T).T


REFS = {"tsv_m": ref_tsv_m, "iso_c": ref_iso_c, "iso_cts": ref_iso_cts}
KERNELS = {"tsv_m": tsv_m, "iso_c": iso_c, "iso_cts": iso_cts}

# ---- fixtures ----------------------------------------------------------------------------


def loras(seed, ranks=(3, 5, 2, 4), shape=(20, 16), dtype=torch.float64):
    """LoRA deltas with mixed ranks and rsLoRA scales alpha / sqrt(r)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in ranks:
        b = torch.randn(shape[0], r, generator=g, dtype=torch.float64)
        a = torch.randn(r, shape[1], generator=g, dtype=torch.float64)
        out.append(LowRank(b.to(dtype), a.to(dtype), 16.0 / r**0.5))
    return out


def zero_lora(shape=(20, 16), rank=0, dtype=torch.float64):
    return LowRank(
        torch.zeros(shape[0], rank, dtype=dtype), torch.ones(rank, shape[1], dtype=dtype)
    )


def dense64(deltas):
    return [d.to_dense(torch.float64) for d in deltas]


def rel(got, want):
    return float((got.double() - want).norm() / want.norm())


# ---- against the references --------------------------------------------------------------


@pytest.mark.parametrize("name", list(REFS))
@pytest.mark.parametrize("seed", [0, 1])
def test_lowrank_and_dense_match_float64_reference(name, seed):
    deltas = loras(seed)
    want = REFS[name](dense64(deltas))
    got = KERNELS[name](deltas).delta
    assert isinstance(got, LowRank) and got.dtype == torch.float64
    assert rel(got.to_dense(), want) < 1e-10
    got_dense = KERNELS[name]([Dense(x) for x in dense64(deltas)]).delta
    assert isinstance(got_dense, Dense) and rel(got_dense.tensor, want) < 1e-10


@pytest.mark.parametrize("name", list(REFS))
def test_float32_lora_with_zero_adapters_matches_reference(name):
    deltas = [*loras(2, dtype=torch.float32), zero_lora(dtype=torch.float32)]
    deltas.append(zero_lora(rank=3, dtype=torch.float32))  # B still at its zero init
    want = REFS[name](dense64(deltas))
    got = KERNELS[name](deltas).delta
    assert isinstance(got, LowRank) and got.dtype == torch.float32
    assert rel(got.to_dense(torch.float64), want) < 1e-5


@pytest.mark.parametrize("name", list(REFS))
def test_full_rank_dense_matches_reference(name):
    g = torch.Generator().manual_seed(3)
    mats = [torch.randn(9, 7, generator=g) * (t + 1) for t in range(3)]
    want = REFS[name]([m.double() for m in mats])
    got = KERNELS[name]([Dense(m) for m in mats]).delta.tensor
    assert got.dtype == torch.float32 and rel(got, want) < 1e-5


@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0])
def test_tsv_m_fraction_matches_reference_including_wide_polar(fraction):
    deltas = loras(4, ranks=(3, 2, 3), shape=(8, 6))  # fraction 1: K = 8 > n = 6
    merged = tsv_m(deltas, fraction=fraction)
    assert rel(merged.delta.to_dense(), ref_tsv_m(dense64(deltas), fraction)) < 1e-10
    cap = int(fraction * 6)
    assert merged.stats == {"kept_ranks": [min(cap, r) for r in (3, 2, 3)]}


@pytest.mark.parametrize("common_fraction", [0.0, 0.3, 0.8, 1.0])
def test_iso_cts_common_fraction_matches_reference(common_fraction):
    deltas = loras(5)
    got = iso_cts(deltas, common_fraction=common_fraction).delta.to_dense()
    assert rel(got, ref_iso_cts(dense64(deltas), common_fraction)) < 1e-10


def test_hand_worked_examples():
    # Orthogonal tasks: the polar factors change nothing, TSV-M (fraction 1) is their sum.
    d1 = torch.diag(torch.tensor([3.0, 0.0, 0.0]))
    d2 = torch.zeros(3, 3)
    d2[1, 2] = 2.0
    assert torch.allclose(tsv_m([Dense(d1), Dense(d2)], fraction=1.0).delta.tensor, d1 + d2)
    # Iso-C: sum = diag(3, 0, 0) + 2 e_2 e_3^T, singular values 3 and 2 -> both 2.5.
    want = torch.diag(torch.tensor([2.5, 0.0, 0.0]))
    want[1, 2] = 2.5
    assert torch.allclose(iso_c([Dense(d1), Dense(d2)]).delta.tensor, want)
    # Iso-CTS, T = 2, rho = 2, common_fraction 0.5: c = 1, d = round(1 / 2) = 0 (the
    # reference's banker's rounding), so c = rho - T d = 2: all common, Iso-C's result.
    half = iso_cts([Dense(d1), Dense(d2)], common_fraction=0.5)
    assert torch.allclose(half.delta.tensor, want) and half.stats["common_rank"] == 2
    # common_fraction 0: c = 0, d = 1: each task's own top direction, orthogonal, flat 2.5.
    none = iso_cts([Dense(d1), Dense(d2)], common_fraction=0.0)
    assert torch.allclose(none.delta.tensor, want)
    assert none.stats == {"common_rank": 0, "task_ranks": [1, 1]}


# ---- properties --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(REFS))
def test_task_order_is_irrelevant(name):
    deltas = [*loras(6), zero_lora()]
    fwd = KERNELS[name](deltas).delta.to_dense()
    rev = KERNELS[name](deltas[::-1]).delta.to_dense()
    assert rel(rev, fwd) < 1e-10


@pytest.mark.parametrize("name", list(REFS))
def test_scaling_is_linear(name):
    deltas = loras(7)
    one = KERNELS[name](deltas).delta.to_dense()
    for c in (-0.5, 0.0, 2.0):
        assert torch.allclose(KERNELS[name](deltas, scaling=c).delta.to_dense(), c * one)


def test_one_task_in():
    (task,) = loras(8, ranks=(4,))
    x = task.to_dense()
    # TSV-M: fraction null = 1/T = 1 keeps every direction, the polar factors are the identity.
    assert rel(tsv_m([task]).delta.to_dense(), x) < 1e-12
    # Iso-C: the task's flat spectrum (its mean singular value on its own support).
    u, s, vh = svd_support(x)
    flat = iso_c([task]).delta.to_dense()
    assert rel(flat, s.mean() * u @ vh) < 1e-12
    assert torch.allclose(torch.linalg.svdvals(flat)[:4], s.mean().expand(4))
    # Iso-CTS with one task: the common and residual parts span the task's support -> Iso-C.
    assert rel(iso_cts([task]).delta.to_dense(), flat) < 1e-12


def test_duplicated_task_gives_that_task_and_iso_cts_full_common_is_iso_c():
    (task,) = loras(9, ranks=(3,))
    # Linearly dependent singular vectors: the support polar factor averages them.
    assert rel(tsv_m([task, task], fraction=1.0).delta.to_dense(), task.to_dense()) < 1e-12
    deltas = loras(10)
    full_common = iso_cts(deltas, common_fraction=1.0)
    assert rel(full_common.delta.to_dense(), iso_c(deltas).delta.to_dense()) < 1e-12
    assert full_common.stats == {"common_rank": 14, "task_ranks": [0, 0, 0, 0]}


def test_zero_adapters_contribute_nothing():
    deltas = loras(11)
    with_zero = [*deltas, zero_lora(), zero_lora(rank=2)]
    a, b = tsv_m(deltas, fraction=0.2), tsv_m(with_zero, fraction=0.2)
    assert rel(b.delta.to_dense(), a.delta.to_dense()) < 1e-12
    assert b.stats["kept_ranks"] == [3, 3, 2, 3, 0, 0]
    assert rel(iso_c(with_zero).delta.to_dense(), iso_c(deltas).delta.to_dense()) < 1e-12


@pytest.mark.parametrize("name", list(REFS))
@pytest.mark.parametrize("lowrank", [True, False])
def test_all_zero_gives_zero_without_nan(name, lowrank):
    deltas = [zero_lora(dtype=torch.float32), zero_lora(rank=2, dtype=torch.float32)]
    if not lowrank:
        deltas = [Dense(torch.zeros(20, 16)) for _ in deltas]
    got = KERNELS[name](deltas).delta
    assert isinstance(got, LowRank) == lowrank
    assert torch.equal(got.to_dense(), torch.zeros(20, 16))
    if lowrank:
        assert got.rank == 0


def test_cancelling_tasks_give_zero():
    (task,) = loras(12, ranks=(3,))
    neg = LowRank(task.b, task.a, -task.scale)
    for kernel in (iso_c, iso_cts):
        got = kernel([task, neg]).delta
        assert got.rank == 0 and torch.equal(got.to_dense(), torch.zeros(20, 16))


@pytest.mark.parametrize("name", list(REFS))
def test_vectors_are_averaged_and_dtype_kept(name):
    vecs = [Dense(torch.tensor([1.0, 2.0], dtype=torch.bfloat16)), Dense(torch.tensor([3.0, 0.0]))]
    got = KERNELS[name](vecs).delta
    assert got.dtype == torch.bfloat16 and torch.equal(got.tensor.float(), torch.tensor([2.0, 1.0]))
    half = [LowRank(d.b.half(), d.a.half(), d.scale) for d in loras(13, ranks=(2, 3))]
    assert KERNELS[name](half).delta.dtype == torch.float16


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("tsv_m", {"fraction": 0}, "tsv_m: fraction must be in (0, 1] or null, got 0"),
        ("tsv_m", {"fraction": 1.5}, "tsv_m: fraction must be in (0, 1] or null, got 1.5"),
        ("tsv_m", {"fraction": "half"}, "tsv_m: fraction must be a number or null, got 'half'"),
        ("iso_c", {"scaling": 1e4}, "iso_c: scaling must be in [-1000, 1000], got 10000.0"),
        (
            "iso_cts",
            {"common_fraction": -0.1},
            "iso_cts: common_fraction must be in [0, 1], got -0.1",
        ),
    ],
)
def test_bad_parameters_are_refused_at_resolve(name, params, message):
    with pytest.raises(ConfigError) as err:
        METHODS.get(name).resolve(params)
    assert message in str(err.value)


def test_defaults_are_the_contract():
    assert METHODS.get("tsv_m").resolve({}) == {"scaling": 1.0, "fraction": None}
    assert METHODS.get("iso_c").resolve({}) == {"scaling": 1.0}
    assert METHODS.get("iso_cts").resolve({}) == {"scaling": 1.0, "common_fraction": 0.8}
    for name in REFS:
        method = METHODS.get(name)
        assert method.accepts == {"dense", "lowrank"} and method.lowrank_output
