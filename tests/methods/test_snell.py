"""SNELL / SNELLA spec properties: count, K equals the explicit double loop, fraction of zeros in K_s is s
(±1/numel), gradient flows only through kept entries, not identity at init (zero_start is), merged ==
unmerged, SNELLA's K' formula, α/γ/β receive gradients, the budget schedule is monotone, allocations sum to
the budget and every s_l lies in [0, 1]."""

from __future__ import annotations

import itertools

import pytest
import torch
from _structured_parity import on_linear
from conftest import make_tiny_net
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.errors import InvalidConfigError
from peftkit.methods.snell import (
    SNELL,
    SNELLA,
    SNELLAConfig,
    SNELLConfig,
    allocate,
    budget,
    kernel,
    reallocate,
    sparsify,
)


def _adapter(cls: type = SNELL, **kw: object) -> tuple[SNELL, BaseView, nn.Linear]:
    return on_linear(cls, (SNELLAConfig if cls is SNELLA else SNELLConfig)(**kw))


def test_count_and_kernel_double_loop() -> None:
    a, base, _ = _adapter(low_rank_dim=6)
    assert sum(p.numel() for p in a.parameters()) == 6 * 44 == SNELL.expected_trainable(base, a.config)
    b, base, _ = _adapter(SNELLA, low_rank_dim=6)
    assert sum(p.numel() for p in b.parameters()) == 6 * 44 + 3 == SNELLA.expected_trainable(base, b.config)
    u, v = a.In_Qs.detach(), a.Out_Qs.detach()
    want = torch.empty(24, 20)
    for i in range(24):
        for o in range(20):
            want[i, o] = 0.1 * (u[0, i] - v[0, o]).norm() - 0.1 * (u[1, i] - v[1, o]).norm()
    torch.testing.assert_close(kernel(u, v), want, atol=1e-6, rtol=0)
    with pytest.raises(InvalidConfigError, match="low_rank_dim"):
        SNELLConfig(low_rank_dim=3)


@pytest.mark.parametrize("s", [0.1, 0.3, 0.77])
def test_sparsity_fraction_and_masked_gradient(s: float) -> None:
    a, _base, _ = _adapter(low_rank_dim=4, init_thres=s)
    ks = a.sparse_kernel()
    zeros = (ks == 0).float().mean().item()
    assert abs(zeros - s) <= 1 / ks.numel() + 1e-9
    ks.sum().backward()
    u = a.In_Qs.detach().clone().requires_grad_()
    k = kernel(u, a.Out_Qs.detach())
    mask = (sparsify(k, s) != 0).float()
    (k * (k.abs() * mask).detach()).sum().backward()  # same function
    u2 = a.In_Qs.detach().clone().requires_grad_()
    (kernel(u2, a.Out_Qs.detach()) * (k.detach().abs() * mask)).sum().backward()
    torch.testing.assert_close(u.grad, u2.grad)  # masked entries contribute nothing
    assert torch.equal(sparsify(k, 0.0), k)


def test_not_identity_zero_start_is_and_merge() -> None:
    x = torch.randn(3, 24)
    with torch.no_grad():
        a, base, lin = _adapter(low_rank_dim=4)
        assert not torch.allclose(a(x, lin(x), base), lin(x))
        z, base, lin = _adapter(low_rank_dim=4, zero_start=True, init_thres=0.5)
        torch.testing.assert_close(z(x, lin(x), base), lin(x), atol=1e-6, rtol=0)
    model = pk.adapt(make_tiny_net(), SNELLAConfig(low_rank_dim=4, init_thres=0.4, targets=["fc1", "fc2"]), name="a")
    ids = torch.randint(0, 40, (3, 5))
    with torch.no_grad():
        want = model(ids)
        torch.testing.assert_close(model.merge(unload=True)(ids), want, atol=1e-5, rtol=0)


def test_snella_kernel_formula_and_scalar_grads() -> None:
    a, base, lin = _adapter(SNELLA, low_rank_dim=4)
    with torch.no_grad():
        a.alpha.fill_(0.7), a.gamma.fill_(1.3), a.beta.fill_(0.05)
    k = kernel(a.In_Qs, a.Out_Qs).detach()
    want = k + 0.7 * torch.softmax(k / 1.3, dim=-1) + 0.05
    torch.testing.assert_close(a.full_kernel().detach(), want)
    a.train()
    x = torch.randn(5, 24)
    a(x, lin(x), base).pow(2).sum().backward()
    for p in (a.alpha, a.gamma, a.beta):
        assert p.grad is not None and p.grad.abs() > 0
    assert a.score() > 0  # importance EMAs were updated by the backward


def test_budget_monotone_and_allocation() -> None:
    values = [budget(t, 20, 1000.0, 300.0, init_warmup=2, final_warmup=3) for t in range(21)]
    assert values[0] == 1000.0 and values[-1] == 300.0
    assert all(b <= a + 1e-9 for a, b in itertools.pairwise(values))
    sizes = [100, 50, 400, 10]
    alloc = allocate(333.0, [0.5, 0.1, 0.2, 5.0], sizes)
    assert sum(alloc) == 333 and all(0 <= k <= n for k, n in zip(alloc, sizes))
    assert alloc[3] == 10  # capped, the rest redistributed


def test_reallocate_sets_ratios() -> None:
    model = pk.adapt(make_tiny_net(), SNELLAConfig(low_rank_dim=4, targets=["fc1", "fc2"]), name="a")
    model.train()
    ids = torch.randint(0, 40, (3, 5))
    model(ids).sum().backward()
    layers = list(model.adapter_modules("a").values())
    ratios = reallocate(layers, t=5, total=5)
    assert all(0.0 <= s <= 1.0 for s in ratios)
    nonzero = sum((a.sparse_kernel() != 0).sum().item() for a in layers)
    assert abs(nonzero - 0.7 * 2 * 16 * 32) <= len(layers) + 1
