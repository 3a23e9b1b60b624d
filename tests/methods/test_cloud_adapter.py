"""Cloud-Adapter: the official wiring on a tiny HF ViT (perception on the patch-embedding conv, interaction at
chosen blocks), blocks before the first adapted one unchanged, the image reaching adapted blocks through the
CNN path, tokens replaced (no residual), the parameter counts, and the self-contained role on a conv net."""

from __future__ import annotations

import pytest
import torch
from test_bottleneck import tiny_vit
from torch import nn

import peftkit as pk
from peftkit.core.errors import ForwardContextError, InvalidConfigError
from peftkit.methods.cloud_adapter import CloudAdapter, CloudAdapterConfig, cloud_adapter_config

G = torch.Generator().manual_seed(0)
IMAGE_1, IMAGE_2 = torch.randn(2, 3, 16, 16, generator=G), torch.randn(2, 3, 16, 16, generator=G)


def _capture(model: nn.Module, paths: list[str], image: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        model.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: seen.__setitem__(p, (i[0], o))) for p in paths
    ]
    with torch.no_grad():
        model(pixel_values=image)
    for h in hooks:
        h.remove()
    return seen


def test_official_wiring_on_vit(tmp_path) -> None:
    config = cloud_adapter_config(blocks=(1,), hidden=8, depth=2)
    model = pk.adapt(tiny_vit(), config).eval()
    adapters = model.adapter_modules("default")
    assert sorted(adapters) == ["vit.embeddings.patch_embeddings.projection", "vit.layers.1"]
    perception, interaction = adapters["vit.embeddings.patch_embeddings.projection"], adapters["vit.layers.1"]
    assert perception.interaction is None and interaction.perception is None
    # parameter counts: the CNN on 3 input channels, c = 8, depth 2; the block module d² + 2cd + 6d
    c, d = 8, 32
    cnn = 3 + 2 * 3 + 3 * c + 2 * c + 3 * (10 * c * c + 4 * c)
    assert model.trainable_parameters().trainable == cnn + d * d + 2 * c * d + 6 * d
    base_io = _capture(tiny_vit(), ["vit.layers.0", "vit.layers.1"], IMAGE_1)
    io = _capture(model, ["model.vit.layers.0", "model.vit.layers.1"], IMAGE_1)
    torch.testing.assert_close(io["model.vit.layers.0"][1], base_io["vit.layers.0"][1], atol=0, rtol=0)
    y = io["model.vit.layers.1"][1]
    torch.testing.assert_close(y[:, 0], base_io["vit.layers.1"][1][:, 0], atol=0, rtol=0)  # cls unchanged
    assert not torch.allclose(y[:, 1:], base_io["vit.layers.1"][1][:, 1:])
    # tokens are replaced: the interaction output by hand from the block output and the context
    layer = model.get_submodule("model.vit.layers.1")
    with torch.no_grad():
        block_in = io["model.vit.layers.1"][0]
        base_out = layer.base_layer(block_in)
        ctx = perception.perception(IMAGE_1)
        fmap = base_out[:, 1:].transpose(1, 2).reshape(2, d, 4, 4)
        want = interaction.interaction(fmap, ctx).flatten(2).transpose(1, 2)
        torch.testing.assert_close(y[:, 1:], want, atol=1e-6, rtol=0)
        # same block input, other image: only the CNN path changes the adapted tokens
        other = interaction.interaction(fmap, perception.perception(IMAGE_2)).flatten(2).transpose(1, 2)
        assert not torch.allclose(other, want)
    assert model.routing.call.state == {}  # the context lived only for the forward that made it
    model.save(tmp_path / "cloud")
    loaded = pk.load(tiny_vit(), tmp_path / "cloud").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=IMAGE_1).logits, model(pixel_values=IMAGE_1).logits)


def test_interaction_without_perception_fails_clearly() -> None:
    config = CloudAdapterConfig(targets=["layers.1"], role="interaction", hidden=4, prefix_tokens=1)
    model = pk.adapt(tiny_vit(), config)
    with pytest.raises(ForwardContextError, match="perception"):
        model(pixel_values=IMAGE_1)


def test_self_contained_role_on_a_conv_net_and_residual() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1)).eval()
    x = torch.randn(2, 3, 16, 16)
    model = pk.adapt(net, CloudAdapterConfig(targets=["2"], hidden=4, depth=2, residual=True)).eval()
    layer = model.get_submodule("model.2")
    a = layer.adapters["default"]
    assert isinstance(a, CloudAdapter) and a.perception is not None and a.interaction is not None
    with torch.no_grad():
        h = net[1](net[0](x))
        o = layer.base_layer(h)
        torch.testing.assert_close(layer(h), o + a.interaction(o, a.perception(h)))
    assert CloudAdapter.expected_trainable(layer.base, a.config) == sum(p.numel() for p in a.parameters())


def test_config() -> None:
    c = CloudAdapterConfig()
    assert (c.hidden, c.depth, c.residual) == (256, 4, False) and c.context
    assert c.replace(hidden=8).context != c.context  # a new adapter gets its own context key
    assert c.for_module("x") is c
    with pytest.raises(InvalidConfigError, match="role"):
        CloudAdapterConfig(role="decoder")
    official = cloud_adapter_config()
    assert official.targets[1:] == ["layers.0", "layers.6", "layers.12", "layers.18"]


def test_default_targets_blocks_in_the_self_contained_role() -> None:
    model = pk.adapt(tiny_vit(), CloudAdapterConfig(hidden=4, depth=1)).eval()
    assert list(model.adapter_modules("default")) == ["vit.layers.0"]  # blocks 0, 6, 12, 18 that exist
    io = _capture(model, ["model.vit.layers.0"], IMAGE_1)
    base_io = _capture(tiny_vit(), ["vit.layers.0"], IMAGE_1)
    y, want = io["model.vit.layers.0"][1], base_io["vit.layers.0"][1]
    torch.testing.assert_close(y[:, 0], want[:, 0], atol=0, rtol=0)
    assert not torch.allclose(y[:, 1:], want[:, 1:])
