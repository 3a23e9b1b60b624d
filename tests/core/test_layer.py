"""A wrapped layer exposes its base module's attributes (model code reads e.g. ``projection.weight.dtype``)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_net

import peftkit as pk


def test_wrapped_layer_attributes_fall_through_to_the_base() -> None:
    net = make_tiny_net()
    conv = net.conv
    model = pk.adapt(net, pk.LoRAConfig(r=2, targets=["conv"]))
    wrapped = model.get_base_model().conv
    assert wrapped is not conv and wrapped.base_layer is conv
    assert wrapped.weight is conv.weight and wrapped.weight.dtype == torch.float32
    assert wrapped.kernel_size == (3, 3) and wrapped.out_channels == 6
    with pytest.raises(AttributeError):
        _ = wrapped.no_such_attribute
