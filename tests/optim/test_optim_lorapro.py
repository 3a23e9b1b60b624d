"""LoRA-Pro (peftkit.optim.lorapro) against its closed form on a single LoRA layer whose full weight gradient is
known, ``G = (y - t)ᵀ x`` for the loss ``½‖y - t‖²``. The reference projects onto the tangent space
``{s·B·Y + s·Z·A}`` by a brute-force least-squares solve (not the pinv formulas the optimizer uses), runs the
full-size Adam by hand, and checks the optimizer's factor updates against it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.optim import LoRAPro, NoLowRankPairsError, build_optimizer, lowrank_pairs
from peftkit.optim.lorapro import DELTA, adjusted_gradients, solve_sylvester

D_IN, D_OUT, R, ALPHA = 7, 5, 2, 6.0  # s = 3
S = ALPHA / R


def layer(b_zero: bool) -> tuple[nn.Module, nn.Parameter, nn.Parameter]:
    torch.manual_seed(0)
    model = pk.adapt(nn.Sequential(nn.Linear(D_IN, D_OUT)).double(), pk.LoRAConfig(r=R, alpha=ALPHA, targets=["0"]))
    (pair,) = lowrank_pairs(model)
    if not b_zero:
        with torch.no_grad():
            pair.up.copy_(torch.randn(D_OUT, R, dtype=torch.float64))
    return model, pair.down, pair.up


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, D_IN, generator=g, dtype=torch.float64), torch.randn(16, D_OUT, generator=g).double()


def full_gradient(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``∂L/∂W`` of the merged layer, in closed form: ``(y - t)ᵀ x``."""
    with torch.no_grad():
        return (model(x) - t).T @ x


def tangent_projection(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``argmin ‖s·B·Y + s·Z·A - g‖_F`` over ``(Y [r, in], Z [out, r])``, as a dense least-squares problem."""
    columns = []
    for k in range(R * D_IN):
        y = torch.zeros(R * D_IN, dtype=torch.float64)
        y[k] = 1
        columns.append((S * b @ y.view(R, D_IN)).flatten())
    for k in range(D_OUT * R):
        z = torch.zeros(D_OUT * R, dtype=torch.float64)
        z[k] = 1
        columns.append((S * z.view(D_OUT, R) @ a).flatten())
    op = torch.stack(columns, dim=1)
    coef = torch.linalg.lstsq(op, g.flatten().unsqueeze(1), driver="gelsd").solution
    return (op @ coef).view(D_OUT, D_IN)


def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, t: torch.Tensor) -> None:
    loss = 0.5 * (model(x) - t).pow(2).sum()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("b_zero", [False, True])
def test_lorapro_steps_follow_the_closed_form(b_zero: bool) -> None:
    """Three steps (lr 1e-2, Adam moments of the equivalent gradient): each step's equivalent update
    ``s·B·ĝA + s·ĝB·A`` equals the tangent projection of Adam's direction, where that direction comes from the
    projected full gradients ``G = (y - t)ᵀ x`` of every step; and ``(ĝA, ĝB)`` is the solution closest to
    ``(s·BᵀĜ, s·ĜAᵀ)`` (the X of the Sylvester equation): ``(ĝA - gA')Aᵀ = Bᵀ(ĝB - gB')``."""
    model, a, b = layer(b_zero)
    x, t = data()
    lr, (beta1, beta2), eps = 1e-2, (0.9, 0.999), 1e-8
    opt = LoRAPro(model, lr=lr, betas=(beta1, beta2), eps=eps)
    m = torch.zeros(D_OUT, D_IN, dtype=torch.float64)
    v = torch.zeros_like(m)
    for k in range(1, 4):
        a0, b0 = a.detach().clone(), b.detach().clone()
        g_full = full_gradient(model, x, t)
        g_eq = tangent_projection(a0, b0, g_full)
        m = beta1 * m + (1 - beta1) * g_eq
        v = beta2 * v + (1 - beta2) * g_eq**2
        direction = (m / (1 - beta1**k)) / ((v / (1 - beta2**k)).sqrt() + eps)
        step(model, opt, x, t)
        ha, hb = (a0 - a.detach()) / lr, (b0 - b.detach()) / lr
        update = S * b0 @ ha + S * hb @ a0
        want = tangent_projection(a0, b0, direction)
        # LoRA-Pro inverts BᵀB + δI (δ = 1e-8): against the exact projection that costs ~δ/λmin(BᵀB) relative,
        # which is large just after B leaves 0 (λmin ~ 1e-4 at step 2 of the B = 0 run).
        lam = float(torch.linalg.eigvalsh(b0.T @ b0)[0])
        rel = 1e-7 + (10 * DELTA / lam if lam > 0 else 0.0)
        torch.testing.assert_close(update, want, rtol=0, atol=rel * float(want.abs().max()))
        ga, gb = S * b0.T @ direction, S * direction @ a0.T
        gap = (ha - ga) @ a0.T - b0.T @ (hb - gb)
        assert float(gap.abs().max()) <= rel * float(ga.abs().max() + gb.abs().max())
        if b_zero and k == 1:  # B = 0: ĝA = 0 and ĝB = (1/s²)·gB'·(AAᵀ)⁻¹
            assert float(ha.abs().max()) == 0.0
            want_b = gb @ torch.linalg.inv(a0 @ a0.T) / S**2
            torch.testing.assert_close(hb, want_b, rtol=0, atol=1e-7 * float(want_b.abs().max()))
    state = opt.state[a]
    assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (D_OUT, D_IN)
    assert opt.state_bytes() == 2 * D_OUT * D_IN * 8  # full-size float64 moments, one pair


def test_sylvester_solution_residual() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(R, D_IN, generator=g, dtype=torch.float64)
    b = torch.randn(D_OUT, R, generator=g, dtype=torch.float64)
    c = torch.randn(R, R, generator=g, dtype=torch.float64)
    p, q = b.T @ b, a @ a.T
    x = solve_sylvester(p, q, c)
    assert float((p @ x + x @ q - c).abs().max()) < 1e-8 * float(c.abs().max())
    direction = torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
    _, _, x2 = adjusted_gradients(a, b, direction, S)
    regularised = torch.linalg.inv(p + DELTA * torch.eye(R, dtype=torch.float64))  # (BᵀB + δI)⁻¹, as the paper
    rhs = -(regularised @ (S * b.T @ direction) @ a.T) / S**2
    assert float((p @ x2 + x2 @ q - rhs).abs().max()) < 1e-8 * float(rhs.abs().max())


def test_lorapro_head_gets_adamw_and_bad_input() -> None:
    """Trainable parameters outside LoRA pairs take plain AdamW steps (as torch.optim.AdamW); a model without a
    LoRA pair is refused with the fix named."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model = pk.adapt(net, pk.LoRAConfig(r=2, targets=["0"]))
    net[1].weight.requires_grad_(True)
    head_copy = nn.Parameter(net[1].weight.detach().clone())
    opt = build_optimizer("lorapro", model, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW([head_copy], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        model(torch.randn(3, 4)).pow(2).sum().backward()
        head_copy.grad = net[1].weight.grad.clone()
        opt.step()
        ref.step()
        opt.zero_grad()
    torch.testing.assert_close(net[1].weight, head_copy, rtol=1e-6, atol=1e-7)
    full = pk.adapt(nn.Sequential(nn.Linear(4, 4)), pk.FullConfig(targets=["0"]))
    with pytest.raises(NoLowRankPairsError, match="adapt linear layers with LoRA"):
        build_optimizer("lorapro", full, lr=1e-3)


def test_full_rank_square_step_is_an_adamw_step_on_w_to_first_order() -> None:
    """r = d_in = d_out with invertible A, B: the tangent space is every matrix, so one LoRA-Pro step changes
    ``W = W₀ + s·B·A`` by AdamW's step on W up to the ``lr²·s·ĝB·ĝA`` term: the gap shrinks as lr²."""
    gaps = []
    for lr in (1e-3, 1e-4):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 4)).double()
        model = pk.adapt(net, pk.LoRAConfig(r=4, alpha=4, targets=["0"]))
        (pair,) = lowrank_pairs(model)
        with torch.no_grad():
            pair.up.copy_(torch.randn(4, 4, dtype=torch.float64))
        dense = nn.Linear(4, 4).double()
        with torch.no_grad():
            dense.weight.copy_(net[0].weight + pair.scale * pair.up @ pair.down)
            dense.bias.copy_(net[0].bias)
        x, t = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
        w0 = dense.weight.detach().clone()
        step(model, LoRAPro(model, lr=lr), x, t)
        step(dense, torch.optim.AdamW([dense.weight], lr=lr, weight_decay=0.0), x, t)
        with torch.no_grad():
            moved = net[0].weight + pair.scale * pair.up @ pair.down - w0
        gaps.append(float((moved - (dense.weight.detach() - w0)).abs().max()) / lr)
    assert gaps[1] < 0.2 * gaps[0]  # relative gap ∝ lr (measured 2.1e-3 at lr 1e-3, 2.1e-4 at 1e-4)
    assert gaps[1] < 1e-3


def test_lorapro_without_full_moments() -> None:
    """full_adam=False: the adjusted gradients of the raw equivalent gradient, ``(ĝA, ĝB)`` for the tangent
    projection of G, take ordinary Adam steps with LoRA-sized moments (first step: ``-lr·ĝ/(|ĝ| + eps)``)."""
    model, a, b = layer(b_zero=False)
    x, t = data()
    lr, eps = 1e-2, 1e-8
    opt = build_optimizer("lorapro", model, lr=lr, eps=eps, full_adam=False)
    a0, b0 = a.detach().clone(), b.detach().clone()
    ga, gb, _ = adjusted_gradients(a0, b0, tangent_projection(a0, b0, full_gradient(model, x, t)), S)
    step(model, opt, x, t)
    for got, start, g in ((a, a0, ga), (b, b0, gb)):
        want = start - lr * g / (g.abs() + eps)
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-9 * float(want.abs().max()))
    assert opt.state[a]["exp_avg"].shape == (R, D_IN) and opt.state[b]["exp_avg"].shape == (D_OUT, R)
    assert opt.state_bytes() == 2 * R * (D_IN + D_OUT) * 8  # float64 moments of A and B
