"""ALLoRA's adaptive learning rate (Huang & Balestriero, 2024, "ALLoRA: Adaptive Learning Rate Mitigates LoRA
Fatal Flaws"; *inferred* from the abstract, no public code).

Each row ``θ`` of a LoRA factor (a row of ``B``: one output unit, length ``r``; a row of ``A``: one rank component,
length ``in``) moves at a rate inversely proportional to its norm: its step is multiplied by

``1 / √(‖θ‖₂² + 1/η²)``,

``η`` at ``θ = 0`` (a fast escape from ``B = 0``) and ``≈ 1/‖θ‖`` once ``‖θ‖ ≫ 1/η``. Decisions (inferred): the norm
is per row, from the parameters before the step; ``apply="update"`` (default) scales AdamW's whole step (Adam's
``m/√v`` would cancel a gradient scale), ``apply="grad"`` scales the gradient before it. Other trainable
parameters take plain AdamW steps. With ``apply="update"`` AdamW's decoupled weight decay is part of the step
that is scaled. Use it with LoRA (or with the ``allora`` method built with ``grad_scaling=False``: that method
rescales gradients itself, and both would compound; the optimizer warns when it finds such adapters).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from torch import Tensor, nn

from peftkit.optim.errors import NoLowRankPairsError, OptimizerError
from peftkit.optim.params import lowrank_pairs, trainable


def row_factor(p: Tensor, eta: float) -> Tensor:
    """``1 / √(‖row‖² + 1/η²)`` per row of ``p`` (shape ``[rows, 1]``), summed in float32 at least (half-precision
    factors would round the squares; float64 factors stay float64)."""
    work = torch.promote_types(p.dtype, torch.float32)
    return torch.rsqrt(p.detach().to(work).pow(2).sum(dim=-1, keepdim=True) + 1.0 / eta**2).to(p.dtype)


class ALLoRAAdamW(torch.optim.AdamW):
    """AdamW whose low-rank factor rows move at ALLoRA's norm-adaptive rate (see the module docstring).

    Args:
        model: an adapted model with LoRA-shaped adapters.
        lr, betas, eps, weight_decay: AdamW's.
        eta: ``η`` (default 1.0, inferred).
        apply: ``"update"`` or ``"grad"``.

    Raises:
        NoLowRankPairsError: no trainable LoRA pair.
        OptimizerError: ``eta`` not positive, unknown ``apply``.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        eta: float = 1.0,
        apply: Literal["update", "grad"] = "update",
    ) -> None:
        if not eta > 0:
            raise OptimizerError(f"ALLoRA's eta must be positive, got {eta}")
        if apply not in ("update", "grad"):
            raise OptimizerError(f"apply must be 'update' or 'grad', got {apply!r}")
        params = trainable(model)
        pairs = lowrank_pairs(model)
        if not pairs:
            raise NoLowRankPairsError(
                "ALLoRA rescales the rows of LoRA factors and this model has no trainable (A, B) pair: adapt it with "
                "LoRA, or choose another optimizer"
            )
        compounding = [
            type(m).__name__ for m in model.modules() if getattr(getattr(m, "config", None), "grad_scaling", False)
        ]
        if compounding:
            warnings.warn(
                f"the model's {compounding[0]} adapters rescale their gradients themselves (grad_scaling=True) and "
                "the ALLoRA optimizer rescales the steps too: the factors compound. Build the adapters with "
                "grad_scaling=False, or use plain AdamW with them",
                stacklevel=2,
            )
        rows = {id(t): t for pair in pairs for t in (pair.down, pair.up)}
        groups: list[dict[str, Any]] = [{"params": list(rows.values()), "allora": True}]
        rest = [p for p in params if id(p) not in rows]
        if rest:
            groups.append({"params": rest, "allora": False})
        super().__init__(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.eta, self.apply = eta, apply

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        # Groups added later (Trainer.add_parameters) have no "allora" key: plain AdamW.
        scaled = [p for g in self.param_groups if g.get("allora") for p in g["params"] if p.grad is not None]
        factors = [row_factor(p, self.eta) for p in scaled]
        if self.apply == "grad":
            for p, f in zip(scaled, factors):
                p.grad.mul_(f)
            return super().step(closure)
        before = [p.detach().clone() for p in scaled]
        loss = super().step(closure)
        for p, old, f in zip(scaled, before, factors):
            p.copy_(old + (p - old) * f)
        return loss


def allora(model: nn.Module, *, lr: float, **kwargs: Any) -> ALLoRAAdamW:
    """:class:`ALLoRAAdamW` over ``model``."""
    return ALLoRAAdamW(model, lr=lr, **kwargs)
