"""SoRA spec properties: identity at init, proximal step to all-zero gates, pruned LoRA == gated forward,
nonzero gates non-increasing under pure proximal steps, L1 term."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_net
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.errors import UnsupportedAdapterError
from peftkit.methods.sora import SoRA, SoRAConfig, prune_to_lora, sora_l1_penalty, sora_proximal_step


def _adapted(**kw) -> pk.AdaptedModel:
    model = pk.adapt(make_tiny_net(), SoRAConfig(r=4, targets=["fc1", "fc2"], seed=0, **kw)).eval()
    with torch.no_grad():
        for m in model.adapter_modules("default").values():
            m.B.normal_()
    return model


IDS = torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(0))


def test_identity_at_init_and_gaussian_gates() -> None:
    lin = nn.Linear(12, 8)
    a = SoRA(BaseView(lin), SoRAConfig(r=4))
    x = torch.randn(2, 12)
    assert torch.equal(a(x, lin(x), BaseView(lin)), lin(x))
    assert (a.gate != 0).all() and a.gate.shape == (4,)
    assert SoRA.expected_trainable(BaseView(lin), SoRAConfig(r=4)) == 4 * (12 + 8) + 4


def test_proximal_with_large_threshold_zeroes_all_gates() -> None:
    model = _adapted()
    base = make_tiny_net()
    gmax = max(m.gate.abs().max().item() for m in model.adapter_modules("default").values())
    assert sora_proximal_step(model, gmax) == 0
    for m in model.adapter_modules("default").values():
        assert torch.equal(m.gate, torch.zeros(4))
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS), base(input_ids=IDS))


def test_nonzero_gates_non_increasing_under_proximal_steps() -> None:
    model = _adapted()
    counts = [sora_proximal_step(model, 0.15) for _ in range(12)]
    assert counts == sorted(counts, reverse=True)
    assert counts[-1] < 8


def test_pruned_lora_equals_gated_forward() -> None:
    lin = nn.Linear(12, 8)
    base = BaseView(lin)
    a = SoRA(base, SoRAConfig(r=4, alpha=8.0))
    with torch.no_grad():
        a.B.normal_()
        a.gate.copy_(torch.tensor([0.7, 0.0, -1.3, 0.0]))
    lora = a.prune(base)
    assert lora.config.r == 2
    x = torch.randn(5, 12)
    torch.testing.assert_close(lora(x, lin(x), base), a(x, lin(x), base), atol=1e-6, rtol=0)
    torch.testing.assert_close(lora.delta_weight(base), a.delta_weight(base), atol=1e-6, rtol=0)
    with torch.no_grad():
        a.gate.zero_()
    assert a.prune(base) is None


def test_prune_to_lora_whole_adapter() -> None:
    model = _adapted()
    sora_proximal_step(model, 0.5)
    with torch.no_grad():
        want = model(input_ids=IDS)
    config = prune_to_lora(model, "default", "pruned")
    assert config.r <= 4 and model.configs["pruned"] is config
    model.set_adapter("pruned")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS), want, atol=1e-6, rtol=0)


def test_l1_penalty_and_step_hook() -> None:
    model = _adapted(prox_lambda=0.1)
    gates = torch.cat([m.gate for m in model.adapter_modules("default").values()])
    pen = sora_l1_penalty(model)
    torch.testing.assert_close(pen, 10.0 * gates.abs().mean())
    pen.backward()
    g = model.adapter_modules("default")["fc1"].gate
    torch.testing.assert_close(g.grad, 10.0 * torch.sign(g.detach()) / 8)
    before = g.detach().abs().clone()
    model.step_adapters(0)  # before the first update (trainers call it): no proximal step yet
    assert torch.equal(g.detach().abs(), before)
    model.step_adapters(1)  # proximal step in the per-step hook
    torch.testing.assert_close(g.detach().abs(), (before - 0.1).clamp_min(0))


def test_merge_exact() -> None:
    model = _adapted()
    with torch.no_grad():
        want = model(input_ids=IDS)
        plain = model.merge()
        torch.testing.assert_close(plain(input_ids=IDS), want, atol=1e-5, rtol=0)


def test_prune_to_lora_keeps_per_module_alpha_and_rank_overrides() -> None:
    """Issue 12 item 14: a per-module ``alpha`` (or ``r``) override changes that layer's scale; the pruned LoRA
    must keep it (it used the adapter-wide scale)."""
    config = SoRAConfig(r=4, targets=["fc1", "fc2"], seed=0, overrides={"fc1": {"alpha": 40.0}, "fc2": {"r": 2}})
    model = pk.adapt(make_tiny_net(), config).eval()
    with torch.no_grad():
        for m in model.adapter_modules("default").values():
            m.B.normal_()
        model.adapter_modules("default")["fc2"].gate[0] = 0.0  # fc2 prunes to rank 1, zero-padded to 4
        want = model(input_ids=IDS)
    new = prune_to_lora(model, "default", "pruned")
    loras = model.adapter_modules("pruned")
    assert new.r == 4 and loras["fc1"].scale == 10.0 and loras["fc2"].scale == 8.0
    model.set_adapter("pruned")
    with torch.no_grad():
        got = model(input_ids=IDS)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * float(want.abs().max()))


def test_prune_to_lora_without_overrides_writes_none() -> None:
    model = _adapted()
    assert prune_to_lora(model, "default", "pruned").overrides == {}


class _Wrapper(nn.Module):  # as DDP holds a model: under .module
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_sparsity_terms_act_on_every_trainable_sora_adapter_of_the_model() -> None:
    """The proximal step and the L1 term cover the gates of every trainable SoRA module, of all adapters (two
    active here), not the inactive one, also through a wrapper; with one adapter the L1 term is bit-identical to
    the mean over its gates in layer order."""
    model = _adapted(prox_lambda=0.1)
    one = torch.cat([m.gate for m in model.adapter_modules("default").values()])
    assert torch.equal(sora_l1_penalty(model), 10.0 * one.abs().sum() / one.numel())
    model.add_adapter("b", SoRAConfig(r=2, targets=["fc1"], seed=1))
    model.add_adapter("off", SoRAConfig(r=3, targets=["fc2"], seed=2))
    model.set_adapter(["default", "b"])
    trained = [*model.adapter_modules("default").values(), *model.adapter_modules("b").values()]
    gates = torch.cat([m.gate for m in trained])
    torch.testing.assert_close(sora_l1_penalty(_Wrapper(model)), 10.0 * gates.abs().mean(), rtol=1e-6, atol=0)
    off = model.adapter_modules("off")["fc2"].gate.detach().clone()
    assert sora_proximal_step(_Wrapper(model), threshold=100.0) == 0
    assert all((m.gate == 0).all() for m in trained)
    assert torch.equal(model.adapter_modules("off")["fc2"].gate, off)


def test_helpers_refuse_models_without_sora() -> None:
    model = pk.adapt(make_tiny_net(), pk.get_config("lora", r=2, targets=["fc1"]))
    with pytest.raises(ValueError, match="no trainable SoRA adapter"):
        sora_l1_penalty(model)
    with pytest.raises(UnsupportedAdapterError, match="'lora' adapter, not a SoRA"):  # was an AttributeError
        prune_to_lora(model, "default", "pruned")
