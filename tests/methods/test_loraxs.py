"""LoRA-XS spec properties: r² trainable, orthonormal frozen bases, A rows carry the singular values,
deterministic signs, near-identity init, exact merge."""

from __future__ import annotations

import torch
from conftest import make_tiny_net
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.methods.loraxs import LoRAXS, LoRAXSConfig, svd_signed


def _adapter(r: int = 4, **kw) -> tuple[LoRAXS, BaseView, nn.Linear]:
    torch.manual_seed(0)
    lin = nn.Linear(16, 12)
    base = BaseView(lin)
    return LoRAXS(base, LoRAXSConfig(r=r, **kw)), base, lin


def test_trainable_is_r_squared_and_bases_frozen() -> None:
    model = pk.adapt(make_tiny_net(), LoRAXSConfig(r=3, targets=["fc1", "fc2"]))
    assert model.trainable_parameters().trainable == 2 * 9
    for a in model.adapter_modules("default").values():
        assert [n for n, _ in a.named_parameters()] == ["R"]
        assert {n for n, _ in a.named_buffers()} == {"A", "B"}
        assert set(a.state_dict()) == {"A", "B", "R"}


def test_bases_orthonormal_and_singular_values_in_A() -> None:
    a, _, lin = _adapter(r=4)
    s = torch.linalg.svdvals(lin.weight.double())
    torch.testing.assert_close(a.B.T @ a.B, torch.eye(4), atol=1e-5, rtol=0)
    gram = a.A @ a.A.T
    torch.testing.assert_close(gram, torch.diag(s[:4] ** 2).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.A.norm(dim=1), s[:4].float(), atol=1e-5, rtol=0)


def test_sign_convention_deterministic() -> None:
    a, _, _ = _adapter(r=4)
    idx = a.B.abs().argmax(dim=0)
    assert (a.B[idx, torch.arange(4)] > 0).all()
    b, _, _ = _adapter(r=4)
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
    # flipping the sign of W's SVD pairs does not change the factors: the convention fixes them
    w = torch.randn(7, 5, dtype=torch.float64)
    u, s, vh = svd_signed(w)
    torch.testing.assert_close(u @ torch.diag(s) @ vh, w)
    u2, _, vh2 = svd_signed(-w)  # -W = U S (-Vh): the convention keeps U and flips Vh
    torch.testing.assert_close(u2, u)
    torch.testing.assert_close(vh2, -vh)


def test_near_identity_at_init() -> None:
    a, base, lin = _adapter(r=4)
    assert a.R.std() < 1e-4 and a.R.abs().max() > 0
    x = torch.randn(3, 16)
    out = a(x, lin(x), base)
    diff = (out - lin(x)).abs().max()
    assert 0 < diff < 1e-3


def test_merge_exact_and_lowrank() -> None:
    a, base, lin = _adapter(r=4, alpha=8.0)
    with torch.no_grad():
        a.R.normal_()
    x = torch.randn(5, 16)
    want = a(x, lin(x), base)
    merged = nn.functional.linear(x, lin.weight + a.delta_weight(base), lin.bias)
    torch.testing.assert_close(merged, want, atol=1e-5, rtol=0)
    lr = a.lowrank(base)
    torch.testing.assert_close(lr.scale * lr.up @ lr.down, a.delta_weight(base), atol=1e-6, rtol=0)
    assert a.scale == 2.0


def test_grads_only_on_R() -> None:
    model = pk.adapt(make_tiny_net(), LoRAXSConfig(r=2, targets=["fc1"]))
    ids = torch.randint(0, 40, (2, 5))
    model(input_ids=ids).sum().backward()
    adapter = model.adapter_modules("default")["fc1"]
    assert adapter.R.grad is not None and adapter.R.grad.abs().sum() > 0
    assert adapter.A.grad is None and adapter.B.grad is None


def test_bad_rank() -> None:
    import pytest

    with pytest.raises(pk.errors.InvalidConfigError):
        LoRAXSConfig(r=0)
    with pytest.raises(pk.errors.InvalidConfigError):
        _adapter(r=13)
