"""The small AdamW loop the compression methods train with (PELA's distillation, LoRAPrune, LoRAM)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from peftkit.init._calibration import call


def model_loss(model: nn.Module, batch: Any) -> Tensor:
    """The model's own ``loss`` for a batch (Hugging Face models given ``labels``)."""
    return call(model, batch).loss


def adamw_steps(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    steps: int,
    lr: float,
    loss_fn: Callable[[nn.Module, Any], Tensor] = model_loss,
    after_backward: Callable[[int], Any] | None = None,
    weight_decay: float = 0.0,
    desc: str = "training",
    progress: bool = False,
) -> list[float]:
    """``steps`` AdamW steps on the parameters of ``model`` that require grad, cycling through ``batches``;
    ``after_backward(step)`` (1-based) runs between the backward and the optimiser step. The model is left in
    eval mode. Returns the losses."""
    data = list(batches)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    history = []
    try:
        for step in tqdm(range(1, steps + 1), desc=desc, disable=not progress, leave=False):
            loss = loss_fn(model, data[(step - 1) % len(data)])
            opt.zero_grad()
            loss.backward()
            if after_backward is not None:
                after_backward(step)
            opt.step()
            history.append(float(loss.detach()))
    finally:
        model.eval()
    return history
