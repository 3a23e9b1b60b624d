"""Feature maps of conv nets and vision transformers, for the feature-map adapters (DD-, Earth-,
Cloud-Adapter): a layer output as a ``[B, C, H, W]`` map and back.

* 4-D outputs are maps: ``[B, C, H, W]`` (conv nets), or ``[B, H, W, C]`` with ``channels_last`` (SAM2 Hiera).
* 3-D outputs are token sequences ``[B, N, C]``: the first ``prefix_tokens`` (cls / register tokens) are left
  out of the map (adapters leave them unchanged); the other ``N − prefix_tokens`` tokens form the patch grid,
  ``grid = (H, W)`` if given, else the most square ``H × W = N − prefix_tokens`` with ``H ≤ W`` (a square
  ViT grid; *decision*: other lengths get the nearest rectangle instead of an error).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from peftkit.core.api import InvalidConfigError


def grid_of(n: int, grid: tuple[int, int] | list[int] | None = None) -> tuple[int, int]:
    """``(H, W)`` of ``n`` patch tokens (see the module docstring)."""
    if grid is not None:
        h, w = int(grid[0]), int(grid[1])
        if h * w != n:
            raise InvalidConfigError(f"grid {h}x{w} does not hold the {n} patch tokens of this layer output")
        return h, w
    h = next(d for d in range(math.isqrt(n), 0, -1) if n % d == 0)
    return h, n // h


def to_map(
    t: Tensor, *, prefix_tokens: int = 0, channels_last: bool = False, grid: tuple[int, int] | list[int] | None = None
) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``(map [B, C, H, W], back)`` where ``back(new_map)`` puts a map of the same shape into ``t``'s layout
    (prefix tokens taken from ``t`` unchanged)."""
    if t.dim() == 4:
        if channels_last:
            return t.permute(0, 3, 1, 2), lambda m: m.permute(0, 2, 3, 1)
        return t, lambda m: m
    if t.dim() != 3:
        raise ValueError(f"expected a [B, C, H, W] map or [B, N, C] tokens, got shape {tuple(t.shape)}")
    if t.shape[1] <= prefix_tokens:
        raise ValueError(f"{t.shape[1]} tokens leave no patch tokens after {prefix_tokens} prefix tokens")
    prefix, patches = t[:, :prefix_tokens], t[:, prefix_tokens:]
    b, n, c = patches.shape
    h, w = grid_of(n, grid)
    fmap = patches.transpose(1, 2).reshape(b, c, h, w)

    def back(m: Tensor) -> Tensor:
        return torch.cat([prefix, m.flatten(2).transpose(1, 2)], dim=1)

    return fmap, back
