"""UrbanSAM's invariance-inspired adapters (Li et al., 2025, "UrbanSAM: Learning Invariance-Inspired Adapters for
Segment Anything Models in Urban Construction"): a Uscaling-Adapter that encodes the image at several dyadic
scales with one shared light adapter, and an Alignment module that lets the SAM image encoder's trunk tokens read
those features through masked cross-attention.

**No public code was found; every structural choice below is inferred from the paper's description** (a learnable
prompter built on multi-resolution analysis whose features are aligned with the trunk by masked cross-attention).

**Uscaling-Adapter** (``c`` = ``hidden``, ``L`` = ``scales``), on an image or feature map ``I [B, C_in, H, W]``:

1. *Anchor*: ``J = R(I)``, ``I`` resampled to a fixed reference grid ``pyramid_grid`` (``R``: block averaging when
   it shrinks both sides, bilinear otherwise). The scales are taken relative to this grid, not to the input's pixel
   count, which is what makes the output invariant to a rescaling of the input: a 2× (nearest) upsampled image has
   the same block averages, so the same ``J``; any other resampling changes ``J`` only by the resampling error, and
   ``U`` by at most its Lipschitz constant times that error (``tests/methods/test_urbansam.py`` checks both).
2. *Pyramid*: ``P₀ = J``, ``P_l = avgpool₂(P_{l−1})`` (scales 1, 1/2, 1/4, ...).
3. *Shared light adapter* on every level: ``f = Conv1×1(c→c) ∘ GELU ∘ DWConv3×3(c) ∘ GELU ∘ Conv1×1(C_in→c)``
   (the same weights at every scale: MRA's one filter across dyadic scales).
4. *Aggregation*: ``U = Σ_l w_l · up(f(P_l))`` on the reference grid (bilinear ``up``), with scale-normalised
   weights ``w = softmax(α)`` (``α ∈ R^L`` learnable, 0 at init: uniform ``1/L``; the weights sum to 1, so the
   magnitude of ``U`` does not depend on ``L``).

**Alignment** (``h`` = ``heads``), on the trunk tokens ``T [B, N, d]`` of the adapted module's output:
``T ← T + W_o · MaskedAttn(q = W_q LN(T), k = W_k U, v = W_v U)`` over the ``M`` cells of ``U``. The mask keeps
the attention on the adapter's predicted object regions: ``m = W_m U`` (one logit per cell) adds ``log σ(m_j)`` to
every query's logit for key ``j`` (*inferred*: a soft, differentiable form of Mask2Former's hard ``σ(m) < 0.5``
mask, so the mask predictor trains from the task loss alone; :meth:`UrbanSAM.object_logits` exposes ``m`` for an
auxiliary mask loss). ``LN`` has no affine parameters. ``W_o`` (weight and bias) is zero-initialised (a toolkit
decision): **identity at init**. Not mergeable (attention, non-linear branch).

Trainable: Uscaling ``C_in·c + c + 10c + c² + c + L``; Alignment ``2cd + d + 2c² + 4c + 1``. Other layers: torch
default init.

**Wiring (roles).** The Uscaling-Adapter should see the image, the alignment sits at the encoder blocks, and an
adapter only sees its own module, so an adapter has a ``role`` (per module through ``overrides``;
:func:`urbansam_config` builds it for SAM-style names): ``"uscaling"`` on a module whose input is the image (the
patch-embedding conv; its own output is unchanged) publishes ``U`` for the forward in flight under the config's
``context`` key (the call's ``ForwardContext.state``); ``"alignment"`` at a block reads it; ``"both"`` (default,
self-contained: what the conformance suite checks) computes ``U`` from the adapted module's own input.

Tensor layouts: a Conv2d's input and output are ``[B, C, H, W]``; a Linear's are token sequences ``[B, N, C]``
(the first ``prefix_tokens`` are left out, the rest form the most square grid) or channels-last maps; a whole
block's 4-D tensors are ``[B, H, W, C]`` when ``channels_last`` (SAM's blocks, the default) and ``[B, C, H, W]``
otherwise.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.core.api import (
    Adapter,
    AdapterConfig,
    BaseView,
    ForwardContext,
    InvalidConfigError,
    NonNegativeInt,
    PositiveInt,
    register,
)
from peftkit.methods._feature_maps import to_map

#: The blocks of a SAM image encoder (bare: ``blocks.N`` / ``layers.N``; inside a SAM model: ``image_encoder.blocks.N``
#: / ``vision_encoder.layers.N``), and not the mask decoder's ``transformer.layers.N``.
SAM_BLOCKS = r"((.*\.)?(image_encoder|vision_encoder)\.)?(blocks|layers)\.\d+"


@dataclass(kw_only=True)
class UrbanSAMConfig(AdapterConfig):
    """Settings of UrbanSAM's adapters (all defaults inferred; the paper's code is not public).

    Attributes:
        targets: default: the blocks of a SAM-style image encoder (:data:`SAM_BLOCKS`), role ``"both"``
            (the intended wiring, with the Uscaling-Adapter on the image, is :func:`urbansam_config`).
        hidden: ``c``, the width of the Uscaling features and of the attention.
        scales: ``L``, the number of dyadic pyramid levels (1, 1/2, 1/4, ...).
        heads: heads of the masked cross-attention (must divide ``hidden``).
        pyramid_grid: ``[h, w]``, the reference grid the pyramid is anchored on (its finest level; default SAM's
            64×64 token grid at 1024 px).
        role: ``"both"``, ``"uscaling"`` or ``"alignment"`` (see the module docstring).
        prefix_tokens: leading tokens of a ``[B, N, C]`` sequence left out (ViT cls: 1; SAM: 0).
        channels_last: a whole module's 4-D tensors are ``[B, H, W, C]`` (SAM blocks) rather than ``[B, C, H, W]``.
        context: the key under which the Uscaling-Adapter publishes ``U`` (a fresh random key when empty).
    """

    targets: list[str] | str = SAM_BLOCKS
    hidden: PositiveInt = 32
    scales: PositiveInt = 3
    heads: PositiveInt = 4
    pyramid_grid: list[PositiveInt] = field(default_factory=lambda: [64, 64])
    role: Literal["both", "uscaling", "alignment"] = "both"
    prefix_tokens: NonNegativeInt = 0
    channels_last: bool = True
    context: str = ""

    def __post_init__(self) -> None:
        if not self.context:
            self.context = uuid.uuid4().hex
        super().__post_init__()

    def validate(self) -> None:
        if self.hidden % self.heads:
            raise InvalidConfigError(f"heads={self.heads} must divide hidden={self.hidden}")
        if len(self.pyramid_grid) != 2:
            raise InvalidConfigError(f"pyramid_grid must be [h, w], got {self.pyramid_grid!r}")

    def replace(self, **changes: Any) -> UrbanSAMConfig:
        """A copy with some fields changed and (unless given) a fresh ``context`` key: a new adapter."""
        return dataclasses.replace(self, **{"context": "", **changes})

    # a fixed context key keeps the suite's test ids stable (its replace() gives each adapter a fresh one)
    tiny_fields: ClassVar[dict] = {"hidden": 4, "scales": 2, "heads": 2, "pyramid_grid": [4, 4], "context": "tiny"}
    variant_fields: ClassVar[list[dict]] = [{"scales": 1, "prefix_tokens": 1, "context": "tiny"}]


def urbansam_config(
    image_module: str = "patch_embed.projection",
    block_pattern: str = SAM_BLOCKS,
    **fields: Any,
) -> UrbanSAMConfig:
    """The intended wiring: the Uscaling-Adapter on the patch-embedding conv (whose input is the image; HF SAM's
    ``patch_embed.projection``, segment-anything's ``patch_embed.proj``) and the alignment after every block
    matching ``block_pattern``."""
    targets = r"(.*\.)?" + re.escape(image_module) + "|" + block_pattern
    overrides: dict[str, dict[str, Any]] = {image_module: {"role": "uscaling"}}
    return UrbanSAMConfig(targets=targets, overrides=overrides, role="alignment", **fields)


def resample(t: Tensor, size: tuple[int, int]) -> Tensor:
    """``t [B, C, H, W]`` on the grid ``size``: block averages when both sides shrink (or stay), else bilinear."""
    h, w = t.shape[-2:]
    if (h, w) == tuple(size):
        return t
    if h >= size[0] and w >= size[1]:
        return F.adaptive_avg_pool2d(t, size)
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)


class Uscaling(nn.Module):
    """The Uscaling-Adapter: image ``[B, C_in, H, W]`` → features ``U [B, c, h, w]`` on the reference grid."""

    def __init__(self, c_in: int, c: int, scales: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = grid
        self.proj_in = nn.Conv2d(c_in, c, 1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.proj_out = nn.Conv2d(c, c, 1)
        self.level_logits = nn.Parameter(torch.empty(scales))

    def reset_parameters(self) -> None:
        for conv in (self.proj_in, self.dw, self.proj_out):
            conv.reset_parameters()
        self.level_logits.zero_()  # uniform 1/L

    def encode(self, level: Tensor) -> Tensor:
        """The shared light adapter ``f`` (one set of weights for every scale)."""
        return self.proj_out(F.gelu(self.dw(F.gelu(self.proj_in(level)))))

    def forward(self, image: Tensor) -> Tensor:
        level = resample(image, self.grid)
        weights = torch.softmax(self.level_logits, dim=0).to(image.dtype)
        out = weights[0] * self.encode(level)
        for w in weights[1:]:
            h, wd = level.shape[-2:]
            level = F.adaptive_avg_pool2d(level, ((h + 1) // 2, (wd + 1) // 2))
            out = out + w * resample(self.encode(level), self.grid)
        return out


class Alignment(nn.Module):
    """``T + W_o · MaskedAttn(W_q LN(T), W_k U, W_v U)`` with the soft object mask ``log σ(W_m U)``."""

    def __init__(self, d: int, c: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d, c)
        self.k = nn.Linear(c, c)
        self.v = nn.Linear(c, c)
        self.mask = nn.Linear(c, 1)
        self.o = nn.Linear(c, d)

    def reset_parameters(self) -> None:
        for lin in (self.q, self.k, self.v, self.mask):
            lin.reset_parameters()
        self.o.weight.zero_()  # W_o = 0: identity at init (toolkit decision)
        self.o.bias.zero_()

    def forward(self, tokens: Tensor, features: Tensor) -> Tensor:
        b, n, d = tokens.shape
        kv = features.flatten(2).transpose(1, 2).to(tokens.dtype)  # [B, M, c]
        c, heads = kv.shape[-1], self.heads

        def split(t: Tensor) -> Tensor:
            return t.view(b, t.shape[1], heads, c // heads).transpose(1, 2)

        q = split(self.q(F.layer_norm(tokens, (d,))))
        bias = F.logsigmoid(self.mask(kv)).transpose(1, 2)[:, None]  # [B, 1, 1, M]: the soft object mask
        attended = F.scaled_dot_product_attention(q, split(self.k(kv)), split(self.v(kv)), attn_mask=bias)
        return tokens + self.o(attended.transpose(1, 2).reshape(b, n, c))


def _as_map(t: Tensor, layout: str, prefix_tokens: int) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``(map [B, C, H, W], back)`` of a module's input or output (``layout``: ``"first"`` or ``"last"``)."""
    if t.dim() not in (3, 4):
        raise InvalidConfigError(
            f"UrbanSAM adapts feature maps [B, C, H, W] / [B, H, W, C] or token sequences [B, N, C]; "
            f"got a tensor of shape {tuple(t.shape)}"
        )
    try:
        return to_map(t, prefix_tokens=prefix_tokens, channels_last=layout == "last")
    except ValueError as exc:
        raise InvalidConfigError(f"UrbanSAM: {exc}") from exc


@register("urbansam", UrbanSAMConfig)
class UrbanSAM(Adapter[UrbanSAMConfig]):
    """Uscaling-Adapter and/or Alignment module; see the module docstring."""

    kinds = frozenset({"linear", "conv2d", None})  # the image conv, a Linear's tokens or a whole block
    uses_context = True  # the Uscaling-Adapter publishes U in context.state for the blocks' alignment
    exempt: ClassVar[dict[str, str]] = {
        "mergeable": "spec: not mergeable (multi-scale conv branch and masked cross-attention)",
    }

    def __init__(self, base: BaseView, config: UrbanSAMConfig) -> None:
        super().__init__(base, config)
        grid = (int(config.pyramid_grid[0]), int(config.pyramid_grid[1]))
        role = config.role
        self.layout = "first" if base.kind == "conv2d" else "last" if base.kind == "linear" else None
        self.uscaling = Uscaling(base.in_features, config.hidden, config.scales, grid) if role != "alignment" else None
        self.alignment = Alignment(base.out_features, config.hidden, config.heads) if role != "uscaling" else None

    @torch.no_grad()
    def reset_parameters(self, base: BaseView) -> None:
        if self.uscaling is not None:
            self.uscaling.reset_parameters()
        if self.alignment is not None:
            self.alignment.reset_parameters()

    def _layout(self, t: Tensor) -> str:
        if self.layout is not None:
            return self.layout
        return "last" if self.config.channels_last and t.dim() == 4 else "first" if t.dim() == 4 else "last"

    def features(self, x: Tensor) -> Tensor:
        """``U [B, c, h, w]`` of the module input ``x`` (an image, a feature map or a token sequence)."""
        if self.uscaling is None:
            raise InvalidConfigError("this UrbanSAM adapter has role='alignment': it has no Uscaling-Adapter")
        image, _ = _as_map(x, self._layout(x), self.config.prefix_tokens)
        return self.uscaling(image)

    def object_logits(self, features: Tensor) -> Tensor:
        """The mask logits ``m = W_m U`` ``[B, 1, h, w]`` of the alignment (for an auxiliary mask loss)."""
        if self.alignment is None:
            raise InvalidConfigError("this UrbanSAM adapter has role='uscaling': it has no alignment mask")
        m = self.alignment.mask(features.flatten(2).transpose(1, 2))
        return m.transpose(1, 2).reshape(features.shape[0], 1, *features.shape[-2:])

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView, context: ForwardContext) -> Tensor:
        cfg = self.config
        key = f"urbansam:{cfg.context}"
        if self.uscaling is not None:
            features = self.features(x)
            if self.alignment is None:
                context.publish(key, features)
                return base_out
        else:
            producer = "UrbanSAM's Uscaling-Adapter (role='uscaling', on the patch-embedding conv)"
            features = context.published(key, base_out.shape[0], producer)
        assert self.alignment is not None
        layout = self._layout(base_out)
        if base_out.dim() == 3:  # a token sequence: the prefix tokens pass unchanged
            p = cfg.prefix_tokens
            return torch.cat([base_out[:, :p], self.alignment(base_out[:, p:], features)], dim=1)
        fmap, back = _as_map(base_out, layout, 0)
        b, d, h, w = fmap.shape
        tokens = self.alignment(fmap.flatten(2).transpose(1, 2), features)
        return back(tokens.transpose(1, 2).reshape(b, d, h, w))

    @classmethod
    def expected_trainable(cls, base: BaseView, config: UrbanSAMConfig) -> int:  # type: ignore[override]
        c_in, d, c = base.in_features, base.out_features, config.hidden
        uscaling = (c_in * c + c) + (9 * c + c) + (c * c + c) + config.scales
        alignment = (d * c + c) + 2 * (c * c + c) + (c + 1) + (c * d + d)
        return {"both": uscaling + alignment, "uscaling": uscaling, "alignment": alignment}[config.role]


__all__ = ["SAM_BLOCKS", "Alignment", "UrbanSAM", "UrbanSAMConfig", "Uscaling", "resample", "urbansam_config"]
