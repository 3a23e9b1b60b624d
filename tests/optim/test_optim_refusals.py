"""Bad input for the training-at-scale pieces (issue 15): each a specific error whose message names the fix.

* a method that cannot adapt a quantised layer is refused when the adapter is built (``UnsupportedLayerError``);
* GaLore on a parameter that is not 2-D (``GaLoreShapeError``);
* an optimizer asked for a model (or parameters) with nothing to train (``NoTrainableParametersError``), including
  ``GaLoreAdamW`` built directly from parameters, which torch would otherwise accept and never step.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.core.errors import UnsupportedLayerError
from peftkit.optim import GaLoreAdamW, GaLoreShapeError, NoTrainableParametersError, galore_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_method_that_cannot_adapt_a_quantised_layer_is_refused_at_adapt() -> None:
    pytest.importorskip("bitsandbytes")
    from peftkit.quantize import quantize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    quantize(model, "nf4")
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(UnsupportedLayerError, match=r"'convlora' cannot adapt '0' \(Linear4bit\); narrow `targets`"):
        pk.adapt(model, pk.get_config("convlora", r=2, targets=["0"]))
    assert [p.requires_grad for p in model.parameters()] == flags  # left as it was


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4)])
def test_galore_on_a_parameter_that_is_not_2d(shape: tuple[int, ...]) -> None:
    p = nn.Parameter(torch.zeros(shape))
    with pytest.raises(
        GaLoreShapeError, match=rf"shape {re.escape(str(shape))}.*put vectors and other tensors in a plain"
    ):
        GaLoreAdamW([{"params": [p], "rank": 2}], lr=1e-3)


def test_galore_adamw_without_trainable_parameters() -> None:
    frozen = nn.Linear(8, 8).requires_grad_(False)
    for params in ([], frozen.parameters(), [{"params": list(frozen.parameters()), "rank": 2}]):
        with pytest.raises(NoTrainableParametersError, match="no trainable parameters: add and activate an adapter"):
            GaLoreAdamW(params, lr=1e-3)
    with pytest.raises(NoTrainableParametersError, match="add and activate an adapter"):
        galore_groups(frozen, rank=2)
    # one trainable parameter is enough (the frozen ones ride along, as in torch's optimizers)
    assert isinstance(GaLoreAdamW([frozen.weight, nn.Parameter(torch.zeros(3))], lr=1e-3), GaLoreAdamW)
