"""SHiRA: Sparse High Rank Adapters (Bhardwaj et al., 2024, "Sparse High Rank Adapters"), as in Hugging Face
PEFT's ``ShiraConfig`` (PEFT's implementation is by the authors).

A fixed sparse mask ``M ∈ {0,1}^{d_out×d_in}`` with ``n = r·(d_in + d_out)`` ones (LoRA-r's parameter count)
selects the trainable entries of ``W``: ``W_eff = W + S``, ``S = scatter(indices, s · values)``, and
``y = x W_effᵀ + b`` is computed as one base op on the weight merged on the fly (``O(n)`` scatter into a copy
of ``W``, then the usual ``O(tokens · d_in · d_out)`` product), as the spec asks. ``ΔW = S`` is exact and can
have rank far above ``r``.

Masks (``mask_type``):

* ``"random"`` (PEFT default): ``idx = randperm(d_out·d_in, generator=g)[:n]``, ``g`` seeded by
  ``random_seed``; the ones are stored in row-major sorted ``(row, col)`` order (``torch.where(M == 1)``), so
  ``values[i]`` belongs to the i-th one in that order, exactly as PEFT.
* ``"magnitude"`` (SHiRA-WM, paper variant): the ``n`` entries of largest ``|W|`` (ties broken by
  ``torch.topk``).

Decisions: the indices are a persistent ``int32`` buffer ``indices [2, n]`` (spec decision: PEFT keeps them
in a plain dict; saving them makes a reload exact whatever the seed). *Inferred*: with ``random_seed=None``
the generator is seeded by the config's ``seed`` if set, else left at ``torch.Generator()``'s fixed default
seed (PEFT's behaviour, so the mask is still deterministic). Scaling ``s = scale`` (default 1.0, PEFT's
``set_scale``). Init ``values = 0`` → identity; ``init="randn"`` (PEFT ``init_weights=False``) for tests.
SHiRA-Grad / SNIP need calibration gradients and are not implemented here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from peftkit.core.base import BaseView
from peftkit.core.errors import InvalidConfigError
from peftkit.core.protocol import Adapter, AdapterConfig, require_positive_int
from peftkit.core.registry import register


@dataclass(kw_only=True)
class SHiRAConfig(AdapterConfig):
    """Settings of SHiRA (PEFT ``ShiraConfig`` defaults).

    Attributes:
        r: sets the number of trainable entries per layer, ``n = r·(d_in + d_out)`` (not a rank limit).
        mask_type: ``"random"`` (PEFT) or ``"magnitude"`` (SHiRA-WM: top-``n`` ``|W|``).
        random_seed: seed of the random mask (see the module docstring for ``None``).
        scale: multiplies the sparse update (PEFT's ``scaling``, 1.0 in training).
        init: ``"zeros"`` (identity at init) or ``"randn"`` (PEFT ``init_weights=False``; tests).
    """

    r: int = 32
    mask_type: Literal["random", "magnitude"] = "random"
    random_seed: int | None = None
    scale: float = 1.0
    init: Literal["zeros", "randn"] = "zeros"

    def validate(self) -> None:
        require_positive_int("r", self.r)
        if self.mask_type not in ("random", "magnitude"):
            raise InvalidConfigError(f"mask_type must be 'random' or 'magnitude', got {self.mask_type!r}")
        if self.init not in ("zeros", "randn"):
            raise InvalidConfigError(f"init must be 'zeros' or 'randn', got {self.init!r}")

    @classmethod
    def tiny(cls) -> SHiRAConfig:
        return cls(r=1)

    @classmethod
    def tiny_variants(cls) -> list[AdapterConfig]:
        t = cls.tiny()
        return [t, t.replace(mask_type="magnitude", scale=2.0), t.replace(random_seed=5)]


def random_mask(d_out: int, d_in: int, n: int, seed: int | None) -> Tensor:
    """PEFT's random mask: ``n`` ones at ``randperm(d_out·d_in)[:n]`` of a CPU generator seeded by ``seed``."""
    g = torch.Generator()
    if seed is not None:
        g.manual_seed(seed)
    idx = torch.randperm(d_out * d_in, generator=g)[:n]
    mask = torch.zeros(d_out * d_in, dtype=torch.bool)
    mask[idx] = True
    return mask.view(d_out, d_in)


def magnitude_mask(weight: Tensor, n: int) -> Tensor:
    """SHiRA-WM: ones at the ``n`` largest ``|W|`` entries."""
    idx = weight.detach().abs().flatten().float().topk(n).indices.cpu()
    mask = torch.zeros(weight.numel(), dtype=torch.bool)
    mask[idx] = True
    return mask.view(weight.shape)


@register("shira", SHiRAConfig)
class SHiRA(Adapter):
    """``y = x (W + scatter(indices, s·values))ᵀ + b``; see the module docstring."""

    config: SHiRAConfig

    def __init__(self, base: BaseView, config: SHiRAConfig) -> None:
        super().__init__(base, config)
        d_out, d_in = base.out_features, base.in_features
        n = config.r * (d_in + d_out)
        if n > d_in * d_out:
            raise InvalidConfigError(
                f"r={config.r} gives n = r·(d_in + d_out) = {n} trainable entries, more than the {d_in * d_out} "
                f"weights of this layer {tuple(base.weight_shape)}"
            )
        if config.mask_type == "magnitude":
            mask = magnitude_mask(base.weight, n)
        else:
            mask = random_mask(d_out, d_in, n, config.random_seed if config.random_seed is not None else config.seed)
        rows, cols = torch.where(mask)
        self.register_buffer("indices", torch.stack([rows, cols]).to(torch.int32).to(base.device))
        self.values = nn.Parameter(torch.empty(n, device=base.device))

    def reset_parameters(self, base: BaseView) -> None:
        if self.config.init == "randn":
            self.values.normal_()
        else:
            self.values.zero_()

    def _index(self) -> tuple[Tensor, Tensor]:
        idx = self.indices.long()
        return idx[0], idx[1]

    def delta_weight(self, base: BaseView) -> Tensor:
        delta = torch.zeros(base.weight_shape, dtype=self.values.dtype, device=self.values.device)
        return delta.index_put(self._index(), self.config.scale * self.values)

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        vals = (self.config.scale * self.values).to(base.weight.dtype)
        weight = base.weight.index_put(self._index(), vals, accumulate=True)
        return base.apply(x, weight, base.bias)

    @classmethod
    def expected_trainable(cls, base: BaseView, config: SHiRAConfig) -> int:
        return config.r * (base.in_features + base.out_features)
