"""SoRA (Ding et al., 2023, "Sparse Low-rank Adaptation of Pre-trained Language Models").

A LoRA pair of the largest rank ``r`` with a trainable gate ``g [r]`` between its factors:

``y = x Wᵀ + b + s · ((drop(x) Aᵀ) ⊙ g) Bᵀ``, ``s = alpha / r``, ``ΔW = s · B diag(g) A`` (exact merge).

Init (official ``src/lora.py``): ``A`` Kaiming-uniform, ``B = 0``, ``g ~ N(0, 1)``: identity at init.

Sparsity comes from two terms on the gate, each switchable (spec decision: implement both, defaults as the
official GLUE script):

* the proximal soft-threshold after each gate optimizer step, ``g ← sign(g) · max(|g| − λ₂, 0)``, threshold
  *not* multiplied by the learning rate (official ``src/sparse_optimizer.py``): :func:`sora_proximal_step`,
  and :meth:`SoRA.step` applies it after every optimizer step when ``proximal_in_step`` (the trainer calls
  ``step`` right after ``optimizer.step()``, which is where the official ``SparseAdamW`` applies it);
* the L1 term ``λ · mean|g|`` over every gate entry, added to the loss: :func:`sora_l1_penalty`.

The official code runs the gates in their own AdamW with weight decay 0; that optimizer split is the
trainer's business. After training, :meth:`SoRA.prune` gives the equivalent plain LoRA of rank
``|K|``, ``K = {i : g_i ≠ 0}``, with ``B' = B[:, K] diag(g_K)``, ``A' = A[K]``; :func:`prune_to_lora` does
that for a whole adapter (rank ``max |K|`` over layers, zero-padded; each layer keeps its own scale, including
per-module ``alpha`` / ``r`` overrides). Supported: ``nn.Linear``, ``Conv1D``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from peftkit.core.api import (
    AdaptedModel,
    Adapter,
    BaseView,
    LowRank,
    NonNegativeFloat,
    RankConfig,
    add_lowrank,
    init_lora_pair,
    input_dropout,
    lowrank_pair,
    register,
    require_rank_fits,
)

from .lora import LoRA, LoRAConfig, modules_in_all_adapters


@dataclass(kw_only=True)
class SoRAConfig(RankConfig):
    """Settings of SoRA (defaults: the official GLUE script).

    Attributes:
        r: the largest rank ``r_max`` (number of gates).
        alpha: scale numerator, ``s = alpha / r``. Default 16.
        dropout: dropout probability on the adapter branch's input (off in eval mode).
        l1_lambda: ``λ`` (``sparse_lambda``) of the L1 loss term ``λ · mean|g|``; 0 disables it. Default 10.
        prox_lambda: ``λ₂`` (``sparse_lambda_2``), the proximal soft-threshold; 0 disables it. Default 3e-4.
        proximal_in_step: apply the proximal step in :meth:`SoRA.step` (after every optimizer step).
    """

    alpha: float = 16.0
    l1_lambda: NonNegativeFloat = 10.0
    prox_lambda: NonNegativeFloat = 3e-4
    proximal_in_step: bool = True

    tiny_fields: ClassVar[dict] = {"r": 3, "alpha": 6.0}
    variant_fields: ClassVar[list[dict]] = [{"dropout": 0.1}]


@register("sora", SoRAConfig)
class SoRA(Adapter[SoRAConfig]):
    """Gated LoRA; see the module docstring."""

    def __init__(self, base: BaseView, config: SoRAConfig) -> None:
        super().__init__(base, config)
        require_rank_fits(config.r, base)
        self.scale = config.scale
        self.A, self.B = lowrank_pair(base, config.r)
        self.gate = nn.Parameter(torch.empty(config.r))
        self.dropout = input_dropout(config.dropout)

    @torch.no_grad()
    def reset_parameters(self, base: BaseView) -> None:
        init_lora_pair(self.A, self.B)
        nn.init.normal_(self.gate)

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        hidden = (self.dropout(x) @ self.A.T) * self.gate
        return add_lowrank(base_out, hidden, self.B, self.scale)

    def delta_weight(self, base: BaseView) -> Tensor:
        return self.scale * ((self.B * self.gate) @ self.A)

    def lowrank(self, base: BaseView) -> LowRank:
        return LowRank(self.A, self.B * self.gate, self.scale)

    @classmethod
    def expected_trainable(cls, base: BaseView, config: SoRAConfig) -> int:
        return config.r * (base.in_features + base.out_features + 1)

    # ------------------------------------------------------------------------------------------ sparsity
    @torch.no_grad()
    def proximal(self, threshold: float) -> int:
        """``g ← sign(g) · max(|g| − threshold, 0)``; returns the number of nonzero gates left."""
        self.gate.copy_(torch.sign(self.gate) * (self.gate.abs() - threshold).clamp_min(0))
        return int((self.gate != 0).sum())

    def effective_rank(self) -> int:
        """The number of nonzero gates ``|K|`` (the rank of the pruned LoRA)."""
        return int((self.gate != 0).sum())

    def step(self, global_step: int) -> None:
        """The proximal step that follows optimizer step ``global_step`` (the number of updates done); nothing at
        ``global_step = 0``, the call trainers make before the first update (the official ``SparseAdamW``
        thresholds after each update only)."""
        if global_step <= 0:
            return
        if self.config.proximal_in_step and self.config.prox_lambda > 0 and self.gate.requires_grad:
            self.proximal(self.config.prox_lambda)

    @torch.no_grad()
    def prune(self, base: BaseView) -> LoRA | None:
        """The equivalent plain LoRA of rank ``|K|`` (``None`` when every gate is zero: the adapter is a no-op)."""
        keep = (self.gate != 0).nonzero().flatten()
        if keep.numel() == 0:
            return None
        k = keep.numel()
        lora = LoRA(base, LoRAConfig(r=k, alpha=self.scale * k))
        lora.A.copy_(self.A[keep])
        lora.B.copy_(self.B[:, keep] * self.gate[keep])
        return lora


def _trainable_modules(model: nn.Module) -> list[SoRA]:
    """The SoRA modules being trained, of every adapter of ``model`` (the sparsity terms act on all of them)."""
    found = [m for m in modules_in_all_adapters(model, SoRA) if m.gate.requires_grad]
    if not found:
        raise ValueError("the model holds no trainable SoRA adapter")
    return found


def sora_proximal_step(model: nn.Module, threshold: float | None = None) -> int:
    """Soft-threshold the gates of every trainable SoRA module (``threshold``: each module's ``prox_lambda``
    when ``None``). Returns the number of nonzero gates left."""
    return sum(m.proximal(m.config.prox_lambda if threshold is None else threshold) for m in _trainable_modules(model))


def sora_l1_penalty(model: nn.Module, lam: float | None = None) -> Tensor:
    """``λ · Σ|g| / #gates`` over every gate entry of the trainable SoRA modules (add it to the loss);
    ``lam``: the modules' ``l1_lambda`` when ``None``."""
    modules = _trainable_modules(model)
    lam = modules[0].config.l1_lambda if lam is None else lam
    gates = torch.cat([m.gate for m in modules])
    return lam * gates.abs().sum() / gates.numel()


@torch.no_grad()
def prune_to_lora(model: AdaptedModel, name: str, new_name: str) -> LoRAConfig:
    """Add adapter ``new_name`` to ``model`` (an ``AdaptedModel``): a plain LoRA equivalent to the SoRA adapter
    ``name``, of rank ``max |K|`` over its layers (layers with fewer nonzero gates are zero-padded).

    Each layer keeps its own scale and dropout: where ``config.overrides`` gave some layers another ``alpha``,
    ``r`` or ``dropout``, the LoRA config gets per-module overrides (one per layer, by exact path) with
    ``alpha = s_layer · r_new``, so ``alpha / r_new`` is that layer's SoRA scale.

    Returns:
        the new adapter's config.
    """
    config = model.configs[name]
    if config.modules_to_save:
        raise ValueError("prune_to_lora does not carry modules_to_save over; prune the SoRA layers only")
    modules = model.modules_of(name, SoRA)
    pruned = {path: m.prune(model.base_view(path)) for path, m in modules.items()}
    r = max([p.config.r for p in pruned.values() if p is not None], default=1)
    targets = "|".join(re.escape(p) for p in modules)
    per_layer = {path: {"alpha": m.scale * r, "dropout": m.config.dropout} for path, m in modules.items()}
    shared = {"alpha": config.scale * r, "dropout": config.dropout}
    # Exact paths for every layer once any differs: a path key also matches longer paths as a suffix.
    overrides = per_layer if any(v != shared for v in per_layer.values()) else {}
    new = LoRAConfig(r=r, targets=targets, overrides=overrides, **shared)
    model.add_adapter(new_name, new)
    for path, lora in model.adapter_modules(new_name).items():
        lora.A.zero_()
        lora.B.zero_()
        if pruned[path] is not None:
            k = pruned[path].config.r
            lora.A[:k] = pruned[path].A
            lora.B[:, :k] = pruned[path].B
    return new
