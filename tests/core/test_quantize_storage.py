"""``peftkit.quantize`` keeps only the quantised weights: no float copy of a replaced layer stays in the model.

hqq's ``HQQLinear(linear, del_orig=False)`` (used so the caller's ``linear`` is left as it was) keeps ``linear`` as
its submodule ``linear_layer``: the float weight would stay next to the 4-bit codes (the base then uses more memory
than the float one) and show up as an extra ``nn.Linear`` that adapter targets could match.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit.quantize import SCHEMES, quantize

pytestmark = pytest.mark.usefixtures("one_thread")

pytest.importorskip("bitsandbytes")
pytest.importorskip("hqq")


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_no_float_weight_stays_behind(scheme: str) -> None:
    model = mlp()
    original = model[0]
    weight = original.weight.detach().clone()
    quantize(model, scheme)
    assert not any(type(m) is nn.Linear for m in model.modules())  # no float layer left inside (bnb subclasses it)
    matrices = [(n, p.dtype) for n, p in model.named_parameters() if p.dim() >= 2 and p.dtype.is_floating_point]
    assert matrices == []
    assert torch.equal(original.weight, weight)  # the layer passed in is left as it was


def test_hqq4_holds_4_bit_codes_only() -> None:
    """The parameters and buffers of the hqq4 model are the packed codes and biases: about an eighth of the float
    weights' bytes (4 bits per weight; the per-group scales and zeros are hqq's ``meta``)."""
    model = mlp()
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() == 2)
    quantize(model, "hqq4")
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert held <= float_bytes / 8 + 4 * (256 + 128)  # codes, plus the float biases at most
