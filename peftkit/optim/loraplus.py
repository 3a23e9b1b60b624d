"""LoRA+ (Hayou, Ghosh & Yu, 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models"; official code:
nikhil-ghosh-berkeley/loraplus, and PEFT's ``create_loraplus_optimizer`` with the same grouping).

Only the optimizer's parameter groups change: the up-projection ``B`` learns ``ratio`` times faster than ``A``.
Groups (as both reference implementations build them):

* ``embedding``: parameters of adapters on embedding layers, ``lr = lr_embedding`` (default 1e-6);
* ``B``: every ``B`` and every other 1-D trainable (biases, norms) that takes weight decay, ``lr = lr · ratio``;
* ``B_no_decay``: the same without decay (biases, LayerNorm parameters), ``lr = lr · ratio``, ``weight_decay = 0``;
* ``A``: everything else (``A``, other matrices such as a task head), ``lr = lr``.

Putting biases and norms in the fast group is surprising but is what both implementations do; peftkit follows it.
``B`` is found from the adapter's low-rank form (:func:`peftkit.optim.params.lowrank_pairs`), not from a name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftkit.optim.errors import OptimizerError
from peftkit.optim.params import embedding_adapter_params, lowrank_pairs, no_decay_params, trainable


def loraplus_groups(
    model: nn.Module, *, lr: float, ratio: float, weight_decay: float = 0.0, lr_embedding: float = 1e-6
) -> list[dict[str, Any]]:
    """LoRA+'s four parameter groups (see the module docstring), empty ones included, in the reference order
    ``[A, embedding, B, B_no_decay]``.

    Raises:
        OptimizerError: ``ratio`` below 1 or ``lr`` not positive.
        NoTrainableParametersError: nothing to train.
    """
    if not ratio >= 1.0:
        raise OptimizerError(f"LoRA+ ratio (ηB/ηA) must be at least 1, got {ratio}; the paper suggests 16")
    if not lr > 0:
        raise OptimizerError(f"lr must be positive, got {lr}")
    params = trainable(model)
    ups = {id(pair.up) for pair in lowrank_pairs(model)}
    embedding, no_decay = embedding_adapter_params(model), no_decay_params(model)
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for p in params:
        if id(p) in embedding:
            groups["embedding"].append(p)
        elif id(p) in ups or p.ndim == 1:
            groups["B_no_decay" if id(p) in no_decay else "B"].append(p)
        else:
            groups["A"].append(p)
    return [
        {"params": groups["A"], "weight_decay": weight_decay, "lr": lr, "name": "A"},
        {"params": groups["embedding"], "weight_decay": weight_decay, "lr": lr_embedding, "name": "embedding"},
        {"params": groups["B"], "weight_decay": weight_decay, "lr": lr * ratio, "name": "B"},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * ratio, "name": "B_no_decay"},
    ]


def loraplus(
    model: nn.Module,
    *,
    lr: float,
    ratio: float,
    weight_decay: float = 0.0,
    lr_embedding: float = 1e-6,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """An ``optimizer_cls`` (default AdamW) over ``model``'s trainable parameters with LoRA+'s groups.

    Args:
        model: an adapted model (any ``nn.Module``: parameters of adapters without a low-rank form are in ``A``).
        lr: ``ηA``, the learning rate of ``A`` and of other matrices.
        ratio: ``ηB / ηA`` (at least 1; the paper recommends 2⁴ = 16 for LLaMA-scale models).
        weight_decay: decoupled weight decay of the groups that take it (PEFT: ``loraplus_weight_decay``).
        lr_embedding: learning rate of adapters on embeddings (PEFT: ``loraplus_lr_embedding``).
        optimizer_cls, kwargs: the optimizer and its other settings (betas, eps, ...).
    """
    groups = loraplus_groups(model, lr=lr, ratio=ratio, weight_decay=weight_decay, lr_embedding=lr_embedding)
    return optimizer_cls([g for g in groups if g["params"]], lr=lr, **kwargs)
