"""SelaVPR spec properties: serial adapter on the attention output, parallel adapter (scale 0.2) beside the
MLP, ``d² + 1.5d`` per adapter at ratio 0.5, backbone identity at init, local head 16×16 → 61×61, GeM."""

from __future__ import annotations

import torch
from conftest import tiny_vit
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.methods.selavpr import SelaVPRAdapter, SelaVPRConfig, SelaVPRLocalHead, gem


def _vit() -> nn.Module:
    return tiny_vit(num_labels=None, intermediate_size=64)


def test_placement_count_and_identity_at_init() -> None:
    vit = _vit()
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = vit(pixel_values=pixels).last_hidden_state
    model = pk.adapt(vit, SelaVPRConfig())
    paths = model.layer_paths["default"]
    assert sorted(paths) == sorted(f"layers.{i}.{m}" for i in range(2) for m in ("attention.o_proj", "mlp"))
    d = 32
    assert model.trainable_parameters().trainable == 4 * (d * d + 1.5 * d)  # spec: d² + 1.5d per adapter
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels).last_hidden_state, want, rtol=0, atol=0)
    modules = model.adapter_modules("default")
    assert not modules["layers.0.attention.o_proj"].parallel and modules["layers.0.mlp"].parallel
    assert modules["layers.0.mlp"].branch.scale == 0.2


def test_serial_and_parallel_forms() -> None:
    vit = _vit()
    mlp = vit.layers[0].mlp
    view = BaseView(mlp)
    adapter = SelaVPRAdapter(view, SelaVPRConfig())
    with torch.no_grad():
        adapter.branch.up.weight.normal_()
    x = torch.randn(2, 5, 32)
    fc1, fc2 = adapter.branch.down, adapter.branch.up
    torch.testing.assert_close(adapter(x, mlp(x), view), mlp(x) + 0.2 * fc2(torch.relu(fc1(x))))
    proj = vit.layers[0].attention.o_proj
    serial = SelaVPRAdapter(BaseView(proj), SelaVPRConfig())
    with torch.no_grad():
        serial.branch.up.weight.normal_()
    h = proj(x)
    torch.testing.assert_close(serial(x, h, BaseView(proj)), h + serial.branch.up(torch.relu(serial.branch.down(h))))


def test_local_head_size_and_gem() -> None:
    head = SelaVPRLocalHead(32)
    tokens = torch.randn(2, 16 * 16, 32)
    local = head(tokens, (16, 16))
    assert local.shape == (2, 128, 61, 61)
    torch.testing.assert_close(local.norm(dim=1), torch.ones(2, 61, 61))
    g = gem(tokens)
    assert g.shape == (2, 32)
    torch.testing.assert_close(g.norm(dim=-1), torch.ones(2))
    x = torch.rand(1, 4, 3) + 0.1
    torch.testing.assert_close(gem(x, p=1.0), torch.nn.functional.normalize(x.mean(1), dim=-1))
