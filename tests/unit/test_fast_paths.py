"""Fast paths must give the same answers as the slow, obviously-correct ones."""

from __future__ import annotations

import pytest
import torch

from starmerge.io.adapter import all_finite
from starmerge.methods.star import star
from starmerge.tensors.delta import LowRank
from starmerge.tensors.spectral import orthonormal_factor, star_factored


@pytest.mark.parametrize("case", ["random", "rank_deficient", "ill_conditioned", "zero"])
def test_orthonormal_factor_reconstructs_and_is_orthonormal(case):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 5, generator=g, dtype=torch.float64)
    if case == "rank_deficient":
        x[1, :, 4] = x[1, :, 0]
    elif case == "ill_conditioned":
        x[2] = x[2] @ torch.diag(torch.tensor([1.0, 1.0, 1.0, 1e-6, 1e-9], dtype=torch.float64))
    elif case == "zero":
        x[0] = 0
    q, s = orthonormal_factor(x)
    torch.testing.assert_close(q @ s, x, rtol=0, atol=1e-12)
    if case == "random":
        eye = torch.eye(5, dtype=torch.float64).expand(3, 5, 5)
        torch.testing.assert_close(q.mT @ q, eye, rtol=0, atol=1e-12)


def test_star_exact_when_factors_have_opposite_tiny_directions():
    # B and A each have a direction 1e-8 below their top one, paired so that the product's two
    # singular values are equal: a Gram-only route would drop both and return zero.
    b = torch.diag(torch.tensor([1.0, 1e-8], dtype=torch.float64))[None]
    a = torch.diag(torch.tensor([1e-8, 1.0], dtype=torch.float64))[None]
    b_hat, a_hat, k = star_factored(b, a, torch.ones(1), 100.0)
    merged = LowRank(b_hat[0, :, : int(k[0])], a_hat[0, : int(k[0])])
    torch.testing.assert_close(merged.to_dense(torch.float64), b[0] @ a[0], rtol=1e-10, atol=0)
    # The merge's own path (blocked Grams, Householder QR only for the ill-conditioned group)
    # gives the same matrix, beside a well-conditioned task of another rank.
    well = LowRank(torch.randn(2, 1, dtype=torch.float64), torch.randn(1, 2, dtype=torch.float64))
    out = star([LowRank(b[0], a[0]), well], eta=100.0)
    want = (b[0] @ a[0] + well.to_dense(torch.float64)) / 2
    torch.testing.assert_close(out.delta.to_dense(torch.float64), want, rtol=1e-10, atol=0)


def test_all_finite_matches_isfinite():
    x = torch.randn(100, 8)
    assert all_finite(x)
    big = torch.full((4,), 3e38)  # finite entries whose sum overflows float32, not float64
    assert all_finite(big)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[7, 3] = bad
        assert not all_finite(y)
    assert all_finite(torch.arange(5))
