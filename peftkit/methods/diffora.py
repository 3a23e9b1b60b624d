"""DiffoRA (inferred; no official code found): "DiffoRA: Enabling Parameter-Efficient LLM Fine-Tuning via
Differential Low-Rank Matrix Adaptation".

Which modules get a LoRA is *searched* (DARTS-like "DAM"), then discretised; spec decisions (inferred):

* search phase (``phase="search"``): every candidate module ``i`` has a LoRA ``A_i, B_i`` and logits
  ``θ_i ∈ R²`` (init 0: ``γ = 0.5``); ``γ_i = softmax(θ_i)[0]`` is the probability of "adapt" and
  ``y = x Wᵀ + b + γ_i · s · B_i A_i drop(x)``, ``s = alpha / r``. Training alternates (first-order DARTS):
  LoRA weights on a train batch, ``θ`` on a held-out batch (:class:`DiffoRASearch`), for ``search_ratio`` of
  the steps (default 10%);
* discretisation (:func:`discretize`): keep the ``round(keep_ratio · N)`` modules with the largest ``γ``
  (default 0.5); the others lose their adapter;
* weight sharing: the kept modules keep their searched ``A_i, B_i`` and fine-tune with ``γ`` removed (= 1):
  a ``phase="finetune"`` DiffoRA adapter (no ``θ``) on exactly those modules.

Init as LoRA (``A`` Kaiming-uniform, ``B = 0``): identity. ``ΔW_i = γ_i · s · B_i A_i`` (search) or
``s · B_i A_i`` (fine-tune), exact. Supported: ``Linear`` and GPT-2 ``Conv1D``. No parity claimed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from peftkit.core.api import (
    AdaptedModel,
    Adapter,
    BaseView,
    Bound,
    LowRank,
    PositiveFraction,
    RankConfig,
    init_lora_pair,
    input_dropout,
    lowrank_pair,
    register,
    require_rank_fits,
)


@dataclass(kw_only=True)
class DiffoRAConfig(RankConfig):
    """Settings of DiffoRA (inferred defaults: LoRA ``r = 8``, ``alpha = 16``, keep half the modules).

    Attributes:
        r: LoRA rank of every candidate.
        alpha: scale numerator, ``s = alpha / r``.
        dropout: dropout on the adapter branch's input.
        phase: ``"search"`` (gated by ``γ = softmax(θ)[0]``, ``θ`` trainable) or ``"finetune"`` (no gate).
        keep_ratio: share of candidate modules kept by :func:`discretize`.
        search_ratio: share of all training steps spent searching (used by :class:`DiffoRASearch`).
    """

    alpha: float = 16.0
    phase: Literal["search", "finetune"] = "search"
    keep_ratio: PositiveFraction = 0.5
    search_ratio: Annotated[float, Bound(low=0, high=1, low_open=True, high_open=True)] = 0.1

    tiny_fields: ClassVar[dict] = {"r": 2, "alpha": 4.0}
    variant_fields: ClassVar[list[dict]] = [{"phase": "finetune", "dropout": 0.1}]


@register("diffora", DiffoRAConfig)
class DiffoRA(Adapter[DiffoRAConfig]):
    """LoRA gated by a searched module-selection probability; see the module docstring."""

    def __init__(self, base: BaseView, config: DiffoRAConfig) -> None:
        super().__init__(base, config)
        require_rank_fits(config.r, base)
        self.A, self.B = lowrank_pair(base, config.r)
        self.theta = nn.Parameter(torch.empty(2)) if config.phase == "search" else None
        self.dropout = input_dropout(config.dropout)

    def reset_parameters(self, base: BaseView) -> None:
        init_lora_pair(self.A, self.B)
        if self.theta is not None:
            self.theta.zero_()  # γ = softmax(0)[0] = 0.5

    def gamma(self) -> Tensor | None:
        """``γ = softmax(θ)[0]`` in the search phase, else ``None`` (γ removed)."""
        return None if self.theta is None else torch.softmax(self.theta, 0)[0]

    def _scale(self) -> Tensor | float:
        g = self.gamma()
        return self.config.scale if g is None else g * self.config.scale

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        return base_out + self._scale() * ((self.dropout(x) @ self.A.T) @ self.B.T)

    def delta_weight(self, base: BaseView) -> Tensor:
        return self._scale() * (self.B @ self.A)

    def lowrank(self, base: BaseView) -> LowRank:
        g = self.gamma()
        if g is None:
            return LowRank(self.A, self.B, self.config.scale)
        return LowRank(self.A, self.B * g, self.config.scale)

    def effective_rank(self) -> int:
        return self.config.r

    @classmethod
    def expected_trainable(cls, base: BaseView, config: DiffoRAConfig) -> int:
        return config.r * (base.in_features + base.out_features) + (2 if config.phase == "search" else 0)


def diffora_parameters(model: AdaptedModel, name: str) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(LoRA weights, architecture logits θ)`` of DiffoRA adapter ``name``, for two optimizers."""
    mods = model.modules_of(name, DiffoRA).values()
    weights = [p for m in mods for p in (m.A, m.B)]
    return weights, [m.theta for m in mods if m.theta is not None]


def gammas(model: AdaptedModel, name: str) -> dict[str, float]:
    """``{module path: γ}`` of a search-phase adapter."""
    return {p: float(m.gamma().detach()) for p, m in model.modules_of(name, DiffoRA).items() if m.theta is not None}


class DiffoRASearch:
    """First-order DARTS alternation: :meth:`step` takes one LoRA-weight step on a train batch, then one
    ``θ`` step on a held-out batch (each optimizer only holds its own parameters).

    Args:
        model: the ``AdaptedModel`` with search-phase DiffoRA adapter ``name`` active.
        loss_fn: ``loss_fn(model, batch) -> scalar``.
        lr: learning rate of the LoRA weights; ``arch_lr``: of ``θ`` (default 3e-3, inferred).
    """

    def __init__(
        self,
        model: AdaptedModel,
        name: str,
        loss_fn: Callable[[AdaptedModel, Any], Tensor],
        *,
        lr: float = 1e-3,
        arch_lr: float = 3e-3,
    ) -> None:
        self.model, self.loss_fn = model, loss_fn
        weights, thetas = diffora_parameters(model, name)
        if not thetas:
            raise ValueError(f"adapter {name!r} is not in the search phase")
        self.weights_opt = torch.optim.AdamW(weights, lr=lr)
        self.arch_opt = torch.optim.Adam(thetas, lr=arch_lr, betas=(0.5, 0.999))

    def step(self, train_batch: Any, val_batch: Any) -> tuple[float, float]:
        """One alternation; returns ``(train loss, held-out loss)``."""
        losses = []
        for batch, opt in ((train_batch, self.weights_opt), (val_batch, self.arch_opt)):
            self.weights_opt.zero_grad(set_to_none=True)
            self.arch_opt.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.model, batch)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        self.weights_opt.zero_grad(set_to_none=True)
        self.arch_opt.zero_grad(set_to_none=True)
        return losses[0], losses[1]


@torch.no_grad()
def discretize(model: AdaptedModel, name: str, new_name: str | None = None) -> DiffoRAConfig:
    """Keep the ``round(keep_ratio · N)`` modules (at least 1) of search adapter ``name`` with the largest
    ``γ``; replace it by a fine-tune-phase adapter ``new_name`` (default: ``name``) on exactly those modules,
    initialised with their searched ``A``, ``B`` (weight sharing; ``γ`` removed). Returns the new config."""
    config: DiffoRAConfig = model.configs[name]
    if config.phase != "search":
        raise ValueError(f"adapter {name!r} is not in the search phase")
    if config.modules_to_save:
        raise ValueError("discretize does not carry modules_to_save over")
    g = gammas(model, name)
    n_keep = max(1, round(config.keep_ratio * len(g)))
    keep = sorted(g, key=lambda p: g[p], reverse=True)[:n_keep]
    mods = model.modules_of(name, DiffoRA)
    saved = {p: (mods[p].A.detach().clone(), mods[p].B.detach().clone()) for p in keep}
    was_active = name in model.active_adapters
    new_name = new_name or name
    if new_name == name:
        model.delete_adapter(name)
    targets = "|".join(rf"^{re.escape(p)}$" for p in keep)
    new = config.replace(phase="finetune", targets=targets)
    model.add_adapter(new_name, new, activate=was_active or None)
    for p, m in model.modules_of(new_name, DiffoRA).items():
        m.A.copy_(saved[p][0])
        m.B.copy_(saved[p][1])
    return new
