"""KronA (Edalati et al., 2022, "KronA: Parameter Efficient Tuning with Kronecker Adapter") and DiffuseKronA
(Marjit et al., 2024, "DiffuseKronA: A Parameter Efficient Fine-tuning Method for Personalized Diffusion
Models"): Kronecker-product updates.

KronA: trainable ``A [a1, a2]`` and ``B [b1, b2]`` with ``a1·b1 = d_out``, ``a2·b2 = d_in``:

``ΔW = s · (A ⊗ B)``,  ``y = base(x) + s · vec(A X Bᵀ)``,  ``X = x.reshape(..., a2, b2)``

so the forward never materialises ``ΔW``: cost ``O(tokens · (a2·b2·b1 + a2·b1·a1))`` instead of
``O(tokens · d_in·d_out)``. Count ``a1·a2 + b1·b2``. Init (*inferred*, no KronA code): ``A`` Kaiming-uniform
(``a=√5``), ``B = 0`` → identity at init.

DiffuseKronA (official IBM/DiffuseKronA ``KronALinearLayer`` layout): ``down = D [a2, a1]``, ``up = U [b1, b2]``,
``ΔW[u·a1+v, p·b2+q] = U[u, q] · D[p, v]``: the canonical ``Dᵀ ⊗ U`` with the output rows permuted by
transposing the ``(a1, b1)`` grid to ``(b1, a1)``. Forward ``vec(U (Xᵀ D))`` (same cost). Init: ``D ~ N(0,
(1/a1)²)``, ``U = 0`` → identity. ``s = 1`` by default (DiffuseKronA never uses ``network_alpha``).

Factor sizes: ``a1`` / ``a2`` from the config (DiffuseKronA SDXL: ``a1=64``, ``a2=8``); ``None`` takes the
smaller factor of LoKr's near-square :func:`~peftkit.methods.lokr.factorization` (*inferred* default for
KronA). A layer whose size is not divisible raises :class:`InvalidConfigError`. Merge is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from peftkit.core.api import (
    Adapter,
    AdapterConfig,
    BaseView,
    InvalidConfigError,
    PositiveInt,
    register,
    seeded_generator,
)
from peftkit.methods.lokr import factorization


@dataclass(kw_only=True)
class KronAConfig(AdapterConfig):
    """Settings of KronA.

    Attributes:
        a1: rows of ``A`` (must divide ``d_out``); ``None``: near-square factor of ``d_out`` (smaller side).
        a2: columns of ``A`` (must divide ``d_in``); ``None``: near-square factor of ``d_in`` (smaller side).
        scale: ``s`` multiplying the update (default 1).
    """

    a1: PositiveInt | None = None
    a2: PositiveInt | None = None
    scale: float = 1.0

    variant_fields: ClassVar[list[dict]] = [{"a1": 4, "a2": 2, "scale": 2.0}]


@dataclass(kw_only=True)
class DiffuseKronAConfig(KronAConfig):
    """Settings of DiffuseKronA (SDXL defaults ``a1=64``, ``a2=8``; ``s = 1``)."""

    a1: PositiveInt | None = 64
    a2: PositiveInt | None = 8

    tiny_fields: ClassVar[dict] = {"a1": 4, "a2": 2}
    variant_fields: ClassVar[list[dict]] = [{"a1": None, "a2": None, "seed": 1}]


def kron_sizes(base: BaseView, config: KronAConfig) -> tuple[int, int, int, int]:
    """``(a1, a2, b1, b2)`` for ``base``; raises if ``a1 ∤ d_out`` or ``a2 ∤ d_in``."""
    d_out, d_in = base.out_features, base.in_features
    a1 = config.a1 if config.a1 is not None else factorization(d_out)[0]
    a2 = config.a2 if config.a2 is not None else factorization(d_in)[0]
    if d_out % a1 or d_in % a2:
        raise InvalidConfigError(f"a1={a1} must divide d_out={d_out} and a2={a2} must divide d_in={d_in}")
    return a1, a2, d_out // a1, d_in // a2


@register("krona", KronAConfig)
class KronA(Adapter[KronAConfig]):
    """``y = base(x) + s · vec(A X Bᵀ)`` (``ΔW = s · A ⊗ B``); see the module docstring."""

    def __init__(self, base: BaseView, config: KronAConfig) -> None:
        super().__init__(base, config)
        self.sizes = kron_sizes(base, config)
        self.allocate(*self.sizes, device=base.device)

    def allocate(self, a1: int, a2: int, b1: int, b2: int, device: torch.device) -> None:
        """The two factors for sizes ``(a1, a2, b1, b2)``: ``A [a1, a2]``, ``B [b1, b2]``."""
        self.A = nn.Parameter(torch.empty(a1, a2, device=device))
        self.B = nn.Parameter(torch.empty(b1, b2, device=device))

    def reset_parameters(self, base: BaseView) -> None:
        a1, a2, _, _ = self.sizes
        g = seeded_generator(self.config.seed)
        bound = 1.0 / math.sqrt(a2)  # kaiming_uniform_(a=√5) bound
        self.A.copy_(torch.rand(a1, a2, generator=g) * 2 * bound - bound)
        self.B.zero_()

    def delta_weight(self, base: BaseView) -> Tensor:
        return self.config.scale * torch.kron(self.A, self.B)

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        _, a2, _, b2 = self.sizes
        xs = x.reshape(*x.shape[:-1], a2, b2).to(self.A.dtype)
        y = torch.matmul(torch.matmul(self.A, xs), self.B.T)  # [..., a1, b1]
        return base_out + self.config.scale * y.reshape(base_out.shape).to(base_out.dtype)

    @classmethod
    def expected_trainable(cls, base: BaseView, config: KronAConfig) -> int:
        a1, a2, b1, b2 = kron_sizes(base, config)
        return a1 * a2 + b1 * b2


@register("diffusekrona", DiffuseKronAConfig)
class DiffuseKronA(KronA):
    """``ΔW[u·a1+v, p·b2+q] = s · U[u, q] · D[p, v]`` (official layout); see the module docstring. KronA's
    factor sizes and count, its own layout and init."""

    config: DiffuseKronAConfig  # narrows KronA.config

    def allocate(self, a1: int, a2: int, b1: int, b2: int, device: torch.device) -> None:
        """``down = D [a2, a1]``, ``up = U [b1, b2]``."""
        self.down = nn.Parameter(torch.empty(a2, a1, device=device))
        self.up = nn.Parameter(torch.empty(b1, b2, device=device))

    def reset_parameters(self, base: BaseView) -> None:
        a1, a2, _, _ = self.sizes
        g = seeded_generator(self.config.seed)
        self.down.copy_(torch.randn(a2, a1, generator=g) / a1)
        self.up.zero_()

    def delta_weight(self, base: BaseView) -> Tensor:
        a1, a2, b1, b2 = self.sizes
        canonical = torch.kron(self.down.T.contiguous(), self.up)  # rows v·b1 + u
        return self.config.scale * canonical.reshape(a1, b1, -1).transpose(0, 1).reshape(a1 * b1, a2 * b2)

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        _, a2, _, b2 = self.sizes
        xs = x.reshape(*x.shape[:-1], a2, b2).to(self.down.dtype)
        y = torch.matmul(self.up, torch.matmul(xs.transpose(-1, -2), self.down))  # [..., b1, a1]
        return base_out + self.config.scale * y.reshape(base_out.shape).to(base_out.dtype)
