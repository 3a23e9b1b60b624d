"""Shared checks for the methods that decompose the frozen weight at init (SVFit, SALT, LoLDU): a few
optimiser steps fit a toy regression, and a trained adapter saved and loaded onto a fresh, untouched base
gives the same outputs while no base weight ever changes."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import make_tiny_net
from torch import nn

import peftkit as pk


def toy_regression_losses(config: pk.AdapterConfig, steps: int = 20, lr: float = 5e-2) -> list[float]:
    """MSE losses of an adapted ``Linear(12, 16)`` trained with Adam towards ``1.5 W`` (a change every one of
    these methods can express: it rescales the spectrum, the pivots, every singular value)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 16))
    teacher = nn.Linear(12, 16)
    with torch.no_grad():
        teacher.weight.copy_(1.5 * base[0].weight)
        teacher.bias.copy_(base[0].bias)
    x = torch.randn(64, 12)
    y = teacher(x).detach()
    model = pk.adapt(base, config.replace(targets=["0"]))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def check_roundtrip_on_fresh_base(config: pk.AdapterConfig, tmp_path: Path, targets: list[str]) -> pk.AdaptedModel:
    """Train a few steps, save, load onto a fresh base: equal outputs and state, untouched base weights.

    Returns the loaded model.
    """
    pristine = {k: v.clone() for k, v in make_tiny_net().state_dict().items()}
    model = pk.adapt(make_tiny_net(), config.replace(targets=targets, seed=3))
    ids = torch.randint(0, 40, (4, 5), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(input_ids=ids).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids)
    base_state = {  # the wrapped model's own tensors, under their original names (adapter tensors left out)
        key.replace(".base_layer", ""): value
        for key, value in model.get_base_model().state_dict().items()
        if ".adapters." not in key
    }
    assert base_state.keys() == pristine.keys()
    assert all(torch.equal(base_state[k], pristine[k]) for k in pristine), "adapting or training changed W"
    model.save(tmp_path / "ad")

    fresh = make_tiny_net()
    loaded = pk.load(fresh, tmp_path / "ad").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids), want, atol=0.0, rtol=0.0)
    saved, got = model.adapter_state_dict("default"), loaded.adapter_state_dict("default")
    assert saved.keys() == got.keys()
    assert all(torch.equal(saved[k], got[k]) for k in saved)
    with loaded.adapters_disabled(), torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids), make_tiny_net().eval()(input_ids=ids), atol=0.0, rtol=0.0)
    return loaded
