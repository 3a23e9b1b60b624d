"""CLIP2Point's Dual-Path Adapter (Huang et al., 2023, "CLIP2Point: Transfer CLIP to Point Cloud Classification
with Image-Depth Pre-training"; official code tyhuang0428/CLIP2Point, ``models/adapter.py`` (``SimplifiedAdapter``),
``models/dpa.py`` (``DPA``)).

A point cloud is rendered into ``V`` depth images; two frozen CLIP-style image encoders (one pre-trained on depth
by CLIP2Point, one the original CLIP) embed every view, and each path has its own simplified adapter over the
``V`` view features ``F ∈ R^{V×p}`` of an object:

``A(F) = Linear(p→p)(Drop(ReLU(BN₂(Linear(V·p→p)(flatten(Drop(BN₁(ω ⊙ F))))))))``

with learnable per-view weights ``ω ∈ R^V`` (init 0.5), ``BN₁ = BatchNorm1d(p)`` over all views of all objects,
``BN₂ = BatchNorm1d(p)`` over objects, dropout 0.075. The object's feature is
``g = normalize((A₁(E_depth(I)) + A₂(E_clip(I))) / 2)`` and its class logits are ``g`` against the normalised CLIP
text embeddings of the class prompts (:func:`class_logits`). ``p`` is the encoder's projection width (512 for
ViT-B/32; generalised here). Torch default init: **not identity at init** (a new head), not mergeable. Trainable
per path: ``V + 2p + V·p² + p + 2p + p² + p``.

**How it fits the protocol (a decision).** The adapter is one path's head, attached to the encoder's output
projection (HF ``visual_projection``, a Linear; default ``targets``): the encoder runs on the ``N·V`` renderings
(the ``V`` views of each object consecutive, as the official ``reshape(-1, V, p)``), the adapter groups the
projection's output rows into objects of ``V`` rows, computes ``A(F)`` per object and writes it into each of the
object's ``V`` rows, so the layer keeps its output shape (a row of a 3-D output ``[B, T, p]`` is a token: the
``B·T`` rows are grouped in order). :func:`object_features` takes one row per object back; :func:`dual_path`
fuses the two adapted encoders' outputs; :class:`DualPathAdapter` holds both encoders and does the whole forward.
The frozen encoders stay the base models of their :class:`~peftkit.AdaptedModel`, so saving, loading,
disabling and several adapters work as for any method. The conformance suite runs it with ``V = 1`` (its layers'
row counts share no other divisor); ``V > 1`` is covered by ``tests/methods/test_clip2point.py``.

*Decision*: BatchNorm uses batch statistics only in a training step (train mode with gradients; it then updates
its running statistics) and its running statistics otherwise, so a mixed batch equals its rows run one by one (the
official module uses batch statistics in any train-mode forward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.core.api import (
    AdaptedModel,
    Adapter,
    AdapterConfig,
    BaseView,
    InvalidConfigError,
    PositiveInt,
    Probability,
    register,
)


@dataclass(kw_only=True)
class CLIP2PointConfig(AdapterConfig):
    """Settings of one path of the Dual-Path Adapter.

    Attributes:
        targets: the encoder's output projection (default: HF CLIP's ``visual_projection``).
        views: ``V``, rendered views per object (official default 10).
        dropout: both dropouts (official 0.075).
        view_weight_init: initial value of every per-view weight ``ω`` (official 0.5).
    """

    targets: list[str] | str = r"(.*\.)?visual_projection"
    views: PositiveInt = 10
    dropout: Probability = 0.075
    view_weight_init: float = 0.5

    tiny_fields: ClassVar[dict] = {"views": 1}
    variant_fields: ClassVar[list[dict]] = [{"dropout": 0.0, "view_weight_init": 1.0}]


def _batch_norm(bn: nn.BatchNorm1d, x: Tensor) -> Tensor:
    """``bn`` with batch statistics only in a training step (see the module docstring)."""
    batch_stats = bn.training and torch.is_grad_enabled()
    if batch_stats and x.shape[0] < 2:
        raise InvalidConfigError(
            f"CLIP2Point's BatchNorm needs at least 2 objects in a training step, got {x.shape[0]} "
            "(batch several objects, or train with views > 1 objects per batch)"
        )
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, batch_stats, bn.momentum or 0.1, bn.eps)


@register("clip2point", CLIP2PointConfig)
class CLIP2PointAdapter(Adapter[CLIP2PointConfig]):
    """One path's simplified adapter over the ``V`` view features of each object (see the module docstring)."""

    kinds = frozenset({"linear"})
    exempt: ClassVar[dict[str, str]] = {
        "identity_at_init": "spec: a new head (per-view weights 0.5, torch default init), not identity at init",
        "mergeable": "spec: not mergeable (a non-linear head that mixes the views of an object)",
    }

    def __init__(self, base: BaseView, config: CLIP2PointConfig) -> None:
        super().__init__(base, config)
        p, v = base.out_features, config.views
        self.view_weights = nn.Parameter(torch.empty(v))  # ω
        self.bn1 = nn.BatchNorm1d(p)
        self.fc1 = nn.Linear(v * p, p)
        self.bn2 = nn.BatchNorm1d(p)
        self.fc2 = nn.Linear(p, p)
        self.drop1, self.drop2 = nn.Dropout(config.dropout), nn.Dropout(config.dropout)

    @torch.no_grad()
    def reset_parameters(self, base: BaseView) -> None:
        self.view_weights.fill_(self.config.view_weight_init)
        for m in (self.bn1, self.fc1, self.bn2, self.fc2):
            m.reset_parameters()  # torch default; BN: weight 1, bias 0, running mean 0 / var 1

    def head(self, feats: Tensor) -> Tensor:
        """``A(F)``: view features ``[N, V, p]`` → object features ``[N, p]``."""
        n, v, p = feats.shape
        h = feats * self.view_weights.to(feats.dtype)[None, :, None]
        h = self.drop1(_batch_norm(self.bn1, h.reshape(n * v, p)))  # BN₁ over every view of every object
        h = self.fc1(h.reshape(n, v * p))
        return self.fc2(self.drop2(F.relu(_batch_norm(self.bn2, h))))

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        v, p = self.config.views, base_out.shape[-1]
        rows = base_out.numel() // p
        if rows % v:
            raise InvalidConfigError(
                f"CLIP2Point with views={v} needs the projection's output rows grouped by object ({v} consecutive "
                f"views each), but it has {rows} rows (shape {tuple(base_out.shape)})"
            )
        obj = self.head(base_out.reshape(rows // v, v, p))
        return obj.to(base_out.dtype).repeat_interleave(v, dim=0).reshape(base_out.shape)

    @classmethod
    def expected_trainable(cls, base: BaseView, config: CLIP2PointConfig) -> int:  # type: ignore[override]
        p, v = base.out_features, config.views
        return v + 2 * p + (v * p * p + p) + 2 * p + (p * p + p)


def object_features(embeds: Tensor, views: int) -> Tensor:
    """One row per object ``[N, p]`` from an adapted encoder's output rows ``[N·V, p]`` (or ``[..., p]``)."""
    p = embeds.shape[-1]
    rows = embeds.reshape(-1, p)
    if rows.shape[0] % views:
        raise InvalidConfigError(f"{rows.shape[0]} rows are not objects of views={views} consecutive rows")
    return rows[::views]


def dual_path(depth_embeds: Tensor, clip_embeds: Tensor, views: int) -> Tensor:
    """``g = normalize((A₁ + A₂) / 2)`` ``[N, p]`` from the two adapted encoders' output rows."""
    fused = (object_features(depth_embeds, views) + object_features(clip_embeds, views)) * 0.5
    return F.normalize(fused, dim=-1)


def class_logits(features: Tensor, text_embeds: Tensor, scale: float = 100.0) -> Tensor:
    """``scale · g · normalize(t)ᵀ`` ``[N, classes]``: logits of unit object features against the text embeddings
    ``[classes, p]`` of the class prompts (CLIP's learned temperature is ≈ 100)."""
    return scale * features @ F.normalize(text_embeds, dim=-1).T


def _embeds(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    for key in ("image_embeds", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    raise TypeError(f"no image embeddings in an output of type {type(out).__name__}")


class DualPathAdapter(nn.Module):
    """The whole Dual-Path Adapter: ``renders [N, V, C, H, W]`` → unit object features ``g [N, p]``.

    ``depth_encoder`` and ``clip_encoder`` are the two encoders, each adapted with a :class:`CLIP2PointConfig` of
    the same ``views`` (``pk.adapt(encoder, CLIP2PointConfig(views=V))``); they are called with
    ``pixel_values`` and their ``image_embeds`` (or tensor output) is used.
    """

    def __init__(self, depth_encoder: AdaptedModel, clip_encoder: AdaptedModel, views: int) -> None:
        super().__init__()
        for name, enc in (("depth_encoder", depth_encoder), ("clip_encoder", clip_encoder)):
            if not isinstance(enc, AdaptedModel):
                raise InvalidConfigError(f"{name} must be an AdaptedModel with a clip2point adapter")
            for adapter_name in enc.active_adapters:
                cfg = enc.configs[adapter_name]
                if not isinstance(cfg, CLIP2PointConfig) or cfg.views != views:
                    raise InvalidConfigError(
                        f"{name}'s active adapter {adapter_name!r} must be clip2point with views={views}, "
                        f"got {type(cfg).__name__}" + (f" with views={cfg.views}" if hasattr(cfg, "views") else "")
                    )
        self.depth_encoder, self.clip_encoder, self.views = depth_encoder, clip_encoder, views

    def forward(self, renders: Tensor) -> Tensor:
        if renders.dim() != 5 or renders.shape[1] != self.views:
            raise InvalidConfigError(
                f"renders must be [objects, views={self.views}, channels, height, width], got {tuple(renders.shape)}"
            )
        flat = renders.flatten(0, 1)  # the V views of each object consecutive
        depth = _embeds(self.depth_encoder(pixel_values=flat))
        clip = _embeds(self.clip_encoder(pixel_values=flat))
        return dual_path(depth, clip, self.views)


__all__ = [
    "CLIP2PointAdapter",
    "CLIP2PointConfig",
    "DualPathAdapter",
    "class_logits",
    "dual_path",
    "object_features",
]
