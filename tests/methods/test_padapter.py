"""p-adapter spec properties: with p = 2 and μ = 0 the re-weighting is G ≡ 1 and F' = A F (rows of A sum to 1);
shapes; gradients reach p and μ_raw; N(0, 0.02) init; parameter count."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.errors import UnsupportedLayerError
from peftkit.methods.padapter import PAdapter, PAdapterConfig, p_laplacian_propagate


def test_p2_mu0_reduces_to_attention_propagation() -> None:
    g = torch.Generator().manual_seed(0)
    adjacency = torch.softmax(torch.randn(2, 3, 5, 5, generator=g), dim=-1)
    features = torch.randn(2, 3, 5, 4, generator=g)
    out = p_laplacian_propagate(adjacency, features, torch.tensor(2.0), torch.tensor(0.0))
    torch.testing.assert_close(out, adjacency @ features, rtol=1e-5, atol=1e-6)


def test_mu_pulls_towards_own_features() -> None:
    """α + β-weighted mix: with a large μ the output tends to F itself (β → 1, α Ã → 0)."""
    g = torch.Generator().manual_seed(1)
    adjacency = torch.softmax(torch.randn(1, 1, 4, 4, generator=g), dim=-1)
    features = torch.randn(1, 1, 4, 3, generator=g)
    out = p_laplacian_propagate(adjacency, features, torch.tensor(2.0), torch.tensor(1e6))
    torch.testing.assert_close(out, features, rtol=1e-4, atol=1e-4)


def test_shapes_init_and_gradients() -> None:
    lin = nn.Linear(32, 32)
    adapter = PAdapter(BaseView(lin), PAdapterConfig(reduction=4, heads=2))
    assert adapter.W_i.weight.shape == (8, 32) and adapter.W_o.weight.shape == (32, 8)
    assert 0.01 < adapter.W_i.weight.std() < 0.03 and torch.all(adapter.W_g.bias == 0)
    assert adapter.p.item() == pytest.approx(1.25) and adapter.mu_raw.item() == 0.0
    x = torch.randn(3, 7, 32)
    out = adapter(x, lin(x), BaseView(lin))
    assert out.shape == (3, 7, 32)
    out.square().sum().backward()
    assert adapter.p.grad is not None and adapter.p.grad.abs() > 0
    assert adapter.mu_raw.grad is not None and adapter.mu_raw.grad.abs() > 0


def test_on_bert_attention_outputs_count() -> None:
    model = pk.adapt(tiny_bert(), PAdapterConfig(reduction=4, heads=2))
    assert sorted(model.layer_paths["default"]) == [f"encoder.layer.{i}.attention.output.dense" for i in range(2)]
    d, m = 32, 8
    assert model.trainable_parameters().trainable == 2 * (3 * d * m + 2 * m + d + 2)
    fixed_p = pk.adapt(tiny_bert(), PAdapterConfig(reduction=4, heads=2, learnable_p=False))
    assert fixed_p.trainable_parameters().trainable == 2 * (3 * d * m + 2 * m + d + 1)


def test_heads_must_divide_width() -> None:
    with pytest.raises(UnsupportedLayerError, match="heads=3"):
        PAdapter(BaseView(nn.Linear(32, 32)), PAdapterConfig(reduction=4, heads=3))
