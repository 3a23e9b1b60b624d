"""SALT spec properties (shared/methods/init.md): 2k + 2(q−k)r trainable, Y = 0 / a = 1 / b = 0 reproduces W,
grads reach a, b, X, Y only, W' − W in the span of U, the official forward (ReLU on the full Σ' matrix),
Conv2d on the flattened weight, the regulariser, untouched base on save/load, a toy regression that trains."""

from __future__ import annotations

import pytest
import torch
from _svd_family import check_roundtrip_on_fresh_base, toy_regression_losses
from conftest import make_tiny_net
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.methods.salt import SALT, SALTConfig


def _adapter(out: int = 12, inp: int = 8, **kw) -> tuple[SALT, BaseView, nn.Linear]:
    torch.manual_seed(0)
    lin = nn.Linear(inp, out)
    base = BaseView(lin)
    return SALT(base, SALTConfig(**kw)), base, lin


def _official_weight(a: SALT) -> torch.Tensor:
    """The official ``SALTLinear`` weight: ``U ReLU(Σ') Vᵀ`` with ``Σ'`` built as a dense ``q × q`` matrix."""
    k = a.k
    sigma = torch.diag(a.S).clone()
    sigma[:k, :k] = torch.diag(a.a * a.S[:k] + a.b)
    sigma[k:, k:] += a.X @ a.Y
    return a.U @ torch.relu(sigma) @ a.Vh


def test_trainable_count_formula() -> None:
    model = pk.adapt(make_tiny_net(), SALTConfig(r=3, targets=["fc1", "fc2", "conv"]))
    # fc1 [32, 16], fc2 [16, 32]: q = 16, k = 8; conv [6, 4·3·3]: q = 6, k = 3
    want = 2 * (2 * 8 + 2 * 8 * 3) + (2 * 3 + 2 * 3 * 3)
    assert model.trainable_parameters().trainable == want
    adapter = model.adapter_modules("default")["fc1"]
    assert {n for n, _ in adapter.named_parameters()} == {"a", "b", "X", "Y"}
    assert set(adapter.state_dict()) == {"U", "S", "Vh", "a", "b", "X", "Y"}
    explicit = pk.adapt(make_tiny_net(), SALTConfig(k=5, r=2, targets=["fc1"]))
    assert explicit.trainable_parameters().trainable == 2 * 5 + 2 * (16 - 5) * 2


def test_k_equal_q_leaves_no_xy_block() -> None:
    a, base, lin = _adapter(out=12, inp=8, k=8)
    assert a.X.shape == (0, 4) and a.Y.shape == (4, 0)
    assert SALT.expected_trainable(base, a.config) == 2 * 8
    with torch.no_grad():
        a.a.mul_(2.0)
    x = torch.randn(3, 8)
    want = nn.functional.linear(x, a.U @ torch.diag(2.0 * a.S) @ a.Vh, lin.bias)
    torch.testing.assert_close(a(x, lin(x), base), want, atol=1e-5, rtol=0)


def test_default_k_is_half_of_q_and_recorded_in_config() -> None:
    a, _, _ = _adapter(out=12, inp=7)
    assert a.config.k is None and a.k == 7 // 2
    assert a.a.shape == (3,) and a.X.shape == (4, 4) and a.Y.shape == (4, 4)


def test_init_is_official_and_not_identity() -> None:
    a, base, lin = _adapter()
    assert torch.equal(a.a.detach(), torch.ones(a.k)) and torch.equal(a.b.detach(), torch.zeros(a.k))
    assert 0.003 < a.X.std() < 0.03 and 0.003 < a.Y.std() < 0.03  # 0.01·N(0, 1)
    x = torch.randn(5, 8)
    assert not torch.equal(a(x, lin(x), base), lin(x))


def test_y_zero_reproduces_w() -> None:
    """With Y = 0 (or X = 0), a = 1, b = 0 the layer is W: ReLU of the non-negative S is the identity."""
    a, base, lin = _adapter(zero_init_Y=True)
    assert torch.equal(a.Y.detach(), torch.zeros_like(a.Y)) and a.X.abs().max() > 0
    x = torch.randn(5, 8)
    assert torch.equal(a(x, lin(x), base), lin(x))
    torch.testing.assert_close(_official_weight(a), lin.weight, atol=1e-5, rtol=0)
    b, _, lin_b = _adapter()
    with torch.no_grad():
        b.X.zero_()
    torch.testing.assert_close(_official_weight(b), lin_b.weight, atol=1e-5, rtol=0)
    assert torch.equal(b.delta_weight(BaseView(lin_b)), torch.zeros(12, 8))


def test_matches_official_forward_with_relu_on_full_matrix() -> None:
    a, base, lin = _adapter(k=3, r=2)
    with torch.no_grad():  # large enough that some singular values go negative and XY has negative entries
        a.a.copy_(torch.tensor([1.5, -0.5, 0.8]))
        a.b.copy_(torch.tensor([0.1, 0.0, -0.05]))
        a.X.normal_(std=0.5)
        a.Y.normal_(std=0.5)
    sigma = torch.diag(a.S[a.k :]) + a.X @ a.Y
    assert (sigma < 0).any(), "the test must exercise the ReLU on off-diagonal entries"
    x = torch.randn(5, 8)
    official = nn.functional.linear(x, _official_weight(a), lin.bias)
    torch.testing.assert_close(a(x, lin(x), base), official, atol=1e-5, rtol=0)
    merged = nn.functional.linear(x, lin.weight + a.delta_weight(base), lin.bias)
    torch.testing.assert_close(merged, official, atol=1e-5, rtol=0)


def test_factored_and_dense_linear_paths_agree() -> None:
    """The linear forward picks the cheaper of ``x Vᵀ Mᵀ Uᵀ`` and ``x ΔWᵀ`` by token count; both are the same map."""
    a, base, lin = _adapter(k=3, r=2)
    with torch.no_grad():
        a.a.normal_()
        a.X.normal_(std=0.5)
    few, many = torch.randn(2, 8), torch.randn(600, 8)
    assert a.factored_is_cheaper(2) and not a.factored_is_cheaper(600)
    for x in (few, many):
        dense = nn.functional.linear(x, lin.weight + a.delta_weight(base), lin.bias)
        torch.testing.assert_close(a(x, lin(x), base), dense, atol=1e-5, rtol=0)
    x = torch.randn(3, 8)
    a(x, lin(x), base).sum().backward()
    factored_grads = [p.grad.clone() for p in (a.a, a.b, a.X, a.Y)]
    a.zero_grad()
    (x @ (lin.weight + a.delta_weight(base)).T).sum().backward()
    for got, want in zip(factored_grads, (a.a.grad, a.b.grad, a.X.grad, a.Y.grad)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_changed_weight_stays_in_span_of_u() -> None:
    """W' − W = U (ReLU(Σ') − diag S) Vᵀ: with out > in the columns of U do not span R^out."""
    a, base, _ = _adapter(out=12, inp=8)
    with torch.no_grad():
        a.a.normal_()
        a.b.normal_()
        a.Y.normal_()
    delta = a.delta_weight(base)
    assert delta.norm() > 1e-2
    assert ((torch.eye(12) - a.U @ a.U.T) @ delta).abs().max() < 1e-5


def test_grads_reach_a_b_x_y_only() -> None:
    model = pk.adapt(make_tiny_net(), SALTConfig(r=2, targets=["fc1", "conv"]))
    model(input_ids=torch.randint(0, 40, (2, 5))).sum().backward()
    for adapter in model.adapter_modules("default").values():
        for name in ("a", "b", "X", "Y"):
            grad = getattr(adapter, name).grad
            assert grad is not None and grad.abs().sum() > 0, name
        assert not any(t.requires_grad for t in (adapter.U, adapter.S, adapter.Vh))
    assert all(p.grad is None for p in model.get_base_model().parameters() if not p.requires_grad)


def test_conv2d_uses_flattened_weight() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, kernel_size=3, padding=1)
    base = BaseView(conv)
    a = SALT(base, SALTConfig(k=2, r=2))
    flat = conv.weight.reshape(6, -1)
    torch.testing.assert_close(a.U @ torch.diag(a.S) @ a.Vh, flat, atol=1e-5, rtol=0)
    x = torch.randn(2, 4, 5, 5)
    official = nn.functional.conv2d(x, _official_weight(a).reshape(conv.weight.shape), conv.bias, padding=1)
    torch.testing.assert_close(a(x, conv(x), base), official, atol=1e-5, rtol=0)


def test_regularizer_is_official_reg() -> None:
    a, _, _ = _adapter(k=3, r=2)
    assert a.regularizer().item() == pytest.approx(torch.linalg.matrix_norm(a.X @ a.Y).item(), abs=1e-7)
    with torch.no_grad():
        a.a.copy_(torch.tensor([2.0, 1.0, 1.0]))
        a.b.copy_(torch.tensor([0.0, 0.5, 0.0]))
    top = torch.diag(a.a * a.S[:3] + a.b) - torch.diag(a.S[:3])
    want = torch.linalg.matrix_norm(top) + torch.linalg.matrix_norm(a.X @ a.Y)
    torch.testing.assert_close(a.regularizer(), want, atol=1e-6, rtol=0)
    a.regularizer().backward()
    assert a.a.grad is not None and a.X.grad is not None


def test_toy_regression_trains() -> None:
    losses = toy_regression_losses(SALTConfig(r=2))
    assert losses[-1] < 0.2 * losses[0], losses


def test_save_load_onto_fresh_base(tmp_path) -> None:
    check_roundtrip_on_fresh_base(SALTConfig(r=2), tmp_path, ["fc1", "conv"])


def test_bad_config() -> None:
    with pytest.raises(pk.errors.InvalidConfigError, match=r"SALTConfig: k must .*got 0"):
        SALTConfig(k=0)
    with pytest.raises(pk.errors.InvalidConfigError, match=r"r must lie in \[1, inf\), got 0"):
        SALTConfig(r=0)
    with pytest.raises(pk.errors.InvalidConfigError, match="k=9 is larger"):
        _adapter(out=12, inp=8, k=9)
