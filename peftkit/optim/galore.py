"""GaLore (Zhao et al., 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection"; official
code: jiaweizzhao/GaLore, PyPI ``galore-torch``).

Full-rank training of 2-D weights with Adam moments kept in a rank-``r`` projection of the gradient. Per GaLore
parameter ``W (m × n)`` with gradient ``G``, the official ``GaLoreAdamW.step`` order:

1. every ``update_proj_gap`` steps (``t % T == 0``, ``t`` from 0) a projector from the SVD of the current
   gradient (float32): ``m >= n`` → right, ``P = Vhᵀ[:r]`` ``[r, n]``, ``R = G Pᵀ`` ``[m, r]``; else left,
   ``P = U[:, :r]`` ``[m, r]``, ``R = Pᵀ G`` ``[r, n]`` (``proj_type="std"``; ``"reverse_std"``, ``"left"``,
   ``"right"`` choose the side otherwise);
2. Adam on ``R``: ``M ← β1 M + (1 − β1) R``, ``V ← β2 V + (1 − β2) R²``, ``N = M / (√V + eps)``, step size
   ``lr · √(1 − β2ᵗ) / (1 − β1ᵗ)``; the moments are not reset when ``P`` changes;
3. back: ``G̃ = scale · N P`` (right) or ``scale · P N`` (left); ``W ← W − step_size · G̃``;
4. decoupled weight decay on the full ``W`` afterwards: ``W ← W − lr · wd · W``.

The side is stored when the projector is made (the official code re-derives it from the low-rank tensor's shape;
the same whenever ``r <= min(m, n)``). Moments use ``2·max(m, n)·r`` elements instead of Adam's ``2mn``, plus
the projector's ``min(m, n)·r``. ``state_bits=8`` keeps the projected moments in bitsandbytes' 8-bit blockwise
format and runs its 8-bit Adam update on ``R`` (as the official ``GaLoreAdamW8bit``, which needs CUDA; here the
same op on any device): eps then enters as ``√V / √(1 − β2ᵗ) + eps``, bitsandbytes' placement.

Parameter groups with a ``rank`` key are GaLore groups (keys ``rank``, ``update_proj_gap``, ``scale``,
``proj_type``, as the official optimizer); other groups are plain AdamW with the same update rule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.core.quant_backends import import_backend
from peftkit.optim.errors import GaLoreShapeError, NoTrainableParametersError, OptimizerError
from peftkit.optim.params import trainable

PROJ_TYPES = ("std", "reverse_std", "left", "right")
_BLOCK = 256  # bitsandbytes' 8-bit blockwise optimizer block size


def projector(grad: Tensor, rank: int, side: str) -> Tensor:
    """The orthonormal projector of ``grad``'s top-``rank`` singular subspace: right ``Vh[:r]`` ``[r, n]`` or left
    ``U[:, :r]`` ``[m, r]`` (SVD in float32, cast back to the gradient's dtype)."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    p = vh[:rank, :] if side == "right" else u[:, :rank]
    return p.to(grad.dtype)


def _side(shape: torch.Size, proj_type: str) -> str:
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def project(grad: Tensor, p: Tensor, side: str) -> Tensor:
    return grad @ p.T if side == "right" else p.T @ grad


def project_back(low: Tensor, p: Tensor, side: str) -> Tensor:
    return low @ p if side == "right" else p @ low


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW whose ``rank`` groups keep their moments in GaLore's low-rank projection (see the module docstring).

    Args:
        params: parameters or groups; a group with ``rank`` (and optionally ``update_proj_gap`` (200), ``scale``
            (0.25), ``proj_type`` ("std")) is projected. Its parameters must be matrices.
        lr, betas, eps, weight_decay, correct_bias: as the official ``GaLoreAdamW`` (eps default 1e-6).
        state_bits: 32 (float moments) or 8 (bitsandbytes 8-bit blockwise moments for the projected groups).

    Raises:
        GaLoreShapeError: a projected group holds a parameter that is not 2-D (the message names its shape).
        NoTrainableParametersError: no parameter given, or none that requires gradients.
        OptimizerError: bad settings (rank < 1, unknown ``proj_type``, ``state_bits`` not 8 or 32).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        state_bits: int = 32,
    ) -> None:
        if state_bits not in (8, 32):
            raise OptimizerError(f"state_bits must be 8 or 32, got {state_bits}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "correct_bias": correct_bias}
        params = list(params)
        if params:
            super().__init__(params, defaults)
        if not params or not any(p.requires_grad for group in self.param_groups for p in group["params"]):
            # (torch accepts frozen parameters and then never steps them: a run that trains nothing)
            raise NoTrainableParametersError(
                "GaLoreAdamW was given no trainable parameters: add and activate an adapter (pk.adapt / "
                "set_adapter) or unfreeze the weights to train, and pass those (galore_groups(model) does)"
            )
        self.state_bits = state_bits
        for group in self.param_groups:
            if "rank" not in group:
                continue
            group.setdefault("update_proj_gap", 200)
            group.setdefault("scale", 0.25)
            group.setdefault("proj_type", "std")
            if not (isinstance(group["rank"], int) and group["rank"] >= 1):
                raise OptimizerError(f"GaLore rank must be a positive integer, got {group['rank']!r}")
            if group["proj_type"] not in PROJ_TYPES:
                raise OptimizerError(f"proj_type must be one of {PROJ_TYPES}, got {group['proj_type']!r}")
            for p in group["params"]:
                if p.dim() != 2:
                    raise GaLoreShapeError(
                        f"GaLore projects matrices only; a parameter of shape {tuple(p.shape)} is in a GaLore group: "
                        "put vectors and other tensors in a plain group (galore_groups() does that)"
                    )

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, p.grad, group)
        return loss

    def _update(self, p: Tensor, grad: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        state.setdefault("step", 0)
        projected = "rank" in group
        if projected:
            if "projector" not in state or state["step"] % group["update_proj_gap"] == 0:
                side = _side(grad.shape, group["proj_type"])
                state["projector"] = projector(grad, group["rank"], side)
                state["side"] = side
                state["refreshes"] = state.get("refreshes", 0) + 1
            grad = project(grad, state["projector"], state["side"])
        if projected and self.state_bits == 8:
            update = self._adam_8bit(state, grad, group)
            p.add_(project_back(update, state["projector"], state["side"]), alpha=group["scale"])
        else:
            beta1, beta2 = group["betas"]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(grad)
                state["exp_avg_sq"] = torch.zeros_like(grad)
            state["step"] += 1
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            step_size = group["lr"]
            if group["correct_bias"]:
                step_size *= math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
            norm = m / v.sqrt().add_(group["eps"])
            if projected:
                norm = project_back(norm, state["projector"], state["side"]) * group["scale"]
            p.add_(norm, alpha=-step_size)
        if group["weight_decay"] > 0.0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])

    def _adam_8bit(self, state: dict[str, Any], grad: Tensor, group: dict[str, Any]) -> Tensor:
        """bitsandbytes' 8-bit blockwise Adam step on the projected gradient, applied to a zero tensor: the result
        is ``−lr · update`` in the projected shape (the official GaLoreAdamW8bit's trick)."""
        functional = import_backend("bitsandbytes").functional
        if "state1" not in state:
            blocks = math.ceil(grad.numel() / _BLOCK)
            kw = {"device": grad.device}
            state["state1"] = torch.zeros(grad.shape, dtype=torch.uint8, **kw)
            state["state2"] = torch.zeros(grad.shape, dtype=torch.uint8, **kw)
            state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, **kw)
            state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, **kw)
            state["qmap1"] = functional.create_dynamic_map(signed=True).to(grad.device)
            state["qmap2"] = functional.create_dynamic_map(signed=False).to(grad.device)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        out = torch.zeros(grad.shape, dtype=torch.float32, device=grad.device)
        functional.optimizer_update_8bit_blockwise(
            "adam", grad.float().contiguous(), out, state["state1"], state["state2"], beta1, beta2, 0.0, 0.0,
            group["eps"], state["step"], group["lr"], state["qmap1"], state["qmap2"], state["absmax1"],
            state["absmax2"], weight_decay=0.0,
        )  # fmt: skip
        return out.to(grad.dtype)

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors (moments, projectors, 8-bit block scales)."""
        return sum(
            v.numel() * v.element_size() for s in self.state.values() for v in s.values() if isinstance(v, Tensor)
        )


def galore_groups(
    model: nn.Module,
    *,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    weight_decay: float = 0.0,
    min_dim: int = 2,
) -> list[dict[str, Any]]:
    """Parameter groups for :class:`GaLoreAdamW` over ``model``'s trainable parameters: every matrix whose smaller
    side is at least ``min_dim`` projected at ``rank`` (a matrix narrower than ``rank`` keeps all its directions),
    everything else (vectors, norms) plain AdamW. (The official pretraining script picks the ``attn`` / ``mlp``
    linears by name; here the trainable matrices are the choice: freeze what should not train.)

    Raises:
        NoTrainableParametersError: nothing to train.
        GaLoreShapeError: no trainable matrix to project (only vectors, or convolution kernels).
    """
    params = trainable(model)
    matrices = [p for p in params if p.dim() == 2 and min(p.shape) >= min_dim]
    if not matrices:
        shapes = sorted({tuple(p.shape) for p in params})
        raise GaLoreShapeError(
            f"GaLore projects 2-D weights and none of the trainable parameters is a matrix with both sides >= "
            f"{min_dim} (shapes {shapes}): train linear weights (e.g. --method full), or choose another optimizer"
        )
    others = [p for p in params if not any(p is q for q in matrices)]
    galore = {"params": matrices, "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale}
    galore |= {"proj_type": proj_type, "weight_decay": weight_decay}
    groups = [galore] if matrices else []
    if others:
        groups.append({"params": others, "weight_decay": 0.0})
    return groups
