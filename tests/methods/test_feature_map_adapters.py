"""DD-Adapter and Earth-Adapter (feature-map adapters): spec properties on a small conv net and on the blocks
of a tiny HF ViT (the weightless "module" kind, cls token passed through)."""

from __future__ import annotations

import pytest
import torch
from test_bottleneck import tiny_vit
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.core.errors import InvalidConfigError, UnsupportedLayerError
from peftkit.methods._feature_maps import grid_of, to_map
from peftkit.methods.ddadapter import DDAdapter, DDAdapterConfig
from peftkit.methods.earth_adapter import EarthAdapter, EarthAdapterConfig, earth_adapter_config, frequency_split

PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def conv_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1)
    ).eval()


def _block_io(model: nn.Module, path: str) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    handle = model.get_submodule(path).register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o))
    with torch.no_grad():
        model(pixel_values=PIXELS)
    handle.remove()
    return seen


# ------------------------------------------------------------------------------------------------ DD-Adapter
def test_dd_count_shape_and_formula_on_a_conv_net() -> None:
    base = conv_net()
    x = torch.randn(2, 3, 9, 7)
    model = pk.adapt(base, DDAdapterConfig(targets=["0", "2"])).eval()
    c = 8
    assert model.trainable_parameters().trainable == 2 * (c * c + 11.5 * c)
    layer = model.get_submodule("model.0")
    adapter = layer.adapters["default"]
    with torch.no_grad():
        y = layer(x)
        o = layer.base_layer(x)
        assert y.shape == o.shape == (2, 8, 9, 7)  # spatial size preserved
        h = torch.nn.functional.gelu(adapter.pw1(o))
        u = sum(torch.nn.functional.gelu(dw(h)) for dw in adapter.dw)
        torch.testing.assert_close(y, o + torch.nn.functional.gelu(adapter.pw2(u)))
        assert not torch.allclose(model(x), conv_net()(x))  # not identity at init (torch default init)


def test_dd_dilation_three_receptive_field() -> None:
    a = DDAdapter(BaseView(nn.Conv2d(2, 4, 1)), DDAdapterConfig())
    assert [dw.dilation for dw in a.dw] == [(1, 1), (3, 3)]
    impulse = torch.zeros(1, 2, 15, 15)
    impulse[0, :, 7, 7] = 1.0
    with torch.no_grad():
        for dw, support in zip(a.dw, (3, 7)):
            dw.weight.fill_(1.0)
            dw.bias.zero_()
            response = dw(impulse).abs().sum((0, 1)) > 0
            rows, cols = response.nonzero().T
            assert rows.max() - rows.min() + 1 == support and cols.max() - cols.min() + 1 == support


def test_dd_on_vit_blocks_leaves_cls_and_zero_init_is_identity() -> None:
    base = tiny_vit()
    want = _block_io(base, "vit.layers.0")["y"]
    model = pk.adapt(base, DDAdapterConfig(targets=r"vit\.layers\.\d+", prefix_tokens=1)).eval()
    got = _block_io(model, "model.vit.layers.0")["y"]
    torch.testing.assert_close(got[:, 0], want[:, 0], atol=0, rtol=0)  # cls token unchanged
    assert not torch.allclose(got[:, 1:], want[:, 1:])
    zero = pk.adapt(tiny_vit(), DDAdapterConfig(targets=r"vit\.layers\.\d+", prefix_tokens=1, zero_init=True))
    with torch.no_grad():
        torch.testing.assert_close(zero(pixel_values=PIXELS).logits, tiny_vit()(pixel_values=PIXELS).logits)


def test_dd_channels_last_and_odd_channels() -> None:
    a = DDAdapter(BaseView(nn.Linear(4, 6)), DDAdapterConfig(channels_last=True))
    x = torch.randn(2, 5, 3, 6)  # [B, H, W, C]
    with torch.no_grad():
        torch.testing.assert_close(
            a(x, x, None), (x.permute(0, 3, 1, 2) + a.adapter(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
        )
    with pytest.raises(UnsupportedLayerError, match="even"):
        DDAdapter(BaseView(nn.Conv2d(4, 5, 1)), DDAdapterConfig())


def test_feature_map_helpers() -> None:
    assert grid_of(16) == (4, 4) and grid_of(6) == (2, 3) and grid_of(7) == (1, 7)
    with pytest.raises(InvalidConfigError, match="grid"):
        grid_of(16, [3, 5])
    t = torch.randn(2, 1 + 12, 5)
    fmap, back = to_map(t, prefix_tokens=1)
    assert fmap.shape == (2, 5, 3, 4)
    torch.testing.assert_close(back(fmap), t, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- Earth-Adapter
def test_earth_frequency_split_sums_back() -> None:
    f = torch.randn(2, 6, 8, 8)
    low, high = frequency_split(f, 0.3)
    torch.testing.assert_close(low + high, f, atol=1e-5, rtol=0)
    assert low.abs().sum() > 0 and high.abs().sum() > 0
    low0, high0 = frequency_split(f, 0.0)  # c = 0: nothing is low
    assert low0.abs().max() == 0
    torch.testing.assert_close(high0, f, atol=1e-5, rtol=0)


def test_earth_on_vit_blocks(tmp_path) -> None:
    base = tiny_vit()
    config = earth_adapter_config(2, fft_blocks=[0], r=4)
    model = pk.adapt(base, config).eval()
    adapters = model.adapter_modules("default")
    assert sorted(adapters) == ["vit.layers.0", "vit.layers.1"]
    assert adapters["vit.layers.0"].router is not None and adapters["vit.layers.1"].router is None
    d, r = 32, 4
    mlp = 2 * r * d + r + d
    assert model.trainable_parameters().trainable == (1 + 3 * mlp + 3 * d + 3) + (1 + mlp)
    want = _block_io(tiny_vit(), "vit.layers.0")
    got = _block_io(model, "model.vit.layers.0")
    torch.testing.assert_close(got["y"][:, 0], want["y"][:, 0], atol=0, rtol=0)  # cls token unchanged
    a = adapters["vit.layers.0"]
    tokens = want["y"][:, 1:]
    with torch.no_grad():
        g = a.router_weights(tokens)
        torch.testing.assert_close(g.sum(-1), torch.ones(g.shape[:-1]))
        fmap = tokens.transpose(1, 2).reshape(2, d, 4, 4)
        low, high = (t.flatten(2).transpose(1, 2) for t in frequency_split(fmap, 0.3))
        delta = g[..., :1] * a.mlps[0](tokens) + g[..., 1:2] * a.mlps[1](low) + g[..., 2:] * a.mlps[2](high)
        torch.testing.assert_close(got["y"][:, 1:], tokens + 0.1 * delta, atol=1e-6, rtol=0)
        for adapter in adapters.values():
            adapter.scale.zero_()  # s = 0: the base model
        torch.testing.assert_close(model(pixel_values=PIXELS).logits, tiny_vit()(pixel_values=PIXELS).logits)
    model.save(tmp_path / "earth")
    assert pk.load(tiny_vit(), tmp_path / "earth").configs["default"].overrides == {"layers.1": {"frequency": False}}


def test_earth_on_a_conv_net_and_zero_init() -> None:
    x = torch.randn(2, 3, 8, 8)
    model = pk.adapt(conv_net(), EarthAdapterConfig(targets=["2"], r=4, prefix_tokens=0, zero_init_up=True))
    with torch.no_grad():
        torch.testing.assert_close(model(x), conv_net()(x), atol=1e-6, rtol=0)
    assert isinstance(model.adapter_modules("default")["2"], EarthAdapter)
    with pytest.raises(InvalidConfigError, match="cutoff_ratio"):
        EarthAdapterConfig(cutoff_ratio=1.5)
