"""``peftkit.lowrank``: exact and truncated low-rank forms (float64 SVD)."""

from __future__ import annotations

import pytest
import torch

from peftkit.lowrank import dense_svd, factored_svd, from_factors


def test_lowrank_helpers_are_exact() -> None:
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(20, 7, generator=g), torch.randn(7, 30, generator=g)
    svd = factored_svd(up, down)
    ref = dense_svd(up.double() @ down.double())
    torch.testing.assert_close(svd.s, ref.s[:7], rtol=1e-10, atol=1e-10)
    f = from_factors(up, down, rank=4)
    assert f.down.shape == (4, 30) and f.norm == pytest.approx(float((up @ down).norm()), rel=1e-6)
    assert f.error == pytest.approx(float((ref.s[4:].square().sum() / ref.s.square().sum()).sqrt()), rel=1e-6)
    assert from_factors(up, down).error == 0.0
    tall = from_factors(torch.randn(3, 5, generator=g), torch.randn(5, 4, generator=g))  # inner 5 > min(3, 4)
    assert tall.down.shape[0] == 3 and tall.error < 1e-12
