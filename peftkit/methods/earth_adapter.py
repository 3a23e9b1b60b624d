"""Earth-Adapter: mixture-of-frequency adapter on ViT block outputs ("Earth-Adapter: Bridge the Geospatial
Domain Gaps with Mixture of Frequency Adaptation", 2025; official code VisionXLab/Earth-Adapter,
``earth_adapter.py``).

On the patch tokens ``F`` of a block output (cls / prefix tokens unchanged), as a map ``B×d×H×W``:

* without frequency mixing: ``F' = F + s · mlp1(F)``;
* with it (the official ``fft_layer`` blocks): ``Z = fftshift(fft2(F, norm="ortho"))``, ``c = int(min(H,W)·ρ // 2)``,
  ``M_low`` = 1 on the centred square ``[H/2−c, H/2+c) × [W/2−c, W/2+c)``;
  ``F_low = Re(ifft2(ifftshift(Z⊙M_low)))``, ``F_high = Re(ifft2(ifftshift(Z⊙(1−M_low))))``;
  ``g = softmax(router(F))`` per token; ``F' = F + s · (g₀·mlp1(F) + g₁·mlp2(F_low) + g₂·mlp3(F_high))``.

Each ``mlp`` is ``Linear(d→r)``–ReLU–``Linear(r→d)`` with biases; ``router: Linear(d→3)``; ``s`` one learnable
scalar per adapted block, init 0.1. Trainable: ``2rd + r + d + 1`` (+ ``2(2rd + r + d) + 3d + 3`` with frequency
mixing). Init: torch default for every Linear (the up projection too): **not identity at init**
(``zero_init_up=True`` zeroes the up projections, an option). Not mergeable.

Placement: the block itself (``"module"`` kind, e.g. HF ViT ``layers.N``), a Linear (token output) or a conv
(map output). Which blocks mix frequencies is per module: ``frequency`` with ``overrides``
(:func:`earth_adapter_config` builds the official ``fft_layer = [0..5]``). *Decisions*: the grid is inferred from
the token count (official hard-codes 32×32); mlp2/mlp3/router are allocated only where used.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.core.api import Adapter, AdapterConfig, BaseView, Fraction, NonNegativeInt, PositiveInt, register
from peftkit.methods._feature_maps import to_map


@dataclass(kw_only=True)
class EarthAdapterConfig(AdapterConfig):
    """Settings of Earth-Adapter.

    Attributes:
        r: hidden width of each mlp (official ``dim`` 64).
        cutoff_ratio: ``ρ``, the low-pass square's half-side is ``int(min(H, W)·ρ // 2)`` (official 0.3).
        frequency: mix the spatial, low- and high-frequency experts (official: blocks 0-5); else ``mlp1`` only.
        scale_init: initial value of the learnable scale ``s`` (0.1).
        zero_init_up: zero the up projections (identity at init); off by default (official).
        prefix_tokens: leading tokens (cls) passed through unchanged (1 for ViT).
        grid: ``(H, W)`` of the patch tokens; ``None``: inferred.
    """

    targets: list[str] | str = r"(.*\.)?layers\.\d+"
    r: PositiveInt = 64
    cutoff_ratio: Fraction = 0.3
    frequency: bool = True
    scale_init: float = 0.1
    zero_init_up: bool = False
    prefix_tokens: NonNegativeInt = 1
    grid: list[PositiveInt] | None = None

    tiny_fields: ClassVar[dict] = {"r": 4, "cutoff_ratio": 0.5}
    variant_fields: ClassVar[list[dict]] = [{"frequency": False, "prefix_tokens": 0, "cutoff_ratio": 0.3}]


def earth_adapter_config(n_blocks: int, fft_blocks: Iterable[int] = range(6), **fields: Any) -> EarthAdapterConfig:
    """Every block ``layers.0 … layers.{n_blocks−1}`` adapted, frequency mixing only in ``fft_blocks``
    (official ``fft_layer = [0..5]``)."""
    fft = set(fft_blocks)
    overrides = {f"layers.{i}": {"frequency": False} for i in range(n_blocks) if i not in fft}
    return EarthAdapterConfig(overrides=overrides, **fields)


def frequency_split(fmap: Tensor, cutoff_ratio: float) -> tuple[Tensor, Tensor]:
    """``(F_low, F_high)`` of a ``[B, C, H, W]`` map: the centred low-pass square of the shifted spectrum and the
    rest (``F_low + F_high == F`` up to rounding)."""
    h, w = fmap.shape[-2:]
    z = torch.fft.fftshift(torch.fft.fft2(fmap.float(), norm="ortho"), dim=(-2, -1))
    c = int((min(h, w) * cutoff_ratio) // 2)
    mask = torch.zeros(h, w, device=fmap.device)
    mask[h // 2 - c : h // 2 + c, w // 2 - c : w // 2 + c] = 1

    def back(spectrum: Tensor) -> Tensor:
        spatial = torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1)), norm="ortho")
        return spatial.real.to(fmap.dtype)

    return back(z * mask), back(z * (1 - mask))


class _MLP(nn.Sequential):
    def __init__(self, d: int, r: int) -> None:
        super().__init__(nn.Linear(d, r), nn.ReLU(), nn.Linear(r, d))


@register("earth_adapter", EarthAdapterConfig)
class EarthAdapter(Adapter[EarthAdapterConfig]):
    """``F' = F + s · mixture of mlp experts on F, F_low, F_high``; see the module docstring."""

    kinds = frozenset({"linear", "conv2d", None})  # a Linear's tokens, a conv's map, or a whole block
    exempt: ClassVar[dict[str, str]] = {
        "identity_at_init": "spec: not identity (up projections are Kaiming-initialised, s = 0.1 from step 0)",
        "mergeable": "spec: not mergeable (ReLU, FFT split, router)",
    }

    def __init__(self, base: BaseView, config: EarthAdapterConfig) -> None:
        super().__init__(base, config)
        d, r = base.out_features, config.r
        self.mlps = nn.ModuleList(_MLP(d, r) for _ in range(3 if config.frequency else 1))
        self.router = nn.Linear(d, 3) if config.frequency else None
        self.scale = nn.Parameter(torch.empty(()))

    @torch.no_grad()
    def reset_parameters(self, base: BaseView) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()
        if self.config.zero_init_up:
            for mlp in self.mlps:
                mlp[2].weight.zero_()
                mlp[2].bias.zero_()
        self.scale.fill_(self.config.scale_init)

    def router_weights(self, tokens: Tensor) -> Tensor:
        """``softmax(router(F))`` per token (``[..., 3]``, rows sum to 1)."""
        assert self.router is not None
        return F.softmax(self.router(tokens), dim=-1)

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        cfg = self.config
        fmap, back = to_map(base_out, prefix_tokens=cfg.prefix_tokens, grid=cfg.grid)
        b, c, h, w = fmap.shape
        tokens = fmap.flatten(2).transpose(1, 2)  # [B, HW, C]
        delta = self.mlps[0](tokens)
        if self.router is not None:
            low, high = (f.flatten(2).transpose(1, 2) for f in frequency_split(fmap, cfg.cutoff_ratio))
            g = self.router_weights(tokens)
            delta = g[..., 0:1] * delta + g[..., 1:2] * self.mlps[1](low) + g[..., 2:3] * self.mlps[2](high)
        return back(fmap + self.scale * delta.transpose(1, 2).reshape(b, c, h, w))

    @classmethod
    def expected_trainable(cls, base: BaseView, config: EarthAdapterConfig) -> int:
        d, r = base.out_features, config.r
        mlp = 2 * r * d + r + d
        return 1 + (3 * mlp + 3 * d + 3 if config.frequency else mlp)
