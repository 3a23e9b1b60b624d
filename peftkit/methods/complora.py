"""Comp-LoRA ("Complementary Subspace Low-Rank Adaptation of Vision-Language Models for Few-Shot
Classification"). No official code: the construction below is *inferred* (spec decisions).

From the SVD of the frozen weight, ``W = U Σ Vᵀ`` (``q = min(out, in)``), the singular vectors after the top
``k_top`` span the *complementary* subspace: ``U_c = U[:, k_top:]`` (``[out, p]``), ``V_c = V[:, k_top:]``
(``[in, p]``), ``p = q − k_top``. A LoRA pair ``A [r, p]``, ``B [p, r]`` acts inside it:

``y = x Wᵀ + b + s · U_c B A V_cᵀ drop(x)``, ``s = alpha / r``, ``ΔW = s · U_c B A V_cᵀ`` (exact merge),

so the principal subspace is untouched: ``U_kᵀ ΔW = 0`` and ``ΔW V_k = 0``. Init: ``A`` Kaiming-uniform,
``B = 0``: identity at init. ``k_top = q // 2`` by default; ``complement_energy=e`` instead keeps as
principal the fewest top directions holding a fraction ``e`` of the energy ``Σ σ²`` (inferred reading of
the spec's "90% energy" option).

The bases come from :func:`peftkit.methods.loraxs.svd_signed` (exact float64 SVD, deterministic signs),
computed once when the adapter is created, and are saved with it (persistent buffers, as SVFit and SALT save
theirs): ``U_c [out, p]`` and ``V_c [in, p]``, ``(in + out) · p`` numbers per layer (about ``q²``) besides the
``2 r p`` trainable ones. They cannot be rebuilt on load: singular vectors of (nearly) equal singular values
are not determined by the weight (any rotation of them is as good), so a recomputed SVD, on another machine
or BLAS build, or after a ``1e-7`` change of an orthogonal weight, can give another basis and another
function. A loaded adapter therefore computes no SVD; with ``complement_energy`` its ``k_top`` is read from
the saved shapes (:meth:`CompLoRA.fit_state`). Supported: Linear, GPT-2 Conv1D.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch
from torch import Tensor, nn

from peftkit.core.api import (
    Adapter,
    BaseView,
    Bound,
    InvalidConfigError,
    LowRank,
    NonNegativeInt,
    RankConfig,
    UnsupportedLayerError,
    add_lowrank,
    init_lora_pair,
    input_dropout,
    register,
)

from .lora import float_dtype
from .loraxs import energy_rank, svd_signed


@dataclass(kw_only=True)
class CompLoRAConfig(RankConfig):
    """Settings of Comp-LoRA (defaults: spec decision, the CLIP-LoRA few-shot setting).

    Attributes:
        r: rank of the update inside the complementary subspace. Default 2.
        alpha: scale numerator, ``s = alpha / r``. Default 1.
        dropout: dropout probability on the adapter branch's input (off in eval mode). Default 0.25.
        k_top: number of principal singular directions left untouched (``None``: ``min(out, in) // 2``).
        complement_energy: alternatively, ``k_top`` = the fewest top directions holding this fraction of
            ``Σ σ²`` (in ``(0, 1)``); exclusive with ``k_top``.
    """

    r: int = 2
    alpha: float = 1.0
    dropout: float = 0.25
    k_top: NonNegativeInt | None = None
    complement_energy: Annotated[float, Bound(low=0, high=1, low_open=True, high_open=True)] | None = None

    def validate(self) -> None:
        if self.k_top is not None and self.complement_energy is not None:
            raise InvalidConfigError("set k_top or complement_energy, not both")

    tiny_fields: ClassVar[dict] = {"r": 2, "alpha": 2.0, "dropout": 0.0}
    variant_fields: ClassVar[list[dict]] = [{"k_top": 3, "dropout": 0.25}, {"complement_energy": 0.5}]


def principal_count(s: Tensor, config: CompLoRAConfig) -> int:
    """``k_top`` for singular values ``s`` (descending) under ``config``."""
    if config.complement_energy is not None:
        return energy_rank(s, config.complement_energy)
    return s.numel() // 2 if config.k_top is None else config.k_top


def complement_size(base: BaseView, config: CompLoRAConfig) -> int:
    """``p = q − k_top``, the dimension of the complementary subspace of this layer."""
    q = min(base.in_features, base.out_features)
    if config.complement_energy is None:
        return q - principal_count(torch.empty(q), config)
    return q - principal_count(torch.linalg.svdvals(base.weight.detach().double()), config)


@register("complora", CompLoRAConfig)
class CompLoRA(Adapter[CompLoRAConfig]):
    """LoRA inside the complementary singular subspace of ``W``; see the module docstring."""

    def __init__(self, base: BaseView, config: CompLoRAConfig) -> None:
        super().__init__(base, config)
        self.q = min(base.in_features, base.out_features)
        self.scale = config.scale
        self.dropout = input_dropout(config.dropout)
        # Allocation only: the bases are computed in reset_parameters or read from a saved file. With
        # complement_energy, p depends on the spectrum: reset_parameters or fit_state sizes the tensors.
        p = 0 if config.complement_energy is not None else self.q - principal_count(torch.empty(self.q), config)
        if config.complement_energy is None:
            self._check_fits(p)
        self.allocate(p, base.out_features, base.in_features, float_dtype(base), base.device)

    def _check_fits(self, p: int) -> None:
        if p < self.config.r:
            raise UnsupportedLayerError(
                f"the complementary subspace of this layer has dimension {p} (k_top={self.q - p} of {self.q}), "
                f"smaller than r={self.config.r}"
            )

    def allocate(self, p: int, out: int, inp: int, dtype: torch.dtype, device: torch.device) -> None:
        """(Re)allocate empty tensors for a complementary subspace of dimension ``p``; replaced parameters keep
        their ``requires_grad``."""
        kw = {"dtype": dtype, "device": device}
        trainable = self.A.requires_grad if "A" in self._parameters else True
        self.register_buffer("U_c", torch.empty(out, p, **kw))  # [out, p]
        self.register_buffer("V_c", torch.empty(inp, p, **kw))  # [in, p]
        self.A = nn.Parameter(torch.empty(self.config.r, p, **kw), requires_grad=trainable)
        self.B = nn.Parameter(torch.empty(p, self.config.r, **kw), requires_grad=trainable)

    @property
    def k_top(self) -> int:
        """The number of principal directions left untouched, ``q − p``."""
        return self.q - self.A.shape[1]

    def fit_state(self, state: dict[str, Tensor]) -> None:
        """Take ``p`` from the saved file (``complement_energy`` chose it from the spectrum when the adapter was
        made; it is not recomputed)."""
        saved = state.get("U_c")
        if saved is not None and saved.dim() == 2 and saved.shape[1] != self.U_c.shape[1]:
            self.allocate(saved.shape[1], self.U_c.shape[0], self.V_c.shape[0], self.A.dtype, self.A.device)

    @torch.no_grad()
    def reset_parameters(self, base: BaseView) -> None:
        u, s, vh = svd_signed(base.weight)
        k = principal_count(s, self.config)
        if self.config.complement_energy is not None:
            self._check_fits(self.q - k)
            self.allocate(self.q - k, self.U_c.shape[0], self.V_c.shape[0], self.A.dtype, self.A.device)
        self.U_c.copy_(u[:, k:])
        self.V_c.copy_(vh[k:].T)
        init_lora_pair(self.A, self.B)  # A [r, p], B [p, r]: LoRA's init inside the subspace

    def factors(self) -> tuple[Tensor, Tensor]:
        """``down = A V_cᵀ`` (``[r, in]``) and ``up = U_c B`` (``[out, r]``)."""
        return self.A @ self.V_c.T, self.U_c @ self.B

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        down, up = self.factors()
        hidden = self.dropout(x) @ down.T
        return add_lowrank(base_out, hidden, up, self.scale)

    def delta_weight(self, base: BaseView) -> Tensor:
        down, up = self.factors()
        return self.scale * (up @ down)

    def lowrank(self, base: BaseView) -> LowRank:
        down, up = self.factors()
        return LowRank(down, up, self.scale)

    @classmethod
    def expected_trainable(cls, base: BaseView, config: CompLoRAConfig) -> int:
        return 2 * config.r * complement_size(base, config)
