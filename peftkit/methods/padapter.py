"""p-adapter (Wu et al., 2024, "p-Laplacian Adaptation for Generative Pre-trained Vision-Language Models";
official code wuhy68/p-Adapter, ``eff_blip/eff_modeling_blip.py``).

p-Laplacian message passing over the attention graph, added to the attention output:

* node features ``F = split_heads(W_i(·))`` (``B×H×n×(m/H)``, ``m = d/ρ``);
* edge re-weighting ``G_ij = ‖√(A_ij + ε)·(F_j − F_i) + ε‖₂^{p−2}`` (ε = 1e-8, official placement), ``Ã = A ⊙ G``;
* ``μ = 2μ₀ + μ₀·tanh(μ_raw)``, ``α_i = 1/(Σ_j Ã_ij + 2μ/p)``, ``β_i = α_i·2μ/p``;
* ``F' = diag(α) Ã F + diag(β) F``, heads merged → ``B×n×m``;
* ``h' = h + W_o(GELU(W_g(h)) ⊙ F')``.

Trainable: ``W_i, W_g: Linear(d→m)``, ``W_o: Linear(m→d)`` (biases), ``p`` (if learnable; init p₀ = 1.25) and
``μ_raw`` (init 0): ``3dm + 2m + d + 1 (+1)``. Init N(0, 0.02) weights, zero biases (BLIP ``_init_weights``):
**not** identity at init; not mergeable.

*Decision (inferred; the generic protocol hands an adapter only its module's input and output)*: the adapter
wraps the attention output projection ``O`` (``BertSelfOutput.dense``, ViT ``o_proj``, GPT-2 ``c_proj``), so
``h = O(ctx)`` is its ``base_out``. The frozen attention's probabilities ``A`` and values ``V`` are not visible
there, so the graph is rebuilt from what is: ``A = softmax(h_k h_kᵀ / √(d/H))`` per head ``k`` over the
head-split ``h`` (a parameter-free, frozen attention-like adjacency whose rows sum to 1 — as the real ``A``'s
do), and the node features are ``F = split_heads(W_i(h))`` (the official ``W_i(O(V))`` with ``V`` replaced by the
context ``ctx``, which is ``A V`` per head). The cross-attention bipartite-graph case and the FFN-side bottleneck
adapter are not part of this method (use a ``pfeiffer`` adapter on the FFN output alongside; the official FFN
adapter reads the FFN's residual input instead). Dropout on ``h`` is the base model's own, after the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.core.api import (
    Adapter,
    AdapterConfig,
    BaseView,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    UnsupportedLayerError,
    register,
)

EPS = 1e-8  # official ε (added under the square root and inside the norm)


@dataclass(kw_only=True)
class PAdapterConfig(AdapterConfig):
    """Settings of the p-adapter.

    Attributes:
        targets: the attention output projections (default: BERT, ViT and GPT-2 names).
        reduction: ``ρ``; the adapter width is ``m = d / ρ`` (spec default 8).
        heads: ``H``, graph heads (must divide ``m``; BERT-base uses 12 with ``m = 96``).
        p: initial ``p₀`` of the p-Laplacian (spec default 1.25).
        learnable_p: train ``p`` (spec default True).
        mu: ``μ₀`` (spec default 0.1); ``μ = 2μ₀ + μ₀ tanh(μ_raw)``.
    """

    targets: list[str] | str = r"(.*\.)?(attention\.output\.dense|attention\.o_proj|attn\.c_proj)"
    reduction: PositiveInt = 8
    heads: PositiveInt = 12
    p: PositiveFloat = 1.25
    learnable_p: bool = True
    mu: NonNegativeFloat = 0.1

    tiny_fields: ClassVar[dict] = {"reduction": 4, "heads": 2}


def p_laplacian_propagate(adjacency: Tensor, features: Tensor, p: Tensor, mu: Tensor) -> Tensor:
    """``F' = diag(α) Ã F + diag(β) F`` for adjacency ``A [B, H, n, n]`` and node features ``F [B, H, n, k]``
    (see the module docstring for ``G``, ``Ã``, ``α``, ``β``)."""
    diff = features.unsqueeze(2) - features.unsqueeze(3)  # [B, H, i, j, k] = F_j − F_i
    g = (torch.sqrt(adjacency + EPS).unsqueeze(-1) * diff + EPS).norm(dim=-1).pow(p - 2)
    weighted = adjacency * g
    ratio = 2 * mu / p
    alpha = 1.0 / (weighted.sum(-1, keepdim=True) + ratio)
    return alpha * (weighted @ features) + alpha * ratio * features


@register("padapter", PAdapterConfig)
class PAdapter(Adapter[PAdapterConfig]):
    """``h' = h + W_o(GELU(W_g(h)) ⊙ F')`` with ``F'`` the p-Laplacian propagation over the token graph."""

    exempt: ClassVar[dict[str, str]] = {
        "identity_at_init": "spec: BERT-style N(0, 0.02) init of W_i, W_g, W_o, not identity at init",
        "mergeable": "spec: not mergeable (graph propagation and GELU gate)",
    }

    def __init__(self, base: BaseView, config: PAdapterConfig) -> None:
        super().__init__(base, config)
        d = base.out_features
        m = d // config.reduction
        if m < 1 or m % config.heads:
            raise UnsupportedLayerError(
                f"p-adapter width m = d/reduction = {d}//{config.reduction} = {m} must be a positive multiple of "
                f"heads={config.heads}"
            )
        self.heads = config.heads
        self.W_i, self.W_g, self.W_o = nn.Linear(d, m), nn.Linear(d, m), nn.Linear(m, d)
        self.p = nn.Parameter(torch.empty(())) if config.learnable_p else None
        self.mu_raw = nn.Parameter(torch.empty(()))

    def reset_parameters(self, base: BaseView) -> None:
        for lin in (self.W_i, self.W_g, self.W_o):
            lin.weight.normal_(0.0, 0.02)
            lin.bias.zero_()
        if self.p is not None:
            self.p.fill_(self.config.p)
        self.mu_raw.zero_()

    def _split(self, t: Tensor) -> Tensor:
        b, n, width = t.shape
        return t.view(b, n, self.heads, width // self.heads).transpose(1, 2)

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        h = base_out if base_out.dim() == 3 else base_out.reshape(base_out.shape[0], -1, base_out.shape[-1])
        with torch.no_grad():  # the frozen attention-like graph (see the module docstring: inferred)
            hk = self._split(h)
            adjacency = torch.softmax(hk @ hk.transpose(-1, -2) / hk.shape[-1] ** 0.5, dim=-1)
        p = self.p if self.p is not None else torch.tensor(self.config.p, device=h.device)
        mu = 2 * self.config.mu + self.config.mu * torch.tanh(self.mu_raw)
        propagated = p_laplacian_propagate(adjacency, self._split(self.W_i(h)), p, mu)
        merged = propagated.transpose(1, 2).reshape(h.shape[0], h.shape[1], -1)
        out = h + self.W_o(F.gelu(self.W_g(h)) * merged)
        return out.view(base_out.shape)

    @classmethod
    def expected_trainable(cls, base: BaseView, config: PAdapterConfig) -> int:  # type: ignore[override]
        d = base.out_features
        m = d // config.reduction
        return 3 * d * m + 2 * m + d + 1 + (1 if config.learnable_p else 0)
