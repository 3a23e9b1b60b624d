"""Rank-adaptive methods against PEFT's AdaLoRA (issue 4's comparison), on a toy regression whose true update
has rank 2: AdaLoRA prunes 6 → 2, IncreLoRA grows 1 → 2, SoRA sparsifies its gates. All three should recover
the true ΔW; the two budgeted methods should end exactly at the budget."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.methods.increlora import IncreLoRAAllocator

peft = pytest.importorskip("peft")

D, STEPS, LR = 24, 300, 3e-2


def toy() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(D, D))
    true = 0.3 * torch.randn(D, 2, generator=g) @ torch.randn(2, D, generator=g)
    x = torch.randn(512, D, generator=g)
    with torch.no_grad():
        y = base(x) + x @ true.T
    return base, x, y, true


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, after_step: Callable[[int], list]) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    for step in range(1, STEPS + 1):
        (model(x) - y).pow(2).mean().backward()
        opt.step()
        new = after_step(step)
        if new:
            opt.add_param_group({"params": new})
        opt.zero_grad()
    with torch.no_grad():
        return float((model(x) - y).pow(2).mean())


def rel_err(delta: torch.Tensor, true: torch.Tensor) -> float:
    return float((delta - true).norm() / true.norm())


def test_increlora_and_sora_recover_a_rank_2_update_like_peft_adalora() -> None:
    base, x, y, true = toy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = peft.AdaLoraConfig(
            init_r=6, target_r=2, tinit=20, tfinal=100, deltaT=10, total_step=STEPS, lora_alpha=6, target_modules=["0"]
        )
        adalora = peft.get_peft_model(copy.deepcopy(base), cfg)
    fit(adalora, x, y, lambda s: adalora.base_model.update_and_allocate(s) or [])
    adalora_rank = int(sum((p != 0).sum() for n, p in adalora.named_parameters() if "lora_E" in n))
    with torch.no_grad():
        adalora_err = rel_err(adalora.base_model.model[0].get_delta_weight("default"), true)

    inc = pk.adapt(
        copy.deepcopy(base),
        pk.get_config(
            "increlora",
            r=1,
            target_rank=2,
            init_warmup=20,
            incre_interval=20,
            alpha=2.0,
            targets=["0"],
            advance_learn=False,
            seed=0,
        ),
    )
    alloc = IncreLoRAAllocator(inc)
    fit(inc, x, y, lambda s: inc.step_adapters(s) or alloc.step(s))
    inc_module = inc.adapter_modules("default")["0"]
    with torch.no_grad():
        inc_err = rel_err(inc_module.delta_weight(inc.model[0].base), true)

    sora = pk.adapt(copy.deepcopy(base), pk.get_config("sora", r=6, alpha=6.0, prox_lambda=1e-2, targets=["0"], seed=0))
    fit(sora, x, y, lambda s: sora.step_adapters(s) or [])
    sora_module = sora.adapter_modules("default")["0"]
    with torch.no_grad():
        sora_err = rel_err(sora_module.delta_weight(sora.model[0].base), true)

    assert adalora_rank == 2 and inc_module.effective_rank() == 2  # both end at the budget (prune vs grow)
    assert adalora_err < 1e-4 and inc_err < 1e-4  # and recover the rank-2 update
    assert 2 <= sora_module.effective_rank() < 6  # SoRA's proximal step removed gates, not the needed ones
    assert sora_err < 1e-2
