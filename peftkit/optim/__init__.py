"""Optimizers for adapters and low-rank training, by name (``Trainer`` / ``peftkit train --optim``).

========== ==========================================================================================
name       what
========== ==========================================================================================
adamw      ``torch.optim.AdamW``; weight decay on matrices only (the trainer's default)
adamw8bit  bitsandbytes ``AdamW8bit`` (8-bit blockwise moments; Dettmers et al., 2022), same groups
galore     :class:`~peftkit.optim.galore.GaLoreAdamW` over the trainable matrices (``rank``,
           ``update_proj_gap``, ``scale``, ``proj_type``, ``state_bits`` 32 or 8)
lorapro    :class:`~peftkit.optim.lorapro.LoRAPro` (equivalent-gradient adjustment of LoRA's A and B;
           ``full_adam`` False: LoRA-sized moments)
loraplus   :func:`~peftkit.optim.loraplus.loraplus` (``ratio`` = ηB/ηA, default 16; ``lr_embedding``)
allora     :class:`~peftkit.optim.allora.ALLoRAAdamW` (``eta``, ``apply`` "update" or "grad")
sst        :class:`~peftkit.optim.sst.SSTAdamW` (resets the sampled vectors' state at SST's rounds)
========== ==========================================================================================

``build_optimizer(name, model, lr=..., **options)`` builds any of them; every group records its starting
learning rate as ``base_lr``, which a schedule multiplies (LoRA+'s fast ``B`` group keeps its ratio).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from peftkit.core.quant_backends import import_backend
from peftkit.optim.allora import ALLoRAAdamW, allora
from peftkit.optim.errors import (
    GaLoreShapeError,
    NoLowRankPairsError,
    NoTrainableParametersError,
    OptimizerError,
)
from peftkit.optim.galore import GaLoreAdamW, galore_groups
from peftkit.optim.loraplus import loraplus, loraplus_groups
from peftkit.optim.lorapro import LoRAPro, lorapro
from peftkit.optim.params import LowRankPair, lowrank_pairs, trainable
from peftkit.optim.sst import SSTAdamW, sst

__all__ = [
    "OPTIMIZERS",
    "ALLoRAAdamW",
    "GaLoreAdamW",
    "GaLoreShapeError",
    "LoRAPro",
    "LowRankPair",
    "NoLowRankPairsError",
    "NoTrainableParametersError",
    "OptimizerError",
    "SSTAdamW",
    "allora",
    "build_optimizer",
    "check_optimizer",
    "decay_groups",
    "galore_groups",
    "loraplus",
    "loraplus_groups",
    "lorapro",
    "lowrank_pairs",
    "sst",
    "trainable",
]


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The trainer's default groups: matrices (and higher) with ``weight_decay``, vectors without."""
    params = trainable(model)
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _adamw(model: nn.Module, lr: float, weight_decay: float, betas: Any, eps: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(decay_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)


def _adamw8bit(model: nn.Module, lr: float, weight_decay: float, betas: Any, eps: float, **o: Any) -> Any:
    bnb = import_backend("bitsandbytes")
    return bnb.optim.AdamW8bit(decay_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, **o)


def _galore(model: nn.Module, lr: float, weight_decay: float, betas: Any, eps: float, **o: Any) -> GaLoreAdamW:
    bits = o.pop("state_bits", 32)
    groups = galore_groups(model, weight_decay=weight_decay, **o)
    return GaLoreAdamW(groups, lr=lr, betas=betas, eps=eps, state_bits=bits)


def _loraplus(model: nn.Module, lr: float, weight_decay: float, betas: Any, eps: float, **o: Any) -> Any:
    o.setdefault("ratio", 16.0)
    return loraplus(model, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, **o)


def _pairs_opt(cls: Callable[..., torch.optim.Optimizer]) -> Callable[..., torch.optim.Optimizer]:
    def build(model: nn.Module, lr: float, weight_decay: float, betas: Any, eps: float, **o: Any) -> Any:
        return cls(model, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, **o)

    return build


# name -> (builder, the options it takes)
_BUILDERS: dict[str, tuple[Callable[..., torch.optim.Optimizer], tuple[str, ...]]] = {
    "adamw": (_adamw, ()),
    "adamw8bit": (_adamw8bit, ("min_8bit_size", "percentile_clipping", "block_wise")),
    "galore": (_galore, ("rank", "update_proj_gap", "scale", "proj_type", "state_bits", "min_dim")),
    "lorapro": (_pairs_opt(LoRAPro), ("full_adam",)),
    "loraplus": (_loraplus, ("ratio", "lr_embedding")),
    "allora": (_pairs_opt(ALLoRAAdamW), ("eta", "apply")),
    "sst": (_pairs_opt(SSTAdamW), ()),
}
OPTIMIZERS = tuple(_BUILDERS)


def check_optimizer(name: str, options: dict[str, Any] | None = None) -> None:
    """Raise :class:`OptimizerError` for an unknown optimizer name or an option it does not take."""
    if name not in _BUILDERS:
        raise OptimizerError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    known = _BUILDERS[name][1]
    unknown = sorted(set(options or {}) - set(known))
    if unknown:
        takes = f"it takes {', '.join(known)}" if known else "it takes none"
        raise OptimizerError(f"optimizer {name!r} has no option(s) {unknown}; {takes}")


def build_optimizer(
    name: str,
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    **options: Any,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (see the module docstring) over ``model``'s trainable parameters.

    Raises:
        OptimizerError: unknown name or option (the message lists the valid ones).
        NoTrainableParametersError: the model has nothing to train.
        GaLoreShapeError, NoLowRankPairsError: the model does not fit the optimizer.
    """
    check_optimizer(name, options)
    trainable(model)  # the same error for every optimizer when nothing trains
    builder = _BUILDERS[name][0]
    optimizer = builder(model, lr, weight_decay, betas, eps, **options)
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
    return optimizer
