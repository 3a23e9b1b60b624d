"""ALLoRA spec properties: s = 1, no dropout, gradient rows rescaled by 1/sqrt(||p||² + eps)
(exactly 1/sqrt(eps) on B at B = 0)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from peftkit.core.base import BaseView
from peftkit.methods.allora import ALLoRA, ALLoRAConfig, allora_grad_factor


def _raw_grads(a: ALLoRA, lin: nn.Linear, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the same loss with plain (unscaled) A, B."""
    A = a.A.detach().clone().requires_grad_()
    B = a.B.detach().clone().requires_grad_()
    y = lin(x) + x @ A.T @ B.T
    (y - target).pow(2).sum().backward()
    return A.grad, B.grad


def _setup(eps: float = 1e-3) -> tuple[ALLoRA, BaseView, nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    lin = nn.Linear(10, 6).requires_grad_(False)
    base = BaseView(lin)
    return ALLoRA(base, ALLoRAConfig(r=3, eps=eps)), base, lin, torch.randn(5, 10), torch.randn(5, 6)


def test_b_gradient_at_zero_scaled_by_inverse_sqrt_eps() -> None:
    a, base, lin, x, t = _setup(eps=1e-3)
    assert torch.equal(a.B, torch.zeros_like(a.B))
    (a(x, lin(x), base) - t).pow(2).sum().backward()
    _, raw_b = _raw_grads(a, lin, x, t)
    torch.testing.assert_close(a.B.grad, raw_b / math.sqrt(1e-3), rtol=1e-6, atol=0)
    assert raw_b.abs().sum() > 0


def test_row_factors_with_nonzero_weights_and_accumulation() -> None:
    a, base, lin, x, t = _setup(eps=0.5)
    with torch.no_grad():
        a.B.normal_()
    for _ in range(2):  # two micro-batches accumulate: each is scaled before the sum
        (a(x, lin(x), base) - t).pow(2).sum().backward()
    raw_a, raw_b = _raw_grads(a, lin, x, t)
    fa = 1 / torch.sqrt(a.A.detach().pow(2).sum(1, keepdim=True) + 0.5)
    fb = 1 / torch.sqrt(a.B.detach().pow(2).sum(1, keepdim=True) + 0.5)
    torch.testing.assert_close(a.A.grad, 2 * raw_a * fa, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.B.grad, 2 * raw_b * fb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(allora_grad_factor(a.B, 0.5), fb)


def test_scale_one_no_dropout_and_exact_merge() -> None:
    a, base, lin, x, _ = _setup()
    assert not any(isinstance(m, nn.Dropout) for m in a.modules())
    assert torch.equal(a(x, lin(x), base), lin(x))  # identity at init
    with torch.no_grad():
        a.B.normal_()
    y = a(x, lin(x), base)
    torch.testing.assert_close(y, lin(x) + x @ (a.B @ a.A).T, atol=1e-6, rtol=0)
    merged = nn.functional.linear(x, lin.weight + a.delta_weight(base), lin.bias)
    torch.testing.assert_close(merged, y, atol=1e-5, rtol=0)
    assert a.lowrank(base).scale == 1.0


def test_scaling_survives_deepcopy_and_can_be_off() -> None:
    a, base, lin, x, t = _setup()
    b = copy.deepcopy(a)
    (b(x, lin(x), base) - t).pow(2).sum().backward()
    _, raw_b = _raw_grads(a, lin, x, t)
    torch.testing.assert_close(b.B.grad, raw_b / math.sqrt(1e-3), rtol=1e-6, atol=0)
    plain = ALLoRA(base, ALLoRAConfig(r=3, grad_scaling=False))
    with torch.no_grad():
        plain.A.copy_(a.A)
    (plain(x, lin(x), base) - t).pow(2).sum().backward()
    torch.testing.assert_close(plain.B.grad, raw_b)
