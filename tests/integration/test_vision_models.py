"""Issue-6 vision adapters on real vision models: a ``transformers`` ViT (tiny ``ViTConfig`` built in code) and a
small conv net. For each method: forward, backward (only adapter parameters get gradients), save/load gives the
same outputs. The method list is the issue-6 set that is registered (methods added later are picked up)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_vit
from torch import Tensor, nn

import peftkit as pk
from peftkit.errors import TargetModuleError

# Issue 6 (vision adapters) plus LoRA as the reference. Settings that a ViT needs beyond ``tiny()``:
VIT_SETTINGS: dict[str, dict] = {
    "lora": {"targets": ["q_proj", "v_proj"]},
    "poly": {"targets": ["q_proj", "v_proj"], "n_tasks": 3, "n_splits": 2},
    "dera": {"targets": ["o_proj"]},  # one frame per image: the whole token sequence
    "pointpeft": {"targets": r"(.*\.)?layers\.\d+"},  # whole ViT layers (cls token first)
    "padapter": {},
    "vlsm": {},
    "selavpr": {},
    "houlsby": {},
    "pfeiffer": {},
    "adaptformer": {},
    "mosa": {},
    "bi_adaptformer": {},
    "bi_lora": {"targets": ["q_proj", "v_proj"]},
    "zeroi2v": {},
    "earth_adapter": {},
    "cloud_adapter": {},
    "dd_adapter": {"targets": ["projection"]},
    "convlora": {"targets": ["projection"]},  # the patch-embedding conv
}
CONV_METHODS = ("lora", "convlora", "dd_adapter", "earth_adapter", "cloud_adapter")


def _vit() -> nn.Module:
    return tiny_vit(num_labels=5, intermediate_size=64)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, pixel_values: Tensor) -> Tensor:
        h = torch.relu(self.conv1(pixel_values))
        h = torch.relu(self.conv2(h))
        return self.head(h.mean((2, 3)))


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return ConvNet().eval()


def _pixels() -> Tensor:
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _logits(out) -> Tensor:
    return out if isinstance(out, Tensor) else out.logits


def _roundtrip(build, config: pk.AdapterConfig, tmp_path: Path, **call) -> None:
    try:
        model = pk.adapt(build(), config)
    except TargetModuleError as exc:
        pytest.skip(f"{config.method} does not apply to this model: {exc}")
    model.train()
    for m in model.modules():  # deterministic outputs for the save/load comparison below
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    out = _logits(model(pixel_values=_pixels(), **call))
    assert out.shape == (3, 5) and torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.tensor([0, 1, 2])).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    with torch.no_grad():
        for p in trainable:  # move off the init so save/load compares trained-looking values
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.01)
    model.eval()
    with torch.no_grad():
        want = _logits(model(pixel_values=_pixels(), **call))
    model.save(tmp_path / "adapter")
    loaded = pk.load(build(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(_logits(loaded(pixel_values=_pixels(), **call)), want, rtol=0, atol=0)


def _registered(names) -> list[str]:
    return [n for n in names if n in pk.list_methods()]


@pytest.mark.parametrize("method", _registered(VIT_SETTINGS))
def test_vit_forward_backward_save_load(method: str, tmp_path: Path) -> None:
    config = pk.get_method(method).config_class.tiny().replace(**VIT_SETTINGS[method])
    call = {"task_ids": torch.tensor([2, 0, 1])} if method == "poly" else {}
    _roundtrip(_vit, config, tmp_path, **call)


@pytest.mark.parametrize("method", _registered(CONV_METHODS))
def test_convnet_forward_backward_save_load(method: str, tmp_path: Path) -> None:
    cls = pk.get_method(method)
    if not cls.supports(_convnet().conv2):
        pytest.skip(f"{method} does not adapt Conv2d layers")
    _roundtrip(_convnet, cls.config_class.tiny().replace(targets=["conv1", "conv2"]), tmp_path)
