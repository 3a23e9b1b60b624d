"""Adapters with random (non-zero) values for merge tests."""

from __future__ import annotations

import torch
from torch import nn

import peftkit as pk


def randomize(model: pk.AdaptedModel, name: str, seed: int, scale: float = 0.3) -> None:
    """Give every tensor adapter ``name`` saves random values (LoRA's B starts at zero: its update would be 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.adapter_modules(name).values():
            for t in module.state_dict(keep_vars=True).values():
                t.copy_(scale * torch.randn(t.shape, generator=g))


def adapted(base: nn.Module, configs: dict[str, pk.AdapterConfig], seed: int = 1) -> pk.AdaptedModel:
    """``base`` with one adapter per entry of ``configs``, each with random values."""
    model: pk.AdaptedModel | None = None
    for i, (name, config) in enumerate(configs.items()):
        if model is None:
            model = pk.adapt(base, config, name)
        else:
            model.add_adapter(name, config)
        randomize(model, name, seed + i)
    assert model is not None
    return model.eval()


def exact_sum(model: pk.AdaptedModel, names: list[str], weights: list[float], path: str) -> torch.Tensor:
    """``Σ_i w_i ΔW_i`` on module ``path`` (float64)."""
    base = model.base_view(path)
    return sum(w * model.adapter_modules(n)[path].delta_weight(base).detach().double() for n, w in zip(names, weights))


def delta(model: pk.AdaptedModel, name: str, path: str) -> torch.Tensor:
    return model.adapter_modules(name)[path].delta_weight(model.base_view(path)).detach().double()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())
