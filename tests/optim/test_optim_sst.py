"""SST's sampled spectral updates (peftkit.optim.sst with the ``sst`` method) against their definition on one
linear layer with a known full gradient ``G = (y - t)ᵀ x``: within a round, σ gets ``∂L/∂σ_i = U_iᵀ G V_i``, the
sampled vectors get the enhanced gradients ``G V_i`` and ``Gᵀ U_i``, each moved by AdamW (written out by hand in
float64), the other singular vectors not at all; at a new round the sampled vectors' optimizer state starts
afresh and σ's moments follow σ's order."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.methods.sst import SST
from peftkit.optim import OptimizerError, SSTAdamW, build_optimizer

LR, BETAS, EPS = 1e-2, (0.9, 0.999), 1e-8
SIGMAS, TARGETS = [1.0, 0.8, 0.5001, 0.5, 0.2], [0.9, 0.7, 0.4, 0.6, 0.3]


def sst_layer() -> tuple[nn.Module, SST, torch.Tensor, torch.Tensor]:
    """A 5×6 layer whose 3rd and 4th singular values are 1e-4 apart, inputs ``x`` and targets ``t`` from the same
    singular vectors with those two values moved apart the other way (0.4 and 0.6): the first steps swap them."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5)).double()
    u, _, vh = torch.linalg.svd(net[0].weight.detach(), full_matrices=False)
    with torch.no_grad():
        net[0].weight.copy_(u @ torch.diag(torch.tensor(SIGMAS, dtype=torch.float64)) @ vh)
    target = u @ torch.diag(torch.tensor(TARGETS, dtype=torch.float64)) @ vh
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=g, dtype=torch.float64)
    t = (x @ target.T + net[0].bias).detach()
    model = pk.adapt(net, pk.get_config("sst", r=2, round_steps=2, seed=3))
    (adapter,) = [m for m in model.modules() if isinstance(m, SST)]
    return model, adapter, x, t


def adam(w: torch.Tensor, m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, k: int) -> None:
    m.mul_(BETAS[0]).add_(g, alpha=1 - BETAS[0])
    v.mul_(BETAS[1]).addcmul_(g, g, value=1 - BETAS[1])
    w.sub_(LR * (m / (1 - BETAS[0] ** k)) / ((v / (1 - BETAS[1] ** k)).sqrt() + EPS))


def test_sst_round_follows_the_definition() -> None:
    model, sst, x, t = sst_layer()
    opt = SSTAdamW(model, lr=LR, betas=BETAS, eps=EPS)
    state = {name: [getattr(sst, name).detach().clone(), None, None] for name in ("sigma", "U_s", "V_s")}
    for entry in state.values():
        entry[1], entry[2] = torch.zeros_like(entry[0]), torch.zeros_like(entry[0])
    frozen_u, frozen_v, sample = sst.U.clone(), sst.V.clone(), sst.S.clone()
    for k in (1, 2):
        u, v = sst.full_factors()
        with torch.no_grad():
            full = (model(x) - t).T @ x  # ∂L/∂W of 0.5·|y - t|²
            grads = {"sigma": torch.einsum("oi,oj,ji->i", u, full, v), "U_s": full @ v[:, sample],
                     "V_s": full.T @ u[:, sample]}  # fmt: skip
        (0.5 * (model(x) - t).pow(2).sum()).backward()
        for name, (w, m, s2) in state.items():
            adam(w, m, s2, grads[name], k)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for name, (w, _, _) in state.items():
            got = getattr(sst, name).detach()
            torch.testing.assert_close(got, w, rtol=0, atol=1e-12 * float(w.abs().max()), msg=name)
        assert torch.equal(sst.U, frozen_u) and torch.equal(sst.V, frozen_v)  # unsampled columns: untouched
        model.step_adapters(k)  # the trainer's hook: the round ends after step 2
    assert sst.round == 1 and opt.resets == 0
    order = opt.state[sst.sigma]["sst_order"].clone()  # |σ| order after step 2, which the re-SVD follows
    assert order.tolist() == [0, 1, 3, 2, 4]  # the two close values swapped: the moments must follow
    sigma_m = opt.state[sst.sigma]["exp_avg"].clone()
    model.zero_grad()
    (0.5 * (model(x) - t).pow(2).sum()).backward()
    sigma_grad = sst.sigma.grad.clone()
    opt.step()
    assert opt.resets == 1
    assert int(opt.state[sst.U_s]["step"]) == int(opt.state[sst.V_s]["step"]) == 1  # fresh moments
    assert int(opt.state[sst.sigma]["step"]) == 3
    want = BETAS[0] * sigma_m[order] + (1 - BETAS[0]) * sigma_grad
    torch.testing.assert_close(opt.state[sst.sigma]["exp_avg"], want, rtol=0, atol=1e-12 * float(want.abs().max()))


def test_sst_optimizer_needs_sst_adapters() -> None:
    model = pk.adapt(nn.Sequential(nn.Linear(4, 4)), pk.LoRAConfig(r=2, targets=["0"]))
    with pytest.raises(OptimizerError, match="method 'sst'"):
        build_optimizer("sst", model, lr=LR)
