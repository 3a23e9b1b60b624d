"""Which parameters an optimizer acts on, found from the model's structure (never from parameter names).

A low-rank pair is an adapter module whose :meth:`~peftkit.core.protocol.Adapter.lowrank` answers its own
parameters ``(down = A [r, in], up = B [out, r], scale)``: LoRA and the LoRA-shaped methods. Adapters without
that form (or whose factors are not plain parameters, e.g. LoRA with a residual offset) are not pairs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from torch import Tensor, nn

from peftkit.core.layer import AdaptedLayer
from peftkit.optim.errors import NoTrainableParametersError

_NORMS = (nn.LayerNorm,)  # as Hugging Face's ALL_LAYERNORM_LAYERS, which PEFT's LoRA+ uses


@dataclass(frozen=True)
class LowRankPair:
    """One adapted layer's trainable factors: ``ΔW = scale · up · down`` (``down = A [r, in]``, ``up = B [out, r]``)."""

    path: str
    down: nn.Parameter
    up: nn.Parameter
    scale: float
    kind: str  # the base layer kind ("linear", "embedding", "conv2d")


def trainable(model: nn.Module | Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """The parameters that require gradients, each once, in model order.

    Raises:
        NoTrainableParametersError: there are none (no active adapter, or everything frozen).
    """
    params = model.parameters() if isinstance(model, nn.Module) else model
    found = list({id(p): p for p in params if p.requires_grad}.values())
    if not found:
        raise NoTrainableParametersError(
            "the model has no trainable parameters: add and activate an adapter (pk.adapt / set_adapter), or "
            "unfreeze the weights to train"
        )
    return found


def _own(tensor: Tensor, module: nn.Module) -> nn.Parameter | None:
    return next((p for p in module.parameters() if p is tensor), None)


def lowrank_pairs(model: nn.Module) -> list[LowRankPair]:
    """Every trainable low-rank pair in ``model`` (see the module docstring), in model order."""
    return list(_pairs(model))


def _pairs(model: nn.Module) -> Iterator[LowRankPair]:
    for path, layer in model.named_modules():
        if not isinstance(layer, AdaptedLayer):
            continue
        for name, adapter in layer.adapters.items():
            form = adapter.lowrank(layer.base)
            if form is None:
                continue
            down, up = _own(form.down, adapter), _own(form.up, adapter)
            if down is None or up is None or not (down.requires_grad and up.requires_grad):
                continue
            yield LowRankPair(f"{path}.{name}", down, up, float(form.scale), layer.base.kind)


def embedding_adapter_params(model: nn.Module) -> set[int]:
    """``id`` of every trainable parameter of an adapter on an embedding layer."""
    return {
        id(p)
        for layer in model.modules()
        if isinstance(layer, AdaptedLayer) and layer.base.kind == "embedding"
        for adapter in layer.adapters.values()
        for p in adapter.parameters()
        if p.requires_grad
    }


def no_decay_params(model: nn.Module) -> set[int]:
    """``id`` of every parameter that takes no weight decay: biases and normalisation layers' parameters (the rule
    of Hugging Face's Trainer, which PEFT's LoRA+ follows), found by module type and attribute name."""
    out: set[int] = set()
    for module in model.modules():
        for attr, p in module.named_parameters(recurse=False):
            if isinstance(module, _NORMS) or attr == "bias":
                out.add(id(p))
    return out
