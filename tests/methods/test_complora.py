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
    assert set(a.state_dict()) == {"A", "B", "U_c", "V_c"}  # the bases are saved, never recomputed on load


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


def _orthogonal_net(eps: float = 0.0) -> nn.Module:
    """One Linear(16, 16) whose weight is orthogonal (all singular values 1: the SVD basis is arbitrary), plus
    ``eps`` times fixed noise."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16))
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(3)))
    with torch.no_grad():
        net[0].weight.copy_(q + eps * torch.randn(16, 16, generator=torch.Generator().manual_seed(5)))
    return net


@pytest.mark.parametrize("extra", [{}, {"complement_energy": 0.6}], ids=["k_top", "energy"])
def test_bases_are_saved_not_recomputed(tmp_path, monkeypatch, extra) -> None:
    """Issue 12 item 14: an orthogonal weight has one repeated singular value, so its SVD basis is not determined
    by the weight. Recomputing it on load (from a base that differs by 1e-7) gave another complementary
    subspace and moved the output by O(1); the saved bases reload exactly and loading computes no SVD."""
    config = CompLoRAConfig(r=2, alpha=2.0, dropout=0.0, targets=["0"], seed=0, **extra)
    model = pk.adapt(_orthogonal_net(), config).eval()
    with torch.no_grad():
        for a in model.adapter_modules("default").values():
            a.B.normal_()
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
    model.save(tmp_path / "c")
    loaded = pk.load(_orthogonal_net(eps=1e-7), tmp_path / "c").eval()
    saved, got_module = model.adapter_modules("default")["0"], loaded.adapter_modules("default")["0"]
    with torch.no_grad():
        got = loaded(x)
    # the only change left is the base's own 1e-7 perturbation
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * float(want.abs().max()))
    assert got_module.k_top == saved.k_top
    assert torch.equal(got_module.U_c, saved.U_c) and torch.equal(got_module.V_c, saved.V_c)

    def no_svd(weight):
        raise AssertionError("loading recomputed the SVD")

    monkeypatch.setattr("peftkit.methods.complora.svd_signed", no_svd)
    pk.load(_orthogonal_net(), tmp_path / "c")
