"""The weightless "module" BaseView kind (block-level adapters): widths, fingerprint, no weight operation,
no merge, loading onto a different module type, and wrappers never nesting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.errors import BaseModelMismatch, NotMergeableError, UnsupportedLayerError


class Block(nn.Module):
    def __init__(self, d_in: int = 6, hidden: int = 10, d_out: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_in)
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.norm(x))))


class Net(nn.Module):
    def __init__(self, block: type[nn.Module] = Block) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def test_view_of_a_module() -> None:
    view = BaseView(Block())
    assert (view.kind, view.in_features, view.out_features) == ("module", 6, 4)
    assert view.describe() == {"type": "Block"}
    assert view.dtype == torch.float32 and view.bias is None
    with pytest.raises(TypeError, match="no weight"):
        view.apply(torch.randn(2, 6), torch.randn(4, 6))
    assert BaseView(nn.LayerNorm(5)).in_features == 5
    with pytest.raises(UnsupportedLayerError, match="no weight layer"):
        BaseView(nn.ReLU())


def test_block_adapter_save_load_merge(tmp_path) -> None:
    model = pk.adapt(Net(), pk.get_config("adaptformer", r=2, targets=["block"], dropout=0.0))
    with torch.no_grad():
        for a in model.adapter_modules("default").values():
            a.branch.up.weight.normal_()
    x = torch.randn(3, 6)
    want = model(x)
    with pytest.raises(NotMergeableError):
        model.merge()
    model.save(tmp_path / "ad")
    torch.testing.assert_close(pk.load(Net(), tmp_path / "ad")(x), want, atol=0, rtol=0)

    class Other(Block):
        pass

    with pytest.raises(BaseModelMismatch, match="block"):
        pk.load(Net(Other), tmp_path / "ad")


def test_no_nesting() -> None:
    model = pk.adapt(Net(), pk.LoRAConfig(r=2, targets=["fc1"]))
    with pytest.raises(UnsupportedLayerError, match="never nest"):
        model.add_adapter("blk", pk.get_config("adaptformer", r=2, targets=["block"]))
    assert model.adapter_names == ["default"]  # the failed add left the model as it was
