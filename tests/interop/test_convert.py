"""``peftkit.interop.convert``: the one export flow and the one import flow over the format table, and the
method-side export hooks they use (``AdapterConfig.export_config`` / ``Adapter.export_state``)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_net

import peftkit as pk


def _perturb(model: pk.AdaptedModel, seed: int = 0) -> None:
    """Move every trainable tensor (as training would), so ``B A`` differs from the frozen offset ``B₀ A₀``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("init", ["kaiming", "pissa"])
def test_lora_export_hooks_describe_the_modules_update(init: str, rslora: bool) -> None:
    """``export_state`` with ``export_config`` is a plain LoRA (no offset buffers) whose ``s'·B'A'`` is the
    module's ``ΔW``; a residual init becomes rank ``2r`` with the scale kept, a plain one is returned as is."""
    config = pk.LoRAConfig(r=2, alpha=3.0, rslora=rslora, bias=init == "kaiming", init=init, targets=["fc1", "conv"])
    model = pk.adapt(make_tiny_net(), config)
    _perturb(model)
    for path, module in model.adapter_modules("default").items():
        base = model.model.get_submodule(path).base
        plain, state = module.config.export_config(), module.export_state()
        assert not plain.residual and plain.r == (4 if init == "pissa" else 2)
        assert plain.scale == pytest.approx(module.config.scale, rel=1e-12)
        assert set(state) == ({"A", "B", "bias"} if init == "kaiming" else {"A", "B"})
        if init == "kaiming":
            assert plain is module.config
        want = module.delta_weight(base).detach()
        got = plain.scale * (state["B"] @ state["A"].reshape(plain.r, -1)).reshape(want.shape)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * float(want.abs().max()))
