"""SoKA spec properties: KPSVD rearrangement / unvec round trip reconstructs W exactly with all terms,
identity at init, count, selected k within [1, k_max] (energy and elbow rules), efficient forward equals the
dense Kronecker sum, merged == unmerged."""

from __future__ import annotations

import pytest
import torch
from _structured_parity import seeded_linear
from conftest import make_tiny_net
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.errors import InvalidConfigError
from peftkit.methods.soka import SoKA, SoKAConfig, kpsvd, kron_dims, rearrange, select_rank


def _base() -> tuple[BaseView, nn.Linear]:
    return seeded_linear()


def test_kpsvd_round_trip_full_rank() -> None:
    w = torch.randn(20, 24, dtype=torch.float64)
    m1, m2, n1, n2 = kron_dims(20, 24)
    assert (m1, m2, n1, n2) == (4, 5, 4, 6)
    r = rearrange(w, m1, m2, n1, n2)
    assert r[1 * n1 + 2, 3 * n2 + 1] == w[1 * m2 + 3, 2 * n2 + 1]
    sigma, a, b = kpsvd(w)
    rebuilt = sum(s * torch.kron(at, bt) for s, at, bt in zip(sigma, a, b))
    torch.testing.assert_close(rebuilt, w)


def test_rank_selection_rules() -> None:
    assert select_rank(torch.tensor([10.0, 1.0, 0.5, 0.1]), 0.9, 8) == 1
    flat = torch.ones(16)
    assert select_rank(flat, 0.9, 8) == 1  # flat spectrum: every point is on the chord (elbow at 1)
    slow = torch.linspace(1.0, 0.9, 16)
    assert select_rank(slow, 0.99, 3) <= 3
    base, _ = _base()
    for cfg in (SoKAConfig(), SoKAConfig(k_max=2), SoKAConfig(tau=0.2)):
        k = SoKA(base, cfg).A.shape[0]
        assert 1 <= k <= cfg.k_max
    with pytest.raises(InvalidConfigError, match="tau"):
        SoKAConfig(tau=0.0)


def test_count_forward_equals_dense_and_identity() -> None:
    base, lin = _base()
    a = SoKA(base, SoKAConfig(k=3))
    assert a.A.shape == (3, 4, 4) and a.B.shape == (3, 5, 6)
    assert sum(p.numel() for p in a.parameters()) == 3 * (16 + 30) == SoKA.expected_trainable(base, a.config)
    x = torch.randn(2, 3, 24)
    with torch.no_grad():
        torch.testing.assert_close(a(x, lin(x), base), lin(x), atol=1e-6, rtol=0)
        a.A.add_(0.1 * torch.randn_like(a.A))
        a.B.add_(0.1 * torch.randn_like(a.B))
        dense = lin(x) + x @ a.delta_weight(base).T
        torch.testing.assert_close(a(x, lin(x), base), dense, atol=1e-5, rtol=0)
        want = sum(torch.kron(at, bt) for at, bt in zip(a.A, a.B)) - sum(
            torch.kron(at, bt) for at, bt in zip(a.A0, a.B0)
        )
        torch.testing.assert_close(a.delta_weight(base), want, atol=1e-6, rtol=0)


def test_init_is_principal_kronecker_terms() -> None:
    base, lin = _base()
    a = SoKA(base, SoKAConfig(k=100))  # all terms: the factors reproduce W, residual is zero
    full = sum(torch.kron(at, bt) for at, bt in zip(a.A.detach(), a.B.detach()))
    torch.testing.assert_close(full, lin.weight.detach(), atol=1e-5, rtol=0)


def test_merge_matches_unmerged() -> None:
    model = pk.adapt(make_tiny_net(), SoKAConfig(k=2, targets=["fc1", "fc2"]), name="a")
    x = torch.randint(0, 40, (3, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(x), make_tiny_net()(x), atol=1e-6, rtol=0)
        for a in model.adapter_modules("a").values():
            a.A.add_(0.1 * torch.randn_like(a.A))
        want = model(x)
        torch.testing.assert_close(model.merge(unload=True)(x), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(1, 24), (2, 3, 24)])  # factored form (1 token) / ΔW built (6 tokens)
def test_both_forward_forms_give_dense_values_and_gradients(shape: tuple[int, ...]) -> None:
    base, lin = _base()
    a = SoKA(base, SoKAConfig(k=3))
    with torch.no_grad():
        a.A.add_(0.1 * torch.randn_like(a.A))
        a.B.add_(0.1 * torch.randn_like(a.B))
    x = torch.randn(shape)
    got = a(x, lin(x), base)
    grads = torch.autograd.grad(got.square().sum(), [a.A, a.B])
    want = lin(x) + x @ a.delta_weight(base).T
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for g, w in zip(grads, torch.autograd.grad(want.square().sum(), [a.A, a.B])):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5)
