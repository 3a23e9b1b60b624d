"""Bi-LoRA and Bi-AdaptFormer: 1-bit (low-precision) adapters (spec ``shared/methods/adapters.md``,
"Bi-AdaptFormer / Bi-LoRA"; official JieShibo/PETL-ViT ``binary_adapter/``; Jie et al., 2023, "Revisiting
the Parameter Efficiency of Adapters from the Perspective of Precision Redundancy").

Each adapter weight ``W`` (latent, full precision, trainable; no biases) is fake-quantised every forward to
``b`` bits: ``μ = mean(W)``, ``σ = std(W)`` (unbiased, differentiable), ``û = (W − μ)/(σ + 1e-5)``,
``ŵ = v[code(û)]`` with the straight-through estimator ``ŵ = û + (v[code(û)] − û).detach()``, and
``W_q = ŵ·σ + μ``. The codebook ``v`` (``2^b`` values) is the fixed point of 500 median iterations for a
standard normal (``b = 1``: ``±0.6745``, threshold 0; for ``b = 8`` the official 500 iterations from zeros have
not converged: the middle codes stay ~1e-15 apart, so fewer than 256 values are used in practice — kept as
official); ``code(û)`` is the cell of ``û`` between thresholds.

* Bi-LoRA (``bi_lora``, Linear): ``y = base(x) + s · drop(x) Q(down)ᵀ Q(up)ᵀ``; ``ΔW = s·Q(up) Q(down)``
  (exact merge after dequantisation; a low-rank form for serving).
* Bi-AdaptFormer (``bi_adaptformer``, Linear or a whole module, placement presets of
  :mod:`peftkit.methods.bottleneck`): ``y = F(x) + s · Q(up)(drop(ReLU(Q(down) x)))``; not mergeable. Its
  default placement is the ``"parallel"`` preset: beside the whole MLP, so ``x = LN2(x₁)`` rather than the
  official un-normalised ``x₁`` (the same *decision* as for AdaptFormer there).

Trainable: ``r·(d_in + d_out)``. Init: ``down`` torch default (Kaiming-uniform a=√5), ``up`` truncated normal
(std 1e-3 at ±2e-3): not identity at init (the quantised ``up`` is ``±0.6745σ + μ``).

**Saved state = packed bits.** ``state_dict()`` holds, per weight, ``<name>_codes`` (uint8, the ``b``-bit
codes packed ``8/b`` per byte: ``ceil(b·numel/8)`` bytes) and ``<name>_stats`` (fp32 ``[μ, σ]``: 8 bytes) — never
the latent weights. A loaded adapter runs from those codes exactly (same outputs as before saving); its latent
weights restart at the dequantised values, and once they are trained (changed in place) the forward follows
them again. *Decisions*: ``b ∈ {1, 2, 4, 8}`` (the 32-bit "no quantisation" setting is plain LoRA / AdaptFormer);
a value exactly on a threshold goes to the lower cell (official ``sign(0) = 0`` would give the midpoint,
which is not a code); input width from the target module (official hard-codes 768).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.core.base import BaseView, layer_kind
from peftkit.core.errors import InvalidConfigError
from peftkit.core.protocol import Adapter, AdapterConfig, LowRank, require_positive_int, require_probability
from peftkit.core.registry import register
from peftkit.methods.bottleneck import PRESETS

BITS = (1, 2, 4, 8)
QUANTISED = ("down", "up")  # the latent weights every 1-bit adapter quantises


@functools.cache
def normal_codebook(bits: int) -> tuple[Tensor, Tensor]:
    """``(values [2^b], thresholds [2^b − 1])`` for a standard normal: 500 fixed-point iterations from zeros of
    ``t_j = (v_j + v_{j+1})/2``, ``p = [0, Φ(t), 1]``, ``v_i = Φ⁻¹((p_i + p_{i+1})/2)`` (cell medians)."""
    v = torch.zeros(2**bits, dtype=torch.float64)
    for _ in range(500):
        t = (v[:-1] + v[1:]) / 2
        p = torch.cat([torch.zeros(1, dtype=v.dtype), torch.special.ndtr(t), torch.ones(1, dtype=v.dtype)])
        v = torch.special.ndtri((p[:-1] + p[1:]) / 2)
    return v.float(), ((v[:-1] + v[1:]) / 2).float()


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """``b``-bit codes (any shape, values < 2^b) -> uint8 ``[ceil(b·numel/8)]``, code ``j`` of a byte at bit ``b·j``."""
    per = 8 // bits
    flat = codes.flatten().to(torch.uint8)
    flat = F.pad(flat, (0, -flat.numel() % per)).view(-1, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (flat << shifts).sum(1, dtype=torch.uint8)


def unpack_codes(packed: Tensor, bits: int, shape: torch.Size) -> Tensor:
    """Inverse of :func:`pack_codes` (int64 codes of ``shape``)."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed[:, None] >> shifts) & (2**bits - 1)
    return codes.flatten()[: math.prod(shape)].view(shape).long()


@dataclass(kw_only=True)
class OneBitConfig(AdapterConfig):
    """Settings shared by the 1-bit adapters.

    Attributes:
        r: adapter rank / bottleneck (official sweeps 1 and 32).
        bits: ``b`` bits per weight, one of 1, 2, 4, 8 (default 1).
        scale: the output scale ``s`` (official per-dataset values 0.01 … 100; default 1.0).
        dropout: dropout on the branch (0.1 official; off in eval mode).
    """

    r: int = 32
    bits: int = 1
    scale: float = 1.0
    dropout: float = 0.1

    def validate(self) -> None:
        require_positive_int("r", self.r)
        require_probability("dropout", self.dropout)
        if self.bits not in BITS:
            raise InvalidConfigError(f"bits must be one of {BITS}, got {self.bits!r}")

    @classmethod
    def tiny(cls) -> OneBitConfig:
        return cls(r=2, dropout=0.0)

    @classmethod
    def tiny_variants(cls) -> list[AdapterConfig]:
        return [cls.tiny(), cls(r=3, bits=2, dropout=0.1)]


@dataclass(kw_only=True)
class BiLoRAConfig(OneBitConfig):
    """Bi-LoRA: 1-bit LoRA on the attention query and value projections (BERT / HF ViT names by default)."""

    targets: list[str] | str = r"(.*\.)?(query|value|q_proj|v_proj)"


@dataclass(kw_only=True)
class BiAdaptFormerConfig(OneBitConfig):
    """Bi-AdaptFormer: a 1-bit parallel adapter beside every MLP (the ``"parallel"`` placement preset)."""

    targets: list[str] | str = PRESETS["parallel"]


class _OneBit(Adapter):
    """Latent weights ``down [r, d_in]``, ``up [d_out, r]``; saved as packed codes + ``[μ, σ]``."""

    config: OneBitConfig
    exempt: ClassVar[dict[str, str]] = {
        "identity_at_init": "spec: not identity for b ≤ 8 (the quantised up weight is ±0.6745σ + μ, non-zero)"
    }

    def __init__(self, base: BaseView, config: OneBitConfig) -> None:
        super().__init__(base, config)
        self.bits = config.bits
        self.down = nn.Parameter(torch.empty(config.r, base.in_features))
        self.up = nn.Parameter(torch.empty(base.out_features, config.r))
        for name in QUANTISED:
            numel = getattr(self, name).numel()
            self.register_buffer(f"{name}_codes", torch.zeros(math.ceil(config.bits * numel / 8), dtype=torch.uint8))
            self.register_buffer(f"{name}_stats", torch.zeros(2))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self._file_versions: tuple[int, ...] | None = None  # latent versions while the loaded codes rule

    @torch.no_grad()
    def reset_parameters(self, base: BaseView) -> None:
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        nn.init.trunc_normal_(self.up, std=1e-3, a=-2e-3, b=2e-3)
        self._file_versions = None
        self._pack()

    # -------------------------------------------------------------------------------------------- quantiser
    def _stats(self, w: Tensor) -> tuple[Tensor, Tensor]:
        return w.mean(), w.std()

    def _codes(self, w: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
        _, thresholds = normal_codebook(self.bits)
        return torch.bucketize((w - mu) / (sigma + 1e-5), thresholds.to(w.device))

    def _dequant(self, codes: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
        values, _ = normal_codebook(self.bits)
        return values.to(codes.device)[codes] * sigma + mu

    def _from_file(self) -> bool:
        """Whether the loaded codes still define the weights (the latent ones are untouched since loading)."""
        return self._file_versions == tuple(getattr(self, n)._version for n in QUANTISED)

    def quantised(self, name: str) -> Tensor:
        """``W_q`` of latent weight ``name`` (with the straight-through gradient when grad is enabled)."""
        w = getattr(self, name)
        if self._from_file():  # exactly the saved weights; gradients pass straight to the latent copy
            stats = getattr(self, f"{name}_stats")
            codes = unpack_codes(getattr(self, f"{name}_codes"), self.bits, w.shape)
            fixed = self._dequant(codes, stats[0], stats[1]).to(w.dtype)
            return fixed + (w - w.detach()) if torch.is_grad_enabled() and w.requires_grad else fixed
        mu, sigma = self._stats(w)
        codes = self._codes(w.detach(), mu.detach(), sigma.detach())
        if not (torch.is_grad_enabled() and w.requires_grad):
            return self._dequant(codes, mu, sigma)
        values, _ = normal_codebook(self.bits)
        u = (w - mu) / (sigma + 1e-5)
        u_q = u + (values.to(w.device, w.dtype)[codes] - u).detach()  # straight-through estimator
        return u_q * sigma + mu

    # ------------------------------------------------------------------------------------- saved state: bits
    @torch.no_grad()
    def _pack(self) -> None:
        """Write the latent weights' codes and ``[μ, σ]`` into the saved buffers."""
        for name in QUANTISED:
            w = getattr(self, name).detach()
            mu, sigma = self._stats(w)
            getattr(self, f"{name}_codes").copy_(pack_codes(self._codes(w, mu, sigma), self.bits))
            getattr(self, f"{name}_stats").copy_(torch.stack([mu, sigma]))

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        # Only the packed codes and the stats are saved (never the latent weights).
        if not self._from_file():
            self._pack()
        for name in QUANTISED:
            for key in (f"{name}_codes", f"{name}_stats"):
                t = self._buffers[key]
                assert t is not None
                destination[prefix + key] = t if keep_vars else t.detach()

    @torch.no_grad()
    def fit_state(self, state: dict[str, Tensor]) -> None:
        """Loading: the latent weights restart at the dequantised saved weights; the codes rule the forward
        until the latent weights are changed (trained)."""
        for name in QUANTISED:
            w = getattr(self, name)
            codes = unpack_codes(state[f"{name}_codes"].to(w.device), self.bits, w.shape)
            stats = state[f"{name}_stats"].to(w.device)
            w.copy_(self._dequant(codes, stats[0], stats[1]))
        self._file_versions = tuple(getattr(self, n)._version for n in QUANTISED)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # torch's load_state_dict path (pk.load copies into the buffers after calling fit_state)
        keys = [f"{n}_{part}" for n in QUANTISED for part in ("codes", "stats")]
        missing = [prefix + k for k in keys if prefix + k not in state_dict]
        if missing:
            missing_keys.extend(missing)
            return
        with torch.no_grad():
            for k in keys:
                self._buffers[k].copy_(state_dict[prefix + k])  # type: ignore[union-attr]
        self.fit_state({k: state_dict[prefix + k] for k in keys})

    # ---------------------------------------------------------------------------------------------- shared
    def _drop(self, h: Tensor) -> Tensor:
        return self.dropout(h) if self.dropout is not None else h

    @classmethod
    def expected_trainable(cls, base: BaseView, config: OneBitConfig) -> int:
        return config.r * (base.in_features + base.out_features)


@register("bi_lora", BiLoRAConfig)
class BiLoRA(_OneBit):
    """``y = base(x) + s · drop(x) Q(down)ᵀ Q(up)ᵀ``; mergeable (``ΔW = s·Q(up)Q(down)``)."""

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        hidden = self._drop(x) @ self.quantised("down").T
        return base_out + self.config.scale * (hidden @ self.quantised("up").T)

    def delta_weight(self, base: BaseView) -> Tensor:
        return self.config.scale * (self.quantised("up") @ self.quantised("down"))

    def lowrank(self, base: BaseView) -> LowRank:
        return LowRank(self.quantised("down"), self.quantised("up"), self.config.scale)


@register("bi_adaptformer", BiAdaptFormerConfig)
class BiAdaptFormer(_OneBit):
    """``y = F(x) + s · Q(up)(drop(ReLU(Q(down) x)))`` beside a linear or a whole module; not mergeable."""

    exempt: ClassVar[dict[str, str]] = {
        **_OneBit.exempt,
        "mergeable": "spec: Bi-AdaptFormer is not mergeable (ReLU between the projections)",
    }

    @classmethod
    def supports(cls, base: nn.Module) -> bool:
        return layer_kind(base) in ("linear", None)  # Linear / Conv1D, or a whole module ("module" kind)

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        hidden = self._drop(F.relu(x @ self.quantised("down").T))
        return base_out + self.config.scale * (hidden @ self.quantised("up").T)
