"""Bi-LoRA and Bi-AdaptFormer: 1-bit (low-precision) adapters (Jie et al., 2023, "Revisiting the Parameter
Efficiency of Adapters from the Perspective of Precision Redundancy"; official code JieShibo/PETL-ViT,
``binary_adapter/``).

Each adapter weight ``W`` (latent, full precision, trainable; no biases) is fake-quantised every forward to
``b`` bits: ``μ = mean(W)``, ``σ = std(W)`` (unbiased, differentiable), ``û = (W − μ)/(σ + 1e-5)``,
``ŵ = v[code(û)]`` with the straight-through estimator ``ŵ = û + (v[code(û)] − û).detach()``, and
``W_q = ŵ·σ + μ``. The codebook ``v`` (``2^b`` values) is the fixed point of 500 median iterations for a
standard normal (``b = 1``: ``±0.6745``, threshold 0; for ``b = 8`` the official 500 iterations from zeros have
not converged: the middle codes stay ~1e-15 apart, so fewer than 256 values are used in practice — kept as
official); ``code(û)`` is the cell of ``û`` between thresholds.

* Bi-LoRA (``bi_lora``, Linear): ``y = base(x) + s · drop(x Q(down)ᵀ) Q(up)ᵀ``: dropout after the down
  projection, as the official ``binary_adapter/lora.py`` (``Adapter.forward``: ``adapter_down`` → identity
  activation → ``nn.Dropout(0.1)`` → ``adapter_up``); ``ΔW = s·Q(up) Q(down)`` (exact merge after
  dequantisation, dropout being off in eval; a low-rank form for serving).
* Bi-AdaptFormer (``bi_adaptformer``, Linear or a whole module, placement presets of
  :mod:`peftkit.methods.bottleneck`): ``y = F(x) + s · Q(up)(drop(ReLU(Q(down) x)))``; not mergeable. Its
  default placement is the ``"parallel"`` preset: beside the whole MLP, so ``x = LN2(x₁)`` rather than the
  official un-normalised ``x₁`` (the same *decision* as for AdaptFormer there).

Trainable: ``r·(d_in + d_out)``. Init: ``down`` torch default (Kaiming-uniform a=√5), ``up`` truncated normal
(std 1e-3 at ±2e-3): not identity at init (the quantised ``up`` is ``±0.6745σ + μ``).

**Saved state: two forms.** *Decision* (the official code has only the second, and never trains from it):

* ``model.save`` (default, the training checkpoint): the latent fp32 weights ``down``, ``up`` — the adapter's
  whole state (``μ``, ``σ`` and the codes are recomputed from them every forward), so save → load → further
  training continues exactly as without the save. Size: ``4·numel`` bytes per tensor (32/``b`` times the
  packed form).
* :func:`save_packed` (the deployable ``b``-bit form of the paper): per weight ``<name>_codes`` (uint8, the
  ``b``-bit codes packed ``8/b`` per byte: ``ceil(b·numel/8)`` bytes) and ``<name>_stats`` (fp32 ``[μ, σ]``: 8
  bytes). Loading it reproduces the forward exactly. It is an inference form: the latent weights are gone, so
  a loaded packed adapter restarts them at the dequantised values, whose own ``μ``, ``σ`` differ from the saved
  ones, so its first training step, however small, changes the adapter's contribution to the output (by 55%
  for a tiny 1-bit Bi-LoRA, 23% at 2 bits), and it saves in packed form again.

Loading recognises the form from the saved tensor names. *Decisions*: ``b ∈ {1, 2, 4, 8}`` (the 32-bit "no
quantisation" setting is plain LoRA / AdaptFormer); a value exactly on a threshold goes to the lower cell
(official ``sign(0) = 0`` would give the midpoint, which is not a code); input width from the target module
(official hard-codes 768).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.core.api import (
    AdaptedModel,
    Adapter,
    AdapterConfig,
    BaseView,
    InvalidConfigError,
    LowRank,
    PositiveInt,
    Probability,
    register,
)
from peftkit.methods.bottleneck import PRESETS

QUANTISED = ("down", "up")  # the latent weights every 1-bit adapter quantises
PACKED_KEYS = tuple(f"{n}_{part}" for n in QUANTISED for part in ("codes", "stats"))  # the packed form's tensors


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

    r: PositiveInt = 32
    bits: Literal[1, 2, 4, 8] = 1
    scale: float = 1.0
    dropout: Probability = 0.1

    tiny_fields: ClassVar[dict] = {"r": 2, "dropout": 0.0}
    variant_fields: ClassVar[list[dict]] = [{"r": 3, "bits": 2, "dropout": 0.1}]


@dataclass(kw_only=True)
class BiLoRAConfig(OneBitConfig):
    """Bi-LoRA: 1-bit LoRA on the attention query and value projections (BERT / HF ViT names by default)."""

    targets: list[str] | str = r"(.*\.)?(query|value|q_proj|v_proj)"


@dataclass(kw_only=True)
class BiAdaptFormerConfig(OneBitConfig):
    """Bi-AdaptFormer: a 1-bit parallel adapter beside every MLP (the ``"parallel"`` placement preset)."""

    targets: list[str] | str = PRESETS["parallel"]


class _OneBit(Adapter[OneBitConfig]):
    """Latent weights ``down [r, d_in]``, ``up [d_out, r]``; saved as themselves (``saved_form == "latent"``) or
    as packed codes + ``[μ, σ]`` (``"packed"``, see :func:`save_packed`)."""

    exempt: ClassVar[dict[str, str]] = {
        "identity_at_init": "spec: not identity for b ≤ 8 (the quantised up weight is ±0.6745σ + μ, non-zero)"
    }

    def __init__(self, base: BaseView, config: OneBitConfig) -> None:
        super().__init__(base, config)
        self.bits = config.bits
        self.down = nn.Parameter(torch.empty(config.r, base.in_features))
        self.up = nn.Parameter(torch.empty(base.out_features, config.r))
        # The packed form's tensors: not persistent, state_dict() emits them only in the packed saved form.
        for name in QUANTISED:
            numel = getattr(self, name).numel()
            codes = torch.zeros(math.ceil(config.bits * numel / 8), dtype=torch.uint8)
            self.register_buffer(f"{name}_codes", codes, persistent=False)
            self.register_buffer(f"{name}_stats", torch.zeros(2), persistent=False)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        #: What ``state_dict()`` (hence ``model.save``) holds: ``"latent"`` fp32 weights or ``"packed"`` codes.
        self.saved_form: Literal["latent", "packed"] = "latent"
        self._file_versions: tuple[int, ...] | None = None  # latent versions while the loaded codes rule

    @torch.no_grad()
    def reset_parameters(self, base: BaseView) -> None:
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        nn.init.trunc_normal_(self.up, std=1e-3, a=-2e-3, b=2e-3)
        self._file_versions = None

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

    # ------------------------------------------------------------------------------------------- saved state
    @torch.no_grad()
    def _pack(self) -> None:
        """Write the latent weights' codes and ``[μ, σ]`` into the packed-form buffers."""
        for name in QUANTISED:
            w = getattr(self, name).detach()
            mu, sigma = self._stats(w)
            getattr(self, f"{name}_codes").copy_(pack_codes(self._codes(w, mu, sigma), self.bits))
            getattr(self, f"{name}_stats").copy_(torch.stack([mu, sigma]))

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        if self.saved_form == "latent":  # the latent parameters (the non-persistent packed buffers are left out)
            super()._save_to_state_dict(destination, prefix, keep_vars)
            return
        if not self._from_file():  # the latent weights moved since loading: their codes now
            self._pack()
        for key in PACKED_KEYS:
            t = self._buffers[key]
            assert t is not None
            destination[prefix + key] = t if keep_vars else t.detach()

    @torch.no_grad()
    def fit_state(self, state: dict[str, Tensor]) -> None:
        """Loading: take the saved form from the tensor names. Latent weights are copied in afterwards and
        rule the forward as before saving. Packed codes: the latent weights restart at the dequantised saved
        weights, and the codes rule the forward until the latent weights are changed (trained)."""
        if not any(key in state for key in PACKED_KEYS):
            self.saved_form = "latent"
            self._file_versions = None
            return
        self.saved_form = "packed"
        for name in QUANTISED:
            if f"{name}_codes" not in state or f"{name}_stats" not in state:
                continue  # incomplete: the caller's key check names what is missing
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
        # torch's load_state_dict path (pk.load calls fit_state, then copies into what state_dict names)
        if not any(prefix + k in state_dict for k in PACKED_KEYS):  # the latent form: torch's own loading
            self.saved_form = "latent"
            self._file_versions = None
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
            return
        missing = [prefix + k for k in PACKED_KEYS if prefix + k not in state_dict]
        if missing:
            missing_keys.extend(missing)
            return
        with torch.no_grad():
            for k in PACKED_KEYS:
                self._buffers[k].copy_(state_dict[prefix + k])  # type: ignore[union-attr]
        self.fit_state({k: state_dict[prefix + k] for k in PACKED_KEYS})

    # ---------------------------------------------------------------------------------------------- shared
    def _drop(self, h: Tensor) -> Tensor:
        return self.dropout(h) if self.dropout is not None else h

    @classmethod
    def expected_trainable(cls, base: BaseView, config: OneBitConfig) -> int:
        return config.r * (base.in_features + base.out_features)


@register("bi_lora", BiLoRAConfig)
class BiLoRA(_OneBit):
    """``y = base(x) + s · drop(x Q(down)ᵀ) Q(up)ᵀ``; mergeable (``ΔW = s·Q(up)Q(down)``)."""

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        # Dropout after the down projection, as the official binary_adapter/lora.py (Adapter.forward).
        hidden = self._drop(x @ self.quantised("down").T)
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
    kinds = frozenset({"linear", None})  # Linear / Conv1D, or a whole module ("module" kind)

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        hidden = self._drop(F.relu(x @ self.quantised("down").T))
        return base_out + self.config.scale * (hidden @ self.quantised("up").T)


def save_packed(model: AdaptedModel, path: str | Path, name: str | None = None) -> Path:
    """Save 1-bit adapter ``name`` of ``model`` into folder ``path`` in its deployable ``b``-bit form: per weight
    the packed codes (``ceil(b·numel/8)`` bytes) and fp32 ``[μ, σ]`` (8 bytes), as the paper stores adapters.

    ``pk.load`` reads it back with exactly the same outputs; it is an inference form (the latent weights are not
    kept, see the module docstring): checkpoint training with ``model.save``. Returns the folder.

    Args:
        model: the adapted model.
        path: the folder to write (as ``model.save``).
        name: the adapter; default: the model's only adapter.

    Raises:
        InvalidConfigError: ``name`` is not given and the model holds several adapters, or the adapter is not a
            Bi-LoRA / Bi-AdaptFormer adapter.
    """
    if name is None:
        if len(model.adapter_names) != 1:
            raise InvalidConfigError(f"name is needed: the model holds adapters {list(model.adapter_names)}")
        name = model.adapter_names[0]
    modules = model.adapter_modules(name)
    if not all(isinstance(m, _OneBit) for m in modules.values()):
        raise InvalidConfigError(
            f"adapter {name!r} is a {type(model.configs[name]).method!r} adapter, not a 1-bit one "
            "(bi_lora, bi_adaptformer)"
        )
    before = {path_: m.saved_form for path_, m in modules.items()}
    try:
        for m in modules.values():
            m.saved_form = "packed"
        return model.save(path, name)
    finally:
        for path_, m in modules.items():
            m.saved_form = before[path_]  # type: ignore[assignment]
