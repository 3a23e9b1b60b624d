"""Optimizers by name (peftkit.optim.build_optimizer): bitsandbytes' AdamW8bit as an option (imported only when
chosen), the same groups as AdamW, and the errors every name shares."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.optim import OPTIMIZERS, NoTrainableParametersError, OptimizerError, build_optimizer


def test_importing_peftkit_does_not_import_bitsandbytes() -> None:
    code = "import peftkit, peftkit.optim, peftkit.train, sys; print('bitsandbytes' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_adamw8bit_option() -> None:
    """AdamW8bit (bitsandbytes, blockwise 8-bit moments for tensors of >= 4096 elements) over the same groups as
    AdamW (weight decay on matrices only); three steps follow torch's AdamW
    within 3% (Frobenius norm) of the distance moved."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 4))
    net.requires_grad_(True)
    twin = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 4))
    twin.load_state_dict(net.state_dict())
    start = [p.detach().clone() for p in net.parameters()]
    opt = build_optimizer("adamw8bit", net, lr=1e-2, weight_decay=0.1)
    ref = build_optimizer("adamw", twin, lr=1e-2, weight_decay=0.1)
    assert isinstance(opt, bnb.optim.AdamW8bit) and isinstance(ref, torch.optim.AdamW)
    assert [(len(g["params"]), g["weight_decay"]) for g in opt.param_groups] == [(2, 0.1), (2, 0.0)]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(16, 128, generator=g)
        for model, o in ((net, opt), (twin, ref)):
            model(x).pow(2).mean().backward()
            o.step()
            o.zero_grad()
    assert opt.state[net[0].weight]["state1"].dtype == torch.uint8  # 8192 elements: 8-bit moments
    for p, q, p0 in zip(net.parameters(), twin.parameters(), start):
        moved = (q - p0).detach()
        assert float((p - q).detach().norm()) <= 0.03 * float(moved.norm())  # measured: 0.9% on the 64×128


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_no_trainable_parameters_is_one_error_for_every_optimizer(name: str) -> None:
    frozen = nn.Sequential(nn.Linear(4, 4)).requires_grad_(False)
    with pytest.raises(NoTrainableParametersError, match="no trainable parameters: add and activate an adapter"):
        build_optimizer(name, frozen, lr=1e-3)


def test_unknown_name_and_option() -> None:
    model = pk.adapt(nn.Sequential(nn.Linear(4, 4)), pk.LoRAConfig(r=2, targets=["0"]))
    with pytest.raises(OptimizerError, match=r"unknown optimizer 'adam'; choose one of adamw, adamw8bit, galore"):
        build_optimizer("adam", model, lr=1e-3)
    with pytest.raises(OptimizerError, match=r"'adamw' has no option\(s\) \['rank'\]; it takes none"):
        build_optimizer("adamw", model, lr=1e-3, rank=4)
