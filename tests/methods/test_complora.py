"""Comp-LoRA spec properties: the principal subspace is untouched (U_kᵀ ΔW = 0, ΔW V_k = 0), count 2rp,
identity at init, exact merge, k_top rules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.methods.complora import CompLoRA, CompLoRAConfig


def _adapter(**kw) -> tuple[CompLoRA, BaseView, nn.Linear]:
    torch.manual_seed(0)
    lin = nn.Linear(12, 10)
    base = BaseView(lin)
    a = CompLoRA(base, CompLoRAConfig(r=2, alpha=2.0, dropout=0.0, **kw))
    with torch.no_grad():
        a.B.normal_()
    return a, base, lin


def test_principal_subspace_untouched() -> None:
    a, base, lin = _adapter()
    u, _, vh = torch.linalg.svd(lin.weight.detach().double(), full_matrices=False)
    k = a.k_top
    assert k == 5
    dw = a.delta_weight(base).double()
    assert dw.abs().max() > 1e-3
    torch.testing.assert_close(u[:, :k].T @ dw, torch.zeros(k, 12, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(dw @ vh[:k].T, torch.zeros(10, k, dtype=torch.float64), atol=1e-6, rtol=0)


def test_forward_merge_identity_and_count() -> None:
    a, base, lin = _adapter()
    x = torch.randn(3, 12)
    want = lin(x) + 1.0 * x @ (a.V_c @ a.A.T @ a.B.T @ a.U_c.T)
    torch.testing.assert_close(a(x, lin(x), base), want, atol=1e-6, rtol=0)
    merged = nn.functional.linear(x, lin.weight + a.delta_weight(base), lin.bias)
    torch.testing.assert_close(merged, want, atol=1e-5, rtol=0)
    assert CompLoRA.expected_trainable(base, a.config) == 2 * 2 * 5 == sum(p.numel() for p in a.parameters())
    with torch.no_grad():
        a.reset_parameters(base)
    assert torch.equal(a(x, lin(x), base), lin(x))
    assert set(a.state_dict()) == {"A", "B"}  # bases are rebuilt from W, not saved


def test_k_top_and_energy() -> None:
    a, base, lin = _adapter(k_top=7)
    assert a.k_top == 7 and a.A.shape == (2, 3)
    b, base, lin = _adapter(complement_energy=0.9)
    s2 = torch.linalg.svdvals(lin.weight.detach().double()) ** 2
    frac = s2.cumsum(0) / s2.sum()
    assert frac[b.k_top - 1] >= 0.9 and (b.k_top == 1 or frac[b.k_top - 2] < 0.9)
    assert CompLoRA.expected_trainable(base, b.config) == 2 * 2 * (10 - b.k_top)
    with pytest.raises(pk.errors.UnsupportedLayerError):
        _adapter(k_top=9)
    with pytest.raises(pk.errors.InvalidConfigError):
        CompLoRAConfig(k_top=2, complement_energy=0.5)
