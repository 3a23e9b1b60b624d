"""ConvLoRA / DSCLoRA: identity at init, exact merge on a small conv net, ΔW rank ≤ r·k, the parameter count,
and the (inferred) affinity distillation loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.core.errors import InvalidConfigError, UnsupportedLayerError
from peftkit.methods.convlora import ConvLoRA, ConvLoRAConfig, affinity_kd


def conv_net(seed: int = 0) -> nn.Sequential:
    """A SPAN-like stack: 3x3 convs, a strided conv, a pixel-shuffle conv."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.SiLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.SiLU(),
        nn.Conv2d(8, 12, 3, stride=2, padding=1),
        nn.PixelShuffle(2),
    ).eval()


def test_count_identity_and_exact_merge() -> None:
    base = conv_net()
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        want = base(x)
    model = pk.adapt(base, ConvLoRAConfig(r=2, alpha=4.0, targets=["0", "2", "4"])).eval()
    assert model.trainable_parameters().trainable == sum(2 * 9 * (i + o) for i, o in [(3, 8), (8, 8), (8, 12)])
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=0, rtol=0)
        for a in model.adapter_modules("default").values():
            a.B.normal_(std=0.2)
        adapted = model(x)
    assert not torch.allclose(adapted, want)
    plain = model.merge()
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in conv_net().parameters())
    with torch.no_grad():
        torch.testing.assert_close(plain(x), adapted, atol=1e-5, rtol=0)


def test_delta_is_the_reshaped_product_with_rank_at_most_r_k() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, padding=1)
    base = BaseView(conv)
    a = ConvLoRA(base, ConvLoRAConfig(r=1, alpha=3.0)).double()
    with torch.no_grad():
        a.B.normal_()
    assert a.A.shape == (3, 18) and a.B.shape == (30, 3)
    delta = a.delta_weight(base)
    torch.testing.assert_close(delta, 3.0 * (a.B @ a.A).view(10, 6, 3, 3))
    assert torch.linalg.matrix_rank(delta.reshape(30, 18)).item() <= 3
    x = torch.randn(2, 6, 7, 7)
    got = a(x.double(), conv.double()(x.double()), BaseView(conv))
    want = torch.nn.functional.conv2d(x.double(), conv.weight + delta, conv.bias, padding=1)
    torch.testing.assert_close(got, want)


def test_supports_and_errors() -> None:
    assert ConvLoRA.supports(nn.Conv2d(4, 4, 3))
    assert not ConvLoRA.supports(nn.Conv2d(4, 4, 3, groups=2))
    assert not ConvLoRA.supports(nn.Conv2d(4, 4, (1, 3)))
    assert not ConvLoRA.supports(nn.Linear(4, 4))
    with pytest.raises(InvalidConfigError, match="r=5"):
        ConvLoRA(BaseView(nn.Conv2d(4, 8, 3)), ConvLoRAConfig(r=5))
    with pytest.raises(InvalidConfigError, match="dropout"):
        ConvLoRAConfig(dropout=0.1)
    with pytest.raises(UnsupportedLayerError):
        pk.adapt(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), ConvLoRAConfig(targets=["0"]))


def test_affinity_kd() -> None:
    torch.manual_seed(0)
    t = torch.randn(2, 8, 4, 4)
    assert affinity_kd(t * 3.0, t).item() == pytest.approx(0.0, abs=1e-6)  # per-column normalised: scale-free
    s = torch.randn(2, 5, 4, 4, requires_grad=True)  # channel counts may differ (HW×HW affinities)
    loss = affinity_kd(s, t, p=2, weight=0.5)
    loss.backward()
    assert loss.item() > 0 and s.grad is not None and torch.isfinite(s.grad).all()
    with pytest.raises(ValueError, match="differ"):
        affinity_kd(torch.randn(2, 8, 4, 4), torch.randn(2, 8, 2, 2))
