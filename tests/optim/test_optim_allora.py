"""ALLoRA's adaptive rate (peftkit.optim.allora) against its formula: each row θ of LoRA's A and B moves at
``1 / √(‖θ‖² + 1/η²)`` times the AdamW step (``apply="update"``) or has its gradient scaled by it before AdamW
(``apply="grad"``), the norms taken before the step. The reference is AdamW written out by hand in float64."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.optim import ALLoRAAdamW, NoLowRankPairsError, OptimizerError, build_optimizer, lowrank_pairs
from peftkit.optim.allora import row_factor

ETA, LR, BETAS, EPS = 2.0, 1e-2, (0.9, 0.999), 1e-8


def lora_layer() -> tuple[nn.Module, nn.Parameter, nn.Parameter]:
    torch.manual_seed(0)
    model = pk.adapt(nn.Sequential(nn.Linear(6, 5)).double(), pk.LoRAConfig(r=3, alpha=3, targets=["0"]))
    (pair,) = lowrank_pairs(model)
    return model, pair.down, pair.up


def factor(p: torch.Tensor) -> torch.Tensor:
    """The formula, row by row."""
    return torch.stack([1.0 / torch.sqrt(row.pow(2).sum() + 1.0 / ETA**2) for row in p]).unsqueeze(1)


@pytest.mark.parametrize("apply", ["update", "grad"])
def test_allora_steps_follow_the_formula(apply: str) -> None:
    model, a, b = lora_layer()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randn(16, 5, generator=g).double()
    opt = ALLoRAAdamW(model, lr=LR, betas=BETAS, eps=EPS, eta=ETA, apply=apply)
    ref = {id(p): (p.detach().clone(), torch.zeros_like(p), torch.zeros_like(p)) for p in (a, b)}
    for k in range(1, 4):
        loss = 0.5 * (model(x) - t).pow(2).sum()
        loss.backward()
        for p in (a, b):
            w, m, v = ref[id(p)]
            f = factor(w)
            if k == 1 and p is b:  # B = 0: every row's rate is η
                torch.testing.assert_close(f, torch.full_like(f, ETA), rtol=0, atol=0)
            grad = p.grad * f if apply == "grad" else p.grad
            m.mul_(BETAS[0]).add_(grad, alpha=1 - BETAS[0])
            v.mul_(BETAS[1]).addcmul_(grad, grad, value=1 - BETAS[1])
            step = (m / (1 - BETAS[0] ** k)) / ((v / (1 - BETAS[1] ** k)).sqrt() + EPS)
            w.sub_(LR * (step * f if apply == "update" else step))
        opt.step()
        opt.zero_grad(set_to_none=True)
        for p in (a, b):
            want = ref[id(p)][0]
            torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-12 * float(want.abs().max()))
            # the model's own parameters are the reference's next starting point (same gradients next step)
    assert float(b.detach().abs().max()) > 0


def test_rate_is_inverse_norm_for_large_rows() -> None:
    """``‖θ‖·η >= 30`` ⇒ the factor is 1/‖θ‖ within 1e-3 (relative); a zero row gets η."""
    rows = torch.randn(6, 4, dtype=torch.float64)
    rows = rows / rows.norm(dim=1, keepdim=True) * torch.tensor([15.0, 20, 40, 100, 1e3, 1e4]).double().unsqueeze(1)
    f = row_factor(rows, ETA)
    inverse = 1.0 / rows.norm(dim=1, keepdim=True)
    assert float(((f - inverse) / inverse).abs().max()) < 1e-3
    torch.testing.assert_close(row_factor(torch.zeros(2, 4), ETA), torch.full((2, 1), ETA))


def test_other_parameters_take_plain_adamw_and_bad_input() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model = pk.adapt(net, pk.LoRAConfig(r=2, targets=["0"]))
    net[1].weight.requires_grad_(True)
    twin = nn.Parameter(net[1].weight.detach().clone())
    opt = build_optimizer("allora", model, lr=LR, eta=ETA)
    ref = torch.optim.AdamW([twin], lr=LR, weight_decay=0.0)
    for _ in range(2):
        model(torch.randn(3, 4)).pow(2).sum().backward()
        twin.grad = net[1].weight.grad.clone()
        opt.step()
        ref.step()
        opt.zero_grad()
    torch.testing.assert_close(net[1].weight, twin, rtol=0, atol=0)
    with pytest.raises(OptimizerError, match="eta must be positive"):
        build_optimizer("allora", model, lr=LR, eta=0.0)
    with pytest.raises(OptimizerError, match="apply must be"):
        build_optimizer("allora", model, lr=LR, apply="moments")
    full = pk.adapt(nn.Sequential(nn.Linear(4, 4)), pk.FullConfig(targets=["0"]))
    with pytest.raises(NoLowRankPairsError, match="adapt it with LoRA"):
        build_optimizer("allora", full, lr=LR)


def test_warns_when_the_allora_method_already_rescales() -> None:
    model = pk.adapt(nn.Sequential(nn.Linear(4, 4)), pk.get_config("allora", r=2, targets=["0"]))
    with pytest.warns(UserWarning, match="grad_scaling=False"):
        build_optimizer("allora", model, lr=LR)
    quiet = pk.adapt(nn.Sequential(nn.Linear(4, 4)), pk.get_config("allora", r=2, grad_scaling=False, targets=["0"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_optimizer("allora", quiet, lr=LR)
