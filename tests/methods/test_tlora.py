"""Transformed LoRA spec properties: TT contraction equals the dense matrix built by Kronecker products of
core slices, count, identity at init, T full-rank after a random perturbation, forward equals the dense
``W' = (I + TT_T) W + TT_R`` form, merged == unmerged."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import make_tiny_net
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.errors import InvalidConfigError
from peftkit.methods.tlora import TLoRA, TLoRAConfig, balanced_factors, tt_apply, tt_dense


def _randomise(a: TLoRA) -> None:
    with torch.no_grad():
        for p in a.parameters():
            p.copy_(0.3 * torch.randn_like(p))


def test_balanced_factors() -> None:
    assert balanced_factors(96, 3) == [4, 4, 6]
    assert balanced_factors(128, 3) == [4, 4, 8]
    assert balanced_factors(7, 3) == [1, 1, 7]


def test_tt_equals_kronecker_of_slices() -> None:
    torch.manual_seed(0)
    cores = [torch.randn(1, 2, 3, 2), torch.randn(2, 4, 2, 3), torch.randn(3, 3, 2, 1)]
    want = torch.zeros(24, 12)
    for a, b in itertools.product(range(2), range(3)):
        want += torch.kron(torch.kron(cores[0][0, :, :, a], cores[1][a, :, :, b]), cores[2][b, :, :, 0])
    torch.testing.assert_close(tt_dense(cores), want, atol=1e-5, rtol=0)
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(tt_apply(cores, x), x @ want.T, atol=1e-5, rtol=0)


def test_count_identity_full_rank_and_dense_form() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(24, 20)
    base = BaseView(lin)
    a = TLoRA(base, TLoRAConfig())
    outs, ins = [2, 2, 5], [2, 3, 4]  # balanced factors of 20 and 24
    assert balanced_factors(20, 3) == outs and balanced_factors(24, 3) == ins
    want = sum(r0 * o * o * r1 for r0, o, r1 in zip([1, 4, 4], outs, [4, 4, 1]))
    want += sum(r0 * o * n * r1 for r0, o, n, r1 in zip([1, 8, 8], outs, ins, [8, 8, 1]))
    assert sum(p.numel() for p in a.parameters()) == want == TLoRA.expected_trainable(base, a.config)
    x = torch.randn(3, 24)
    with torch.no_grad():
        torch.testing.assert_close(a(x, lin(x), base), lin(x), atol=0, rtol=0)
        _randomise(a)
        t = torch.eye(20) + tt_dense(a.transform)
        assert torch.linalg.matrix_rank(t) == 20
        w_new = t @ lin.weight + tt_dense(a.residual)
        torch.testing.assert_close(a(x, lin(x), base), x @ w_new.T + lin.bias, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.delta_weight(base), w_new - lin.weight, atol=1e-5, rtol=0)


def test_merge_matches_unmerged_and_validation() -> None:
    model = pk.adapt(make_tiny_net(), TLoRAConfig(seed=1, targets=["fc1", "fc2"]), name="a")
    x = torch.randint(0, 40, (3, 5))
    with torch.no_grad():
        for a in model.adapter_modules("a").values():
            _randomise(a)
        want = model(x)
        torch.testing.assert_close(model.merge(unload=True)(x), want, atol=1e-5, rtol=0)
    with pytest.raises(InvalidConfigError, match="rank_residual"):
        TLoRAConfig(rank_residual=0)


@pytest.mark.parametrize("tokens", [3, 40])  # core by core (3 <= 20, 24) / through the dense matrices (40)
def test_both_forward_forms_give_dense_values_and_gradients(tokens: int) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(24, 20)
    base = BaseView(lin)
    a = TLoRA(base, TLoRAConfig())
    _randomise(a)
    x = torch.randn(tokens, 24)
    got = a(x, lin(x), base)
    params = list(a.parameters())
    grads = torch.autograd.grad(got.square().sum(), params)
    want = lin(x) + x @ a.delta_weight(base).T
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for g, w in zip(grads, torch.autograd.grad(want.square().sum(), params)):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5)
