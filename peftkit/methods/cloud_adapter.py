"""Cloud-Adapter: a CNN side branch that encodes the image once and rewrites the patch tokens of a few ViT
blocks ("Adapting Vision Foundation Models for Robust Cloud Segmentation in Remote Sensing Images", 2024;
official code XavierJiezou/Cloud-Adapter, ``cloud_adapter.py``, ``cloud_adapter_dinov2.py``).

* Spatial perception (``PMAAConvBlock``, hidden ``c``, ``depth`` stages), on the image ``I``: ``proj_1x1`` =
  depthwise 1×1 conv + BN + ReLU + pointwise 1×1 conv (``in→c``) + BN; ``stem`` = 3×3 conv + BN + ReLU + 1×1
  conv + BN with a residual; ``depth`` stages of 3×3 conv stride 2 + BN + ReLU + 1×1 conv + BN (groups = 1).
  ``ctx = Σ_i adaptive_avg_pool(out_i, size of the last)`` over the stem and stage outputs.
* Interaction at an adapted block (``PMAAInteractiveModule``), on its patch tokens as a map ``X``:
  ``X' = BN(W_l X) ⊙ up(σ(BN(W_g ctx))) + up(BN(W_c ctx))`` (1×1 convs without bias, ``up`` = nearest
  resize to the token grid). **``X'`` replaces ``X``** (no residual, as released; ``residual=True`` adds ``X``).
  The cls / prefix tokens pass unchanged. ``d² + 2cd + 6d`` trainable per block.

Init: convs ``N(0, √(2/fan_out))``, ``fan_out = k²·C_out/groups``; BN weight 1, bias 0. Not identity at init,
not mergeable.

**Wiring (roles).** The CNN must see the image, the interactive modules sit at the blocks, and an adapter
only sees its own module. So an adapter has a ``role`` (per module, through ``overrides``;
:func:`cloud_adapter_config` builds the official wiring for HF ViT names): ``"perception"`` on a module whose
input is the image (the patch-embedding conv; its own output is unchanged) computes ``ctx`` and publishes it for
the forward in flight under the config's ``context`` key, in the model's per-forward state
(the call's ``ForwardContext.state``, which ends with the model's forward; the adapter declares
``uses_context``); ``"interaction"`` at a block reads it. Give every adapter its own config object
(``replace()`` issues a fresh key), and run the perception module in the same forward as the blocks.
``"both"`` (default, self-contained) runs the CNN on the adapted module's own input and rewrites its own output
(any Conv2d / Linear / block; what the conformance suite checks). *Decisions*: BatchNorm uses batch statistics
only in a training step (train mode with gradients), its running statistics otherwise, so a mixed batch equals its
rows run one by one; convs followed by BN have no bias (inferred); the input channels are the perception module's
input width (3 for RGB).
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.core.api import (
    Adapter,
    AdapterConfig,
    BaseView,
    ForwardContext,
    NonNegativeInt,
    PositiveInt,
    register,
)
from peftkit.methods._feature_maps import to_map


@dataclass(kw_only=True)
class CloudAdapterConfig(AdapterConfig):
    """Settings of Cloud-Adapter.

    Attributes:
        targets: default: HF ViT blocks 0, 6, 12, 18 in the self-contained role (the official wiring, with the
            CNN on the image, is :func:`cloud_adapter_config`).
        hidden: ``c``, the CNN width (official 256).
        depth: number of stride-2 CNN stages (official 4).
        role: ``"both"``, ``"perception"`` or ``"interaction"`` (see the module docstring; per module with
            ``overrides``).
        residual: add ``X`` back (``X + X'``); off as released.
        prefix_tokens: leading tokens passed through unchanged (ViT cls: 1).
        grid: ``(H, W)`` of the patch tokens; ``None``: inferred.
        context: the key under which perception publishes ``ctx`` (a fresh random key when empty).
    """

    targets: list[str] | str = r"(.*\.)?layers\.(0|6|12|18)"
    hidden: PositiveInt = 256
    depth: PositiveInt = 4
    role: Literal["both", "perception", "interaction"] = "both"
    residual: bool = False
    prefix_tokens: NonNegativeInt = 1
    grid: list[PositiveInt] | None = None
    context: str = ""

    def __post_init__(self) -> None:
        if not self.context:
            self.context = uuid.uuid4().hex
        super().__post_init__()

    def replace(self, **changes: Any) -> CloudAdapterConfig:
        """A copy with some fields changed and (unless given) a fresh ``context`` key: a new adapter."""
        return dataclasses.replace(self, **{"context": "", **changes})

    # a fixed key, so the suite's test ids are stable (the suite's replace() gives each adapter a fresh one)
    tiny_fields: ClassVar[dict] = {"hidden": 4, "depth": 1, "context": "tiny"}
    variant_fields: ClassVar[list[dict]] = [{"depth": 2, "residual": True, "context": "tiny"}]


def cloud_adapter_config(
    blocks: tuple[int, ...] = (0, 6, 12, 18),
    image_module: str = "embeddings.patch_embeddings.projection",
    block_prefix: str = "layers",
    **fields: Any,
) -> CloudAdapterConfig:
    """The official wiring for HF ViT names: perception on the patch-embedding conv (its input is the image),
    interaction after ``blocks`` (official ``adapter_index = [0, 6, 12, 18]``), cls token unchanged."""
    names = [f"{block_prefix}.{i}" for i in blocks]
    overrides: dict[str, dict[str, Any]] = {image_module: {"role": "perception"}}
    overrides.update({name: {"role": "interaction"} for name in names})
    return CloudAdapterConfig(targets=[image_module, *names], overrides=overrides, **fields)


class _ConvBN(nn.Module):
    """conv (no bias) + BatchNorm (+ ReLU); BN uses batch statistics only in a training step."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, stride: int = 1, groups: int = 1, relu: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.relu = relu

    @torch.no_grad()
    def reset_parameters(self) -> None:
        w = self.conv.weight
        fan_out = w.shape[2] * w.shape[3] * w.shape[0] // self.conv.groups
        w.normal_(0.0, (2.0 / fan_out) ** 0.5)
        self.bn.reset_parameters()  # weight 1, bias 0, running mean 0 / var 1

    def forward(self, x: Tensor) -> Tensor:
        bn = self.bn
        batch_stats = self.training and torch.is_grad_enabled()
        y = F.batch_norm(
            self.conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, batch_stats, bn.momentum or 0.1, bn.eps
        )
        return F.relu(y) if self.relu else y


class SpatialPerception(nn.Module):
    """The official ``PMAAConvBlock``: image ``[B, in, H, W]`` -> ``ctx [B, c, H/2^depth, W/2^depth]``."""

    def __init__(self, c_in: int, c: int, depth: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(_ConvBN(c_in, c_in, groups=c_in, relu=True), _ConvBN(c_in, c))
        self.stem = nn.Sequential(_ConvBN(c, c, 3, relu=True), _ConvBN(c, c))
        self.stages = nn.ModuleList(
            nn.Sequential(_ConvBN(c, c, 3, stride=2, relu=True), _ConvBN(c, c)) for _ in range(depth)
        )

    def forward(self, image: Tensor) -> Tensor:
        h = self.proj(image)
        outs = [h + self.stem(h)]
        for stage in self.stages:
            outs.append(stage(outs[-1]))
        size = outs[-1].shape[-2:]
        return sum(F.adaptive_avg_pool2d(o, size) for o in outs)  # type: ignore[return-value]


class Interaction(nn.Module):
    """The official ``PMAAInteractiveModule``: ``BN(W_l X) ⊙ up(σ(BN(W_g ctx))) + up(BN(W_c ctx))``."""

    def __init__(self, d: int, c: int) -> None:
        super().__init__()
        self.local = _ConvBN(d, d)
        self.gate = _ConvBN(c, d)
        self.glob = _ConvBN(c, d)

    def forward(self, fmap: Tensor, ctx: Tensor) -> Tensor:
        size = fmap.shape[-2:]
        gate = F.interpolate(torch.sigmoid(self.gate(ctx)), size=size, mode="nearest")
        return self.local(fmap) * gate + F.interpolate(self.glob(ctx), size=size, mode="nearest")


@register("cloud_adapter", CloudAdapterConfig)
class CloudAdapter(Adapter[CloudAdapterConfig]):
    """A CNN context branch and/or a token-rewriting interaction module; see the module docstring."""

    kinds = frozenset({"linear", "conv2d", None})  # the image conv, a Linear's tokens or a whole block
    uses_context = True  # perception publishes ctx in context.state for the interaction modules of the forward
    exempt: ClassVar[dict[str, str]] = {
        "identity_at_init": "spec: not identity (the patch tokens are replaced, no residual)",
        "mergeable": "spec: not mergeable (CNN branch, sigmoid gate)",
    }

    def __init__(self, base: BaseView, config: CloudAdapterConfig) -> None:
        super().__init__(base, config)
        role = config.role
        self.perception = (
            SpatialPerception(base.in_features, config.hidden, config.depth) if role != "interaction" else None
        )
        self.interaction = Interaction(base.out_features, config.hidden) if role != "perception" else None

    @torch.no_grad()
    def reset_parameters(self, base: BaseView) -> None:
        for m in self.modules():
            if isinstance(m, _ConvBN):
                m.reset_parameters()

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView, context: ForwardContext) -> Tensor:
        cfg = self.config
        key = f"cloud_adapter:{cfg.context}"
        if self.perception is not None:
            image, _ = to_map(x, prefix_tokens=cfg.prefix_tokens if self.interaction is not None else 0)
            ctx = self.perception(image)
            if self.interaction is None:
                context.publish(key, ctx)
                return base_out
        else:
            producer = "the Cloud-Adapter perception module (role='perception', e.g. the patch-embedding conv)"
            ctx = context.published(key, base_out.shape[0], producer)
        assert self.interaction is not None
        fmap, back = to_map(base_out, prefix_tokens=cfg.prefix_tokens, grid=cfg.grid)
        new = self.interaction(fmap, ctx)
        return back(fmap + new if cfg.residual else new)

    @classmethod
    def expected_trainable(cls, base: BaseView, config: CloudAdapterConfig) -> int:
        c_in, d, c = base.in_features, base.out_features, config.hidden
        cnn = (c_in + 2 * c_in) + (c_in * c + 2 * c) + (1 + config.depth) * (9 * c * c + 2 * c + c * c + 2 * c)
        interaction = d * d + 2 * c * d + 6 * d
        return {"both": cnn + interaction, "perception": cnn, "interaction": interaction}[config.role]
