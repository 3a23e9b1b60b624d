"""The LoRA-SB initialisation (Ponkshe et al., 2024, "Initialization using Update Approximation is a Silver
Bullet for Extremely Efficient Low-Rank Fine-Tuning").

(1) Gradients of the target weights on a few training examples (official: 50 examples in batches of 3,
``model.train()``, summed over batches); (2) the processed update ``ΔŴ = −η_eff · sign(Σ G)``,
``η_eff = lr / (warmup_ratio · total_steps)`` (``raw_grad=True``: ``−η_eff · Σ G``, the spec's option);
(3) ``U, S, V = svd_lowrank(ΔŴᵀ, q=r, niter=10)`` with seed 42 → ``A = Uᵀ`` (``[r, in]``), ``B = V``
(``[out, r]``), ``R = diag(S) / s`` (``s = 1``). ``W`` is not reduced, so at init
``W_eff = W + B diag(S) A ≈ W + rank_r(ΔŴ)``. Decisions (inferred): each batch's loss is ``loss_fn``'s value
(the official divides a summed loss by the batch size: the same for a mean loss); the factors keep the
adapter's dtype (the official casts to bf16); singular pairs follow the spec's sign convention.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from peftkit.core.config import AdapterConfig
from peftkit.core.errors import InvalidConfigError
from peftkit.core.protocol import require_positive_int
from peftkit.init._calibration import LossFn, per_batch_gradients, seeded, target_layers
from peftkit.methods.lora import fix_signs

if TYPE_CHECKING:
    from peftkit.core.model import AdaptedModel


@torch.no_grad()
def lorasb_factors(update: Tensor, r: int, *, niter: int = 10, seed: int = 42) -> tuple[Tensor, Tensor, Tensor]:
    """``(A [r, in], B [out, r], S [r])`` with ``B diag(S) A`` the rank-``r`` truncated SVD of ``update``
    (``svd_lowrank(updateᵀ, q=r, niter)``, seeded)."""
    with seeded(seed, update.device):
        u_in, s, v_out = torch.svd_lowrank(update.float().T, q=r, niter=niter)
    b, a = fix_signs(v_out, u_in.T)  # left vectors of the update are V_out
    return a, b, s


class LoRASB:
    """LoRA-SB initialiser: ``pk.adapt(model, pk.get_config("lorasb", r=8, alpha=8), init=pk.init.LoRASB(
    batches, total_steps=1000))``.

    Args:
        batches: training batches for the gradient estimate (official: 50 examples, batches of 3).
        total_steps: the planned number of optimiser steps ``T`` (for ``η_eff``).
        loss_fn: ``loss_fn(model, batch) -> scalar``; default ``model(**batch).loss``.
        lr: the planned learning rate (spec default 1e-4).
        warmup_ratio: the planned warm-up fraction (spec default 0.02).
        raw_grad: use the raw summed gradient instead of its sign (spec option).
        niter: subspace iterations of the randomised SVD (official 10).
        seed: seed of the randomised SVD (official 42).
    """

    def __init__(
        self,
        batches: Iterable[Any],
        *,
        total_steps: int,
        loss_fn: LossFn | None = None,
        lr: float = 1e-4,
        warmup_ratio: float = 0.02,
        raw_grad: bool = False,
        niter: int = 10,
        seed: int = 42,
    ) -> None:
        require_positive_int("total_steps", total_steps)
        require_positive_int("niter", niter)
        if not lr > 0 or not 0 < warmup_ratio <= 1:
            raise InvalidConfigError(
                f"need lr > 0 and 0 < warmup_ratio <= 1, got lr={lr!r}, warmup_ratio={warmup_ratio!r}"
            )
        self.batches, self.loss_fn, self.total_steps = batches, loss_fn, total_steps
        self.lr, self.warmup_ratio, self.raw_grad, self.niter, self.seed = lr, warmup_ratio, raw_grad, niter, seed

    @property
    def step_size(self) -> float:
        """``η_eff = lr / (warmup_ratio · total_steps)``."""
        return self.lr / (self.warmup_ratio * self.total_steps)

    def prepare(self, config: AdapterConfig) -> AdapterConfig:
        if type(config).method != "lorasb":
            raise InvalidConfigError(
                f"pk.init.LoRASB initialises a 'lorasb' adapter (pk.get_config('lorasb', r=...)), got method "
                f"{type(config).method!r}"
            )
        return config

    def updates(self, model: AdaptedModel, name: str) -> dict[str, Tensor]:
        """``{module path: ΔŴ}`` (float32, ``[out, fan_in]``)."""
        total: dict[str, Tensor] = {}
        for _, grads in per_batch_gradients(model, name, self.batches, self.loss_fn, "LoRA-SB gradients"):
            for path, g in grads.items():
                total[path] = total[path] + g if path in total else g
        if not total:
            raise InvalidConfigError("LoRA-SB got no calibration batches")
        return {path: -self.step_size * (g if self.raw_grad else g.sign()) for path, g in total.items()}

    @torch.no_grad()
    def apply(self, model: AdaptedModel, name: str) -> None:
        updates = self.updates(model, name)
        for path, (_, adapter) in target_layers(model, name).items():
            a, b, s = lorasb_factors(updates[path], adapter.config.r, niter=self.niter, seed=self.seed)
            adapter.A.copy_(a)
            adapter.B.copy_(b)
            adapter.R.copy_(torch.diag(s) / adapter.scale)
