"""ZeroI2V linear adapters: identity at init, exact structural re-parametrisation (merge(unload=True) leaves
exactly the base's parameter count and the same outputs), the parameter count and the folding formulas."""

from __future__ import annotations

import pytest
import torch
from test_bottleneck import tiny_vit
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.core.errors import InvalidConfigError
from peftkit.methods.zeroi2v import ZeroI2V, ZeroI2VConfig, stdha_shift, zeroi2v_config


def _randomise(model: pk.AdaptedModel) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in model.adapter_modules("default").values():
            for p in a.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_vit_placement_merges_to_the_base_parameter_count() -> None:
    base = tiny_vit()
    n_base = sum(p.numel() for p in base.parameters())
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = base(pixel_values=x).logits
    model = pk.adapt(base, zeroi2v_config()).eval()  # r = d/4 = 8, four kinds of adapter per block
    sides = {p.rsplit(".", 1)[-1]: a.input_side for p, a in model.adapter_modules("default").items()}
    assert sides == {"q_proj": True, "k_proj": True, "v_proj": True, "fc1": True, "o_proj": False, "fc2": False}
    per = 2 * 8 * 32 + 8 + 32
    assert model.trainable_parameters().trainable == 2 * 6 * per  # 2 blocks × 6 adapted linears
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, want, atol=1e-6, rtol=0)  # fc2 = 0
    _randomise(model)
    with torch.no_grad():
        adapted = model(pixel_values=x).logits
    assert not torch.allclose(adapted, want, atol=1e-4)
    plain = model.merge(unload=True)
    assert sum(p.numel() for p in plain.parameters()) == n_base
    assert not any(type(m).__module__.startswith("peftkit") for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(pixel_values=x).logits, adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["output", "input"])
def test_folding_formulas(side: str) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 10).double()
    base = BaseView(lin)
    a = ZeroI2V(base, ZeroI2VConfig(side=side, r=3, scale=0.5, dropout=0.0)).double()
    for p in a.parameters():
        with torch.no_grad():
            p.normal_()
    w1, b1, w2, b2 = a.fc1.weight, a.fc1.bias, a.fc2.weight, a.fc2.bias
    d = 6 if side == "input" else 10
    m = torch.eye(d, dtype=torch.double) + 0.5 * w2 @ w1
    c = 0.5 * (w2 @ b1 + b2)
    if side == "output":  # W' = M W, b' = M b + c
        w_new, b_new = m @ lin.weight, m @ lin.bias + c
    else:  # W' = W M, b' = W c + b
        w_new, b_new = lin.weight @ m, lin.weight @ c + lin.bias
    torch.testing.assert_close(lin.weight + a.delta_weight(base), w_new)
    torch.testing.assert_close(lin.bias + a.delta_bias(base), b_new)
    x = torch.randn(4, 6, dtype=torch.double)
    torch.testing.assert_close(a(x, lin(x), base), x @ w_new.T + b_new)

    def adapter_by_hand(h: torch.Tensor) -> torch.Tensor:
        return h + 0.5 * (h @ w1.T + b1) @ w2.T + 0.5 * b2

    want = adapter_by_hand(lin(x)) if side == "output" else lin(adapter_by_hand(x))
    torch.testing.assert_close(a(x, lin(x), base), want)
    assert sum(p.numel() for p in a.parameters()) == ZeroI2V.expected_trainable(base, a.config) == 2 * 3 * d + 3 + d


def test_defaults_and_errors() -> None:
    cfg = ZeroI2VConfig()
    assert (cfg.scale, cfg.dropout, cfg.width(768)) == (0.5, 0.1, 192)
    with pytest.raises(InvalidConfigError, match="side"):
        ZeroI2VConfig(side="both")
    with pytest.raises(InvalidConfigError, match="ratio"):
        ZeroI2VConfig(ratio=0.0)
    clip = zeroi2v_config(attention_out="out_proj")
    assert "out_proj" in clip.targets and clip.overrides["fc1"] == {"side": "input"}


def test_stdha_shift() -> None:
    t = torch.randn(2 * 3, 5, 12)  # 2 clips of 3 frames, 5 tokens, 12 channels
    assert torch.equal(stdha_shift(t, frames=1, fold=2), t)  # T = 1: no-op
    out = stdha_shift(t, frames=3, fold=2).view(2, 3, 5, 12)
    clips = t.view(2, 3, 5, 12)
    assert torch.equal(out[:, 1:, :, :2], clips[:, :-1, :, :2])  # previous frame, exactly
    assert torch.equal(out[:, :-1, :, 2:4], clips[:, 1:, :, 2:4])  # next frame, exactly
    assert torch.equal(out[:, 0, :, :2], clips[:, 0, :, :2]) and torch.equal(out[:, -1, :, 2:4], clips[:, -1, :, 2:4])
    assert torch.equal(out[..., 4:], clips[..., 4:])  # other channels untouched
    with pytest.raises(ValueError, match="clips"):
        stdha_shift(t, frames=4, fold=2)


def _bias_free_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16, bias=False), nn.GELU(), nn.Linear(16, 12, bias=False))


@pytest.mark.parametrize("side", ["output", "input"])
def test_merges_into_a_bias_free_linear(side: str) -> None:
    """Issue 12 item 16: on a bias-free linear the default adapter has no biases (its constant c would need a
    bias to fold into), so it merges exactly; before, merge raised NotMergeableError."""
    base = _bias_free_net()
    before = [(p, p.detach().clone()) for p in base.parameters()]
    model = pk.adapt(base, ZeroI2VConfig(r=3, side=side, dropout=0.0, targets=["0", "2"])).eval()
    for a in model.adapter_modules("default").values():
        assert a.fc1.bias is None and a.fc2.bias is None
    d = {"0": 12 if side == "input" else 16, "2": 16 if side == "input" else 12}
    assert model.trainable_parameters().trainable == sum(2 * 3 * w for w in d.values())
    assert all(
        ZeroI2V.expected_trainable(model.get_submodule(f"model.{p}").base, a.config) == 2 * 3 * d[p]
        for p, a in model.adapter_modules("default").items()
    )
    _randomise(model)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = model(x)
        model.merge(unload=False)
        torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-5 * float(adapted.abs().max()))
        model.unmerge()
        for p, b in before:
            torch.testing.assert_close(p, b, rtol=0, atol=1e-6)
        plain = model.merge()
        assert all(m.bias is None for m in (plain[0], plain[2]))
        torch.testing.assert_close(plain(x), adapted, rtol=0, atol=1e-5 * float(adapted.abs().max()))


def test_forced_biases_on_a_bias_free_linear_refuse_to_merge() -> None:
    base = _bias_free_net()
    model = pk.adapt(base, ZeroI2VConfig(r=3, bias=True, dropout=0.0, targets=["0"])).eval()
    _randomise(model)
    before = base[0].weight.detach().clone()
    with pytest.raises(pk.errors.NotMergeableError, match="bias"):
        model.merge(unload=False)
    assert torch.equal(base[0].weight, before)
    with pytest.raises(InvalidConfigError, match="bias"):
        ZeroI2VConfig(bias="auto")


def test_biased_files_reload_onto_a_bias_free_linear() -> None:
    """Files written when the adapter always had biases load (through ``pk.load``'s path) with them."""
    from peftkit.core.protocol import skip_init

    config = ZeroI2VConfig(r=3, bias=True, dropout=0.0, targets=["0"])
    model = pk.adapt(_bias_free_net(), config).eval()
    _randomise(model)
    old_config = config.replace(bias=None)  # what such a file's adapter.json reads back as
    loaded = pk.AdaptedModel(_bias_free_net())
    with skip_init():
        loaded.add_adapter("default", old_config)
    loaded.assign_tensors("default", model.adapter_state_dict("default"), source="old file")
    loaded.eval()
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert loaded.trainable_parameters().trainable == model.trainable_parameters().trainable
