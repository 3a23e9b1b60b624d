"""The checks that stop a training run instead of training on garbage: the gradient norm (NaN / inf checked
before ``optimizer.step``), the message naming the parameters with non-finite gradients, and the divergence
rule of ``TrainConfig.divergence_*``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.train.config import TrainConfig
from peftkit.train.errors import NonFiniteGradientError, TrainingDivergedError

# Names of the parameters with non-finite gradients listed in NonFiniteGradientError (the rest are counted).
NAMES_SHOWN = 3


def grad_norm(params: Sequence[Tensor]) -> float:
    """The global L2 norm of the gradients of ``params`` (``None`` gradients skipped): NaN or inf exactly when
    a gradient entry is. Computed as ``clip_grad_norm_`` does, except that finite gradients whose squares
    overflow the gradient dtype (entries above ~1e19 in float32) are measured again in float64 rather than
    reported as an infinite norm."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    device = grads[0].device
    norms = torch._foreach_norm(grads)  # one kernel per device/dtype group, as clip_grad_norm_ uses
    total = float(torch.linalg.vector_norm(torch.stack([n.to(device, torch.float32) for n in norms])))
    if math.isinf(total) and all(bool(torch.isfinite(g).all()) for g in grads):
        norms = [torch.linalg.vector_norm(g, dtype=torch.float64).to(device) for g in grads]
        total = float(torch.linalg.vector_norm(torch.stack(norms)))
    return total


def non_finite_gradients(
    model: nn.Module, params: Sequence[Tensor], norm: float, loss: float, step: int, epoch: int
) -> NonFiniteGradientError:
    """The error for optimizer step ``step`` (1-based) whose gradient norm ``norm`` is not finite although the
    loss is: it names the parameters with NaN / inf gradients (read them before clearing the gradients)."""
    names = {id(p): n for n, p in model.named_parameters()}
    bad = [
        names.get(id(p), f"<parameter {i}>")
        for i, p in enumerate(params)
        if p.grad is not None and not bool(torch.isfinite(p.grad).all())
    ]
    where = f"at step {step} (epoch {epoch}) although the loss is finite ({loss:.4g})"
    kept = f"stopped before this update: the parameters are those after step {step - 1}"
    if not bad:  # float64 gradients whose norm overflows even in float64
        return NonFiniteGradientError(
            f"the gradient norm is {norm} {where}: every gradient entry is finite, but so large that their norm "
            f"overflows; {kept}. Likely cause: exploding gradients (lower the learning rate)."
        )
    shown = ", ".join(bad[:NAMES_SHOWN]) + (f" and {len(bad) - NAMES_SHOWN} more" if len(bad) > NAMES_SHOWN else "")
    return NonFiniteGradientError(
        f"gradients are NaN or infinite {where}, in {len(bad)} of {len(params)} trained tensors: {shown}; "
        f"{kept}. Likely causes: an operation whose gradient is undefined at these values in the loss or the "
        "model (sqrt or a power below 1 at 0, log of 0, a division by 0, the norm of a zero vector), a float16 "
        "overflow, or a NaN produced in a custom backward; torch.autograd.set_detect_anomaly(True) names the "
        "operation."
    )


class DivergenceCheck:
    """The rule of ``TrainConfig.divergence_*``: the mean loss of ``patience`` consecutive windows of ``window``
    steps each above ``factor`` times the first step's loss. Its state (:meth:`state_dict`) is part of a
    checkpoint, so a resumed run applies the rule as the uninterrupted run would."""

    def __init__(self, config: TrainConfig) -> None:
        self.factor, self.window, self.patience = (
            config.divergence_factor,
            config.divergence_window,
            config.divergence_patience,
        )
        self.lr = config.lr
        self.reference: float | None = None
        self.losses: list[float] = []
        self.windows_above = 0

    def state_dict(self) -> dict[str, Any]:
        """The rule's progress as JSON values."""
        return {"reference": self.reference, "losses": list(self.losses), "windows_above": self.windows_above}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self.reference = state["reference"]
        self.losses = [float(x) for x in state["losses"]]
        self.windows_above = int(state["windows_above"])

    def update(self, step: int, loss: float) -> None:
        """Record optimizer step ``step``'s loss; raise :class:`TrainingDivergedError` when the rule fires."""
        if self.factor is None:
            return
        if self.reference is None:
            self.reference = loss
        if self.reference <= 0:
            return
        self.losses.append(loss)
        if len(self.losses) < self.window:
            return
        mean = sum(self.losses) / len(self.losses)
        self.losses.clear()
        self.windows_above = self.windows_above + 1 if mean > self.factor * self.reference else 0
        if self.windows_above >= self.patience:
            first = step - self.patience * self.window + 1
            raise TrainingDivergedError(
                f"training diverged: the mean loss of each of the {self.patience} windows of {self.window} steps "
                f"from step {first} to step {step} stayed above {self.factor:g}x the first step's loss "
                f"({self.reference:.4g}); the last window's mean is {mean:.4g}. Stopped at step {step}. Lower the "
                f"learning rate (peak lr {self.lr:g}) and keep max_grad_norm set; TrainConfig(divergence_factor=None) "
                "turns this check off."
            )
