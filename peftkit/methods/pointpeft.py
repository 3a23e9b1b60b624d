"""Point-PEFT (Tang et al., 2024, "Point-PEFT: Parameter-Efficient Fine-Tuning for 3D Pre-trained Models";
official code Ivan-Tang-3D/Point-PEFT, ``MAE/models/Point_Mask_Rev_FT_scan_cp.py``,
``MAE/models/adapter_super.py``).

Adapts a transformer block of a point-cloud encoder (Point-MAE-like: a cls token, then one token per point
group). For a block ``f`` with input tokens ``x [B, n, d]``:

1. **Point-prior prompt**: ``num_prompts`` learnable tokens ``P`` (trunc-normal std 0.02, dropout 0.1) are
   inserted after the ``skip_tokens`` leading (cls) tokens, the block runs on ``[x_cls; P; x_rest]`` and the
   prompt positions are removed from its output (``y``, same shape as ``f(x)``).
2. **Geometry-aware adapter**: ``y ← y + 0.7·Adp(u)`` with ``u = y − x`` the block's residual update (``u = y`` when
   the widths differ) and ``Adp(h) = h + W₂ QuickGELU(W₁ h)``; then local aggregation over the point tokens:
   ``c`` centres (farthest-point sampling), their ``k``-nearest neighbourhoods ``x_nb``,
   ``x_nb + Attn(LN(x_nb))``, max-pool over the neighbourhood, ``out_transform`` (Linear d→d), ``+ 0.3·x_centre``;
   propagated back to every token by inverse-distance interpolation over its 3 nearest centres (weights sum to
   1): ``x ← x + 0.3·interp``; then ``x ← Adp₁(x)``.

Init: Adp/Adp₁/out_transform weights xavier-uniform, biases N(0, 1e-6): **not** identity at init; not
mergeable. Trainable: ``P·d_in + 2(2·d·h + h + d) + d² + d`` (``h`` = adapter width).

*Decisions (inferred; the generic protocol hands an adapter only its module's input and output tokens)*:

* neighbourhoods, centres and interpolation distances use the **token features** (Point-MAE tokens carry
  their centre's positional embedding), not the xyz centres, which the block does not see;
* the neighbourhood attention is parameter-free (softmax of scaled dot products of the affine-free
  LayerNorm'd features) instead of the official frozen copy ``attn1`` of the block's attention;
* ``Adp`` reads the block's whole residual update ``u`` (attention + MLP) instead of the MLP output alone;
* the memory-bank ``cp_adapter`` enhancement of the prompt is not implemented;
* the official restricts prompts to the early layers (≤ 5): target those blocks with a second adapter whose
  ``num_prompts = 0`` elsewhere, or set it per module.
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
    InvalidConfigError,
    NonNegativeInt,
    PositiveFraction,
    PositiveInt,
    Probability,
    register,
)


@dataclass(kw_only=True)
class PointPEFTConfig(AdapterConfig):
    """Settings of Point-PEFT.

    Attributes:
        targets: the transformer blocks of the point encoder (default: ``blocks.N``).
        num_prompts: prompt tokens per block (0: no prompt; *inferred* default 10).
        prompt_dropout: dropout on the prompt tokens (spec 0.1).
        skip_tokens: leading tokens (cls) kept in front of the prompts and out of the geometry step.
        adapter_dim: hidden width ``h`` of ``Adp`` / ``Adp₁`` (*inferred* default 16).
        adapter_scale: weight of ``Adp(u)`` (spec 0.7).
        local_scale: weight of the centre feature and of the propagated local feature (spec 0.3).
        neighbours: ``k`` of the neighbourhoods (*inferred* default 8).
        centre_ratio: centres per point token (*inferred* default 0.5).
    """

    targets: list[str] | str = r"(.*\.)?blocks\.\d+"
    num_prompts: NonNegativeInt = 10
    prompt_dropout: Probability = 0.1
    skip_tokens: NonNegativeInt = 1
    adapter_dim: PositiveInt = 16
    adapter_scale: float = 0.7
    local_scale: float = 0.3
    neighbours: PositiveInt = 8
    centre_ratio: PositiveFraction = 0.5

    tiny_fields: ClassVar[dict] = {"num_prompts": 2, "adapter_dim": 4, "neighbours": 3}
    variant_fields: ClassVar[list[dict]] = [{"num_prompts": 0, "skip_tokens": 0}]


class GeometryAdapter(nn.Module):
    """``Adp(h) = h + W₂ QuickGELU(W₁ h)``."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, h: Tensor) -> Tensor:
        z = self.fc1(h)
        return h + self.fc2(z * torch.sigmoid(1.702 * z))  # QuickGELU


def farthest_points(tokens: Tensor, count: int) -> Tensor:
    """Indices ``[B, count]`` of farthest-point sampling over ``tokens [B, n, d]`` (start: token 0)."""
    b, n, _ = tokens.shape
    chosen = torch.zeros(b, count, dtype=torch.long, device=tokens.device)
    dist = torch.full((b, n), float("inf"), device=tokens.device)
    last = torch.zeros(b, dtype=torch.long, device=tokens.device)
    rows = torch.arange(b, device=tokens.device)
    for i in range(count):
        chosen[:, i] = last
        dist = torch.minimum(dist, (tokens - tokens[rows, last][:, None]).square().sum(-1))
        last = dist.argmax(-1)
    return chosen


def interpolation_weights(tokens: Tensor, centres: Tensor, k: int = 3) -> tuple[Tensor, Tensor]:
    """For every token, its ``k`` nearest centres ``[B, n, k]`` and inverse-distance weights summing to 1."""
    dist = torch.cdist(tokens, centres)
    near, idx = dist.topk(min(k, centres.shape[1]), dim=-1, largest=False)
    inv = 1.0 / (near + 1e-8)
    return idx, inv / inv.sum(-1, keepdim=True)


def _gather(tokens: Tensor, idx: Tensor) -> Tensor:
    """``tokens [B, n, d]`` gathered at ``idx [B, ...]`` → ``[B, ..., d]``."""
    b, d = tokens.shape[0], tokens.shape[-1]
    flat = idx.reshape(b, -1)
    return tokens.gather(1, flat[..., None].expand(-1, -1, d)).view(*idx.shape, d)


@register("pointpeft", PointPEFTConfig)
class PointPEFT(Adapter[PointPEFTConfig]):
    """Prompted block + geometry-aware adapter (see the module docstring)."""

    exempt: ClassVar[dict[str, str]] = {
        "identity_at_init": "spec: xavier-uniform adapters and prompt tokens, not identity at init",
        "mergeable": "spec: not mergeable (prompts, non-linear adapters, local aggregation)",
    }
    kinds = frozenset({"linear", None})

    def __init__(self, base: BaseView, config: PointPEFTConfig) -> None:
        super().__init__(base, config)
        d = base.out_features
        self.prompts = nn.Parameter(torch.empty(config.num_prompts, base.in_features)) if config.num_prompts else None
        self.prompt_dropout = nn.Dropout(config.prompt_dropout)
        self.adp = GeometryAdapter(d, config.adapter_dim)
        self.adp1 = GeometryAdapter(d, config.adapter_dim)
        self.out_transform = nn.Linear(d, d)

    def reset_parameters(self, base: BaseView) -> None:
        if self.prompts is not None:
            nn.init.trunc_normal_(self.prompts, std=0.02)
        for lin in (self.adp.fc1, self.adp.fc2, self.adp1.fc1, self.adp1.fc2, self.out_transform):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.normal_(lin.bias, std=1e-6)

    def _prompted(self, x: Tensor, base: BaseView) -> Tensor:
        assert self.prompts is not None
        s, p = self.config.skip_tokens, self.prompts.shape[0]
        prompts = self.prompt_dropout(self.prompts).to(x.dtype).expand(x.shape[0], -1, -1)
        y = base(torch.cat([x[:, :s], prompts, x[:, s:]], dim=1))
        return torch.cat([y[:, :s], y[:, s + p :]], dim=1)  # prompt tokens leave the sequence again

    def local_aggregate(self, tokens: Tensor) -> Tensor:
        """The local geometry step on point tokens ``[B, n, d]`` (centres, neighbourhoods, propagation)."""
        n, d = tokens.shape[1:]
        count = max(1, round(n * self.config.centre_ratio))
        with torch.no_grad():  # sampling and neighbour search choose indices; gradients flow through gathers
            centre_idx = farthest_points(tokens.detach(), count)
            centres_detached = _gather(tokens.detach(), centre_idx)
            nb_idx = torch.cdist(centres_detached, tokens.detach()).topk(
                min(self.config.neighbours, n), dim=-1, largest=False
            )[1]
        centres = _gather(tokens, centre_idx)  # [B, c, d]
        nb = _gather(tokens, nb_idx)  # [B, c, k, d]
        normed = F.layer_norm(nb, (d,))
        attn = torch.softmax(normed @ normed.transpose(-1, -2) / d**0.5, dim=-1)
        nb = nb + attn @ normed
        local = self.out_transform(nb.max(dim=2).values) + self.config.local_scale * centres
        with torch.no_grad():
            idx, weights = interpolation_weights(tokens.detach(), centres_detached)
        interp = (_gather(local, idx) * weights[..., None]).sum(dim=2)
        return tokens + self.config.local_scale * interp

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        if x.dim() != 3:
            raise InvalidConfigError(
                f"Point-PEFT adapts token sequences [batch, tokens, width], got shape {tuple(x.shape)}"
            )
        y = self._prompted(x, base) if self.prompts is not None else base_out
        update = y - x if x.shape == y.shape else y
        y = y + self.config.adapter_scale * self.adp(update)
        s = self.config.skip_tokens
        if y.shape[1] > s:
            points = self.adp1(self.local_aggregate(y[:, s:]))
            y = torch.cat([y[:, :s], points], dim=1)
        return y

    @classmethod
    def expected_trainable(cls, base: BaseView, config: PointPEFTConfig) -> int:  # type: ignore[override]
        d, h = base.out_features, config.adapter_dim
        return config.num_prompts * base.in_features + 2 * (2 * d * h + h + d) + d * d + d
