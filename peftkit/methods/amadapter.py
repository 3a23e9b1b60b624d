"""AM-Adapter: a learnable 4D-convolution correlation refiner inside the augmented self-attention of a diffusion
U-Net (Jin, Nam, Kim, Chung, Kim, Park, Chu and Kim, 2025, "AM-Adapter: Appearance Matching Adapter for
Exemplar-based Semantic Image Synthesis in-the-Wild", ICCV 2025, arXiv 2412.03150; official code
cvlab-kaist/AM-Adapter, ``src/models/attention_processor.py`` (``MatchAttnProcessor``),
``src/models/matching_module.py``, ``src/models/conv4d.py``).

**Augmented self-attention.** A self-attention module (a ``diffusers`` ``Attention``, ``attn1`` of every
transformer block) gets the exemplar image's tokens ``x_e`` (its own input when the U-Net runs on the exemplar)
next to the target's ``x``: queries ``q = W_q x``, keys and values over ``[x; x_e]`` (``2n`` columns), per head
``A = q [k; k_e]ᵀ · scale ∈ R^{B×H×n×2n}``.

**Refiner.** The cross-image logits ``A[:, :, :, n:]`` (detached), seen as a 4-D correlation volume
``B×H×h×w×h'×w'`` (target grid ``h×w``, exemplar grid ``h'×w'``), plus one channel of the segmentation-label
correlation ``C[i, j] = 1`` where target token ``i`` and exemplar token ``j`` have the same class (else 0) give
``H + 1`` channels (9 for Stable Diffusion's 8 heads). ``Encoder4D``: four layers ``Conv4d → GroupNorm(1) → ReLU``
with channels ``H+1 → 16 → 32 → 16 → H`` and kernels ``(1, 1, 3, 3)`` (stride 1, padding ``(0, 0, 1, 1)``) give
``R``; then ``R ← R − max(R)/4``, ``A[:, :, :, n:] ← A[:, :, :, n:] + R`` per head, softmax over the ``2n``
columns, ``out = W_o(softmax(A) [v; v_e])`` as usual.

``Conv4d`` with kernel ``(1, 1, k, k)`` is, as in the official code, the sum of a ``1×1`` ``Conv2d`` over the
target pair ``(h, w)`` (one per exemplar position) and a ``k×k`` ``Conv2d`` over the exemplar pair ``(h', w')``
(one per target position), each with a bias. A ``1×1`` kernel only mixes channels, which is what the centre
tap of the ``k×k`` kernel does, so the sum is computed **exactly** as one ``Conv2d`` over the exemplar pair
(batched over the ``B·h·w`` target positions) with kernel ``W_e + pad(W_t)`` (``W_t`` at the centre) and bias
``b_t + b_e``. Parameters per layer ``c_in → c_out``: ``(1 + k²)·c_in·c_out + 2·c_out`` (two conv biases)
``+ 2·c_out`` (GroupNorm affine); with the defaults ``13 248`` per encoder. Init: torch default (convs),
GroupNorm weight 1, bias 0: **not** identity at init; not mergeable (softmax). Only the encoders train.

Where the correlation grid is larger than ``max_grid`` (the official code: the 64×64 stage to 32×32), the
logits are resized bilinearly over both pairs of axes, the label correlation is computed at the coarse grid,
and ``R − max(R)/4`` is bilinearly upsampled back.

**How the exemplar reaches the attention** (a documented setter; no core change): :func:`capture_exemplar`
runs a U-Net on the exemplar (by default the adapted model itself with its adapters disabled — the frozen
generator; or any ``source`` module with the same module paths, such as the official separate appearance
U-Net) and returns the input tokens of every adapted module, ``{path: x_e}``, as the official reference
"write" pass stores ``norm1`` outputs. :func:`set_exemplar` hands them (and the label maps) to every AM-Adapter
of the model until :func:`clear_exemplar` (or use the :func:`exemplar` context manager). The tokens are plain,
unsaved attributes: a saved adapter holds only the encoders.

**Without an exemplar**: ``without_exemplar="base"`` (default) returns the base module's output unchanged —
plain self-attention, exactly the base (the official processor also falls back to plain attention when no
exemplar is banked). ``"self"`` uses the target as its own exemplar (``x_e = x``; label channel from the
target's labels against themselves, or 0 without labels): with ``R = 0`` that equals plain self-attention
(``softmax([A, A])`` gives each copy half the weight), so only the refiner's shift changes the output. The
conformance suite's tiny config uses ``"self"`` (it has no exemplar to give).

**Other modules** (a Linear / GPT-2 Conv1D, what the conformance suite checks; *inferred*, not in the paper):
the same augmented attention with identity projections over the module's output tokens ``h`` split into
``heads`` heads (exemplar ``h_e = module(x_e)``), applied as a change: ``y = h + Aug_R(h; h_e) − Plain(h)``. For a
``diffusers`` attention ``h = Plain(x)``, so both are ``y = Aug_R``.

*Decisions (inferred or deviations from the official code)*:

* ``max(R)`` is taken per example (official: over the whole batch tensor), so each row's output depends on its
  own inputs only (mixed batches, batch 1 = official).
* The label correlation is built at each grid from the label maps (nearest resize; equality over all channels
  for colour maps) with rows = target, columns = exemplar, as the attention map is indexed. The official code
  builds one ``32×32`` correlation with rows = exemplar pixels and nearest-interpolates the *flattened* matrix to
  each size; it likewise resizes the 64×64 stage's logits on the flattened axes. We resize on the 2-D grids.
* One encoder per adapted module (the official code shares one per U-Net stage, down / mid / up): the
  protocol's unit is one adapter per module, saved under its path. The encoder's width follows the module's
  ``heads`` (8 in Stable Diffusion 1.5 everywhere).
* The grid of ``n`` tokens: a 4-D module input's own ``H×W``; else ``h×w = n`` with the aspect of the label maps
  (or ``set_exemplar(size=...)``); else square when ``n`` is a square number; else ``1×n``. The exemplar must
  have the target's token count (same image size, as in the paper).
* At inference with classifier-free guidance the official code zeroes ``R`` for the unconditional half;
  ``set_exemplar(shift_rows=mask)`` applies ``R`` only to the rows where ``mask`` is true.
* The adapter sees the attention module's input and output only (the protocol), so the module's
  ``attention_mask`` / ``encoder_hidden_states`` are not seen: adapt self-attention modules (``attn1``), which
  get neither in a Stable Diffusion U-Net, and the augmented attention is computed beside the base call.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.core.api import (
    AdaptedModel,
    Adapter,
    AdapterConfig,
    AdapterIdsError,
    BaseView,
    InvalidConfigError,
    PositiveInt,
    UnsupportedLayerError,
    layer_kind,
    register,
)

GN_EPS = 1e-5  # nn.GroupNorm's default, as in the official Encoder4D


def is_attention(module: nn.Module) -> bool:
    """Whether ``module`` looks like a ``diffusers`` ``Attention`` (``to_q``, ``to_k``, ``to_v``, ``to_out``,
    ``heads``; duck-typed, ``diffusers`` is not imported)."""
    return all(hasattr(module, a) for a in ("to_q", "to_k", "to_v", "to_out", "heads"))


@dataclass(kw_only=True)
class AMAdapterConfig(AdapterConfig):
    """Settings of AM-Adapter.

    Attributes:
        targets: the self-attention modules (default: ``attn1`` of every ``diffusers`` transformer block).
        heads: heads of the identity-projection attention on modules that are not a ``diffusers`` attention
            (a Linear's output tokens); a ``diffusers`` attention uses its own ``heads``.
        hidden: the encoder's inner widths (official ``16, 32, 16``); it maps ``heads + 1 → … → heads``.
        kernel: ``k`` of the ``(1, 1, k, k)`` 4-D kernels (official 3; odd).
        max_grid: grids with a side above this are refined at a coarser grid (official: 64×64 → 32×32).
        without_exemplar: ``"base"`` (default): no exemplar set → the base output; ``"self"``: the target is its
            own exemplar (see the module docstring).
    """

    targets: list[str] | str = r"(.*\.)?attn1"
    heads: PositiveInt = 8
    hidden: list[PositiveInt] = field(default_factory=lambda: [16, 32, 16])
    kernel: PositiveInt = 3
    max_grid: PositiveInt = 32
    without_exemplar: Literal["base", "self"] = "base"

    def validate(self) -> None:
        if self.kernel % 2 == 0:
            raise InvalidConfigError(f"kernel={self.kernel} must be odd (the 4-D kernel is centred, padding k//2)")

    tiny_fields: ClassVar[dict] = {"heads": 2, "hidden": [4, 4], "without_exemplar": "self"}
    variant_fields: ClassVar[list[dict]] = [{"max_grid": 2}]


# ------------------------------------------------------------------------------------------------ the refiner
class Conv4d(nn.Module):
    """A ``(1, 1, k, k)`` 4-D convolution over ``[B, h, w, C, h', w']`` (target pair first, channels, exemplar
    pair): ``1×1`` conv over the target pair + ``k×k`` conv over the exemplar pair, computed as one ``Conv2d``
    (see the module docstring)."""

    def __init__(self, c_in: int, c_out: int, kernel: int) -> None:
        super().__init__()
        self.target = nn.Conv2d(c_in, c_out, 1)  # the official query_conv
        self.exemplar = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2)  # the official supp_conv

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c, he, we = x.shape
        pad = self.exemplar.kernel_size[0] // 2
        weight = self.exemplar.weight + F.pad(self.target.weight, (pad, pad, pad, pad))
        bias = self.exemplar.bias + self.target.bias
        y = F.conv2d(x.reshape(b * h * w, c, he, we), weight, bias, padding=pad)
        return y.view(b, h, w, -1, he, we)


class Encoder4D(nn.Module):
    """``Conv4d → GroupNorm(1) → ReLU`` per layer over the channel widths ``widths``."""

    def __init__(self, widths: list[int], kernel: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(Conv4d(a, b, kernel) for a, b in itertools.pairwise(widths))
        self.norms = nn.ModuleList(nn.GroupNorm(1, b) for b in widths[1:])

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, h, w, C, h', w']`` → ``[B, h, w, C_out, h', w']``."""
        for conv, norm in zip(self.convs, self.norms):
            x = conv(x)
            # GroupNorm with one group: per example over every channel and position (biased variance)
            dims = (1, 2, 3, 4, 5)
            mean = x.mean(dims, keepdim=True)
            var = x.var(dims, unbiased=False, keepdim=True)
            shape = (1, 1, 1, -1, 1, 1)
            x = (x - mean) * torch.rsqrt(var + GN_EPS) * norm.weight.view(shape) + norm.bias.view(shape)
            x = F.relu(x)
        return x

    def reset_parameters(self) -> None:
        for conv in self.convs:
            conv.target.reset_parameters()
            conv.exemplar.reset_parameters()
        for norm in self.norms:
            norm.reset_parameters()


def encoder_params(heads: int, hidden: list[int], kernel: int) -> int:
    """Trainable parameters of one encoder: ``Σ (1 + k²)·c_in·c_out + 4·c_out`` over ``heads+1 → hidden → heads``."""
    widths = [heads + 1, *hidden, heads]
    return sum((1 + kernel * kernel) * a * b + 4 * b for a, b in itertools.pairwise(widths))


def resize_pairs(t: Tensor, grid: tuple[int, int]) -> Tensor:
    """Bilinear resize of both spatial pairs of ``t [B, h, w, C, h', w']`` to ``grid`` (``align_corners=False``)."""
    b, h, w, c, he, we = t.shape
    t = F.interpolate(t.reshape(b * h * w, c, he, we), size=grid, mode="bilinear", align_corners=False)
    t = t.reshape(b, h, w, c * grid[0] * grid[1]).permute(0, 3, 1, 2)
    t = F.interpolate(t, size=grid, mode="bilinear", align_corners=False)
    return t.permute(0, 2, 3, 1).reshape(b, grid[0], grid[1], c, grid[0], grid[1])


def label_correlation(target: Tensor, exemplar: Tensor, grid: tuple[int, int]) -> Tensor:
    """``C [B, h·w, h·w]``: 1 where target token ``i`` and exemplar token ``j`` (row-major on ``grid``) have the
    same label, else 0. Labels ``[B, H, W]`` (class ids) or ``[B, C, H, W]`` (colour maps: all channels equal),
    nearest-resized to ``grid``."""

    def at_grid(labels: Tensor) -> Tensor:
        lab = labels.unsqueeze(1) if labels.dim() == 3 else labels
        if lab.dim() != 4:
            raise InvalidConfigError(f"label maps must be [B, H, W] or [B, C, H, W], got {tuple(labels.shape)}")
        lab = F.interpolate(lab.float(), size=grid, mode="nearest")
        return lab.flatten(2)  # [B, C, h·w]

    t, e = at_grid(target), at_grid(exemplar)
    return (t.unsqueeze(-1) == e.unsqueeze(-2)).all(dim=1).float()


def refiner_input(cross_logits: Tensor, labels: Tensor, grid: tuple[int, int]) -> Tensor:
    """The encoder's input ``[B, h, w, H + 1, h', w']``: the ``H`` per-head cross-image logit maps
    ``cross_logits [B, H, n, n]`` (detached) and the label correlation ``labels [B, n, n]`` as the last channel."""
    b, heads = cross_logits.shape[:2]
    h, w = grid
    logits = cross_logits.detach().permute(0, 2, 1, 3)  # [B, n, H, n]
    volume = torch.cat([logits, labels.to(logits.dtype).unsqueeze(2)], dim=2)
    return volume.reshape(b, h, w, heads + 1, h, w)


# ------------------------------------------------------------------------------------------------ exemplar
@dataclass
class Exemplar:
    """What :func:`set_exemplar` hands an adapter: its exemplar input tokens (or ``None``: none for this
    module), the label maps, the reference image size and the rows that get the shift."""

    tokens: Tensor | None = None
    target_labels: Tensor | None = None
    exemplar_labels: Tensor | None = None
    size: tuple[int, int] | None = None
    shift_rows: Tensor | None = None


def token_grid(n: int, size: tuple[int, int] | None) -> tuple[int, int]:
    """The ``h×w`` grid of ``n`` row-major tokens (see the module docstring)."""
    if size is not None:
        h = max(1, round(math.sqrt(n * size[0] / size[1])))
        if n % h == 0:
            return h, n // h
        raise InvalidConfigError(f"{n} tokens do not tile a grid with the aspect of the label maps / size {size}")
    side = math.isqrt(n)
    return (side, side) if side * side == n else (1, n)


def _rows(t: Tensor | None, batch: int, what: str) -> Tensor | None:
    """``t`` broadcast to ``batch`` rows (a single row is shared)."""
    if t is None or t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise AdapterIdsError(
        f"AM-Adapter has {what} for {t.shape[0]} rows but runs on {batch}: a mixed batch (adapter_ids) runs an "
        "adapter on a subset of the rows, so give one exemplar shared by all rows (batch 1) there"
    )


# ------------------------------------------------------------------------------------------------ the method
@register("amadapter", AMAdapterConfig)
class AMAdapter(Adapter[AMAdapterConfig]):
    """Augmented self-attention ``[target; exemplar]`` with the 4-D refiner's shift on the cross-image logits."""

    kinds = frozenset({"linear", None})
    exempt: ClassVar[dict[str, str]] = {
        "identity_at_init": "spec: identity at init: no (the encoders start from the torch default init)",
        "mergeable": "spec: not mergeable (a shift inside a softmax attention)",
    }

    @classmethod
    def supports(cls, base: nn.Module) -> bool:
        kind = layer_kind(base)
        if kind == "linear":
            return True
        return kind is None and is_attention(base) and getattr(base, "spatial_norm", None) is None

    def __init__(self, base: BaseView, config: AMAdapterConfig) -> None:
        super().__init__(base, config)
        self.heads = self.heads_of(base, config)
        self.encoder = Encoder4D([self.heads + 1, *config.hidden, self.heads], config.kernel)
        self.exemplar: Exemplar | None = None  # set by set_exemplar; never saved

    @staticmethod
    def heads_of(base: BaseView, config: AMAdapterConfig) -> int:
        module = getattr(base, "module", None)
        if module is not None and is_attention(module):
            return int(module.heads)
        if base.out_features % config.heads:
            raise UnsupportedLayerError(f"AM-Adapter heads={config.heads} must divide the width {base.out_features}")
        return config.heads

    def reset_parameters(self, base: BaseView) -> None:
        self.encoder.reset_parameters()

    # ---------------------------------------------------------------------------------------------- forward
    def shift(self, cross_logits: Tensor, labels: Tensor, grid: tuple[int, int]) -> Tensor:
        """``R − max(R)/4`` (max per example) for the cross-image logits ``[B, H, n, n]`` and label correlation
        ``[B, n, n]``, as ``[B, H, n, n]``; refined at a coarser grid above ``max_grid``."""
        b, heads, n, _ = cross_logits.shape
        volume = refiner_input(cross_logits, labels, grid)
        limit = self.config.max_grid
        if max(grid) > limit:
            scale = limit / max(grid)
            coarse = (max(1, round(grid[0] * scale)), max(1, round(grid[1] * scale)))
            volume = resize_pairs(volume, coarse)
            if self.exemplar is not None and self.exemplar.target_labels is not None:  # labels at the coarse grid
                volume[:, :, :, -1] = self._labels(b, coarse).view(b, *coarse, *coarse)
        r = self.encoder(volume)
        r = r - r.amax(dim=(1, 2, 3, 4, 5), keepdim=True) / 4
        if r.shape[1:3] != grid:
            r = resize_pairs(r, grid)
        return r.reshape(b, n, heads, n).permute(0, 2, 1, 3)

    def _labels(self, batch: int, grid: tuple[int, int]) -> Tensor:
        ex = self.exemplar
        n = grid[0] * grid[1]
        if ex is None or ex.target_labels is None:
            return torch.zeros(batch, n, n, device=self.encoder.norms[0].weight.device)
        target = _rows(ex.target_labels, batch, "target labels")
        other = ex.exemplar_labels if ex.tokens is not None and ex.exemplar_labels is not None else ex.target_labels
        corr = label_correlation(target, _rows(other, batch, "exemplar labels"), grid)  # type: ignore[arg-type]
        return corr.to(self.encoder.norms[0].weight.device)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, n: int, grid: tuple[int, int] | None, scale: float
    ) -> tuple[Tensor, Tensor]:
        """Per head ``softmax(q kᵀ·scale + [0, S]) v`` for ``q [B, H, n, e]`` and ``k, v [B, H, n + m, e]``, with the
        shift ``S`` on the cross-image columns (``grid=None``: no shift, the frozen augmented attention).
        Returns the output ``[B, H, n, e]`` and the probabilities ``[B, H, n, n + m]``."""
        logits = q @ k.transpose(-1, -2) * scale
        if grid is not None and k.shape[-2] > n:
            s = self.shift(logits[..., n:], self._labels(q.shape[0], grid).to(logits.dtype), grid)
            rows = self.exemplar.shift_rows if self.exemplar is not None else None
            if rows is not None:
                s = s * _rows(rows, q.shape[0], "shift_rows").to(s).view(-1, 1, 1, 1)
            logits = torch.cat([logits[..., :n], logits[..., n:] + s.to(logits.dtype)], dim=-1)
        probs = torch.softmax(logits, dim=-1)
        return probs @ v, probs

    def _exemplar_tokens(self, x: Tensor) -> Tensor | None:
        ex = self.exemplar
        if ex is not None and ex.tokens is not None:
            tokens = _rows(ex.tokens.to(device=x.device, dtype=x.dtype), x.shape[0], "exemplar tokens")
            assert tokens is not None
            if tokens.shape[1:] != x.shape[1:]:
                raise InvalidConfigError(
                    f"AM-Adapter exemplar tokens {tuple(tokens.shape)} do not match the target's {tuple(x.shape)} "
                    "(the exemplar must have the target's size)"
                )
            return tokens
        return x if self.config.without_exemplar == "self" else None

    def _size(self) -> tuple[int, int] | None:
        ex = self.exemplar
        if ex is None:
            return None
        if ex.size is not None:
            return ex.size
        labels = ex.target_labels
        return None if labels is None else (int(labels.shape[-2]), int(labels.shape[-1]))

    def augmented(self, attn: nn.Module, x: Tensor, x_e: Tensor, *, shift: bool = True) -> tuple[Tensor, Tensor]:
        """A ``diffusers`` ``Attention``'s forward with keys / values over ``[x; x_e]`` (its own processing:
        group norm, q/k norms, scale, output projection, residual, rescale), the refiner's shift on the
        cross-image logits unless ``shift=False``. Returns the output and the attention probabilities."""
        residual, size = x, self._size()
        four_d = x.dim() == 4
        if four_d:
            b, c, hh, ww = x.shape
            size = (hh, ww)
            x, x_e = (t.reshape(b, c, hh * ww).transpose(1, 2) for t in (x, x_e))
        if x.dim() != 3:
            raise InvalidConfigError(f"AM-Adapter expects tokens [B, n, C] or maps [B, C, H, W], got {tuple(x.shape)}")
        if attn.group_norm is not None:
            x, x_e = (attn.group_norm(t.transpose(1, 2)).transpose(1, 2) for t in (x, x_e))
        b, n, _ = x.shape
        both = torch.cat([x, x_e], dim=1)
        q, k, v = attn.to_q(x), attn.to_k(both), attn.to_v(both)
        heads = int(attn.heads)
        e = k.shape[-1] // heads
        q, k, v = (t.view(b, -1, heads, e).transpose(1, 2) for t in (q, k, v))
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        if getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k)
        grid = token_grid(n, size) if shift else None
        out, probs = self.attend(q, k, v, n, grid, float(attn.scale))
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(b, n, heads * e).to(q.dtype)))
        if four_d:
            out = out.transpose(-1, -2).reshape(residual.shape)
        if getattr(attn, "residual_connection", False):
            out = out + residual
        return out / getattr(attn, "rescale_output_factor", 1.0), probs

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        x_e = self._exemplar_tokens(x)
        if x_e is None:
            return base_out  # no exemplar: plain self-attention, the base itself
        module = getattr(base, "module", None)
        if module is not None and is_attention(module):
            return self.augmented(module, x, x_e)[0].to(base_out.dtype)
        # any other module: identity-projection attention over its output tokens, applied as a change
        if base_out.dim() != 3:
            raise InvalidConfigError(
                f"AM-Adapter on a {type(module or base).__name__} needs tokens [B, n, C], got {tuple(base_out.shape)}"
            )
        h = base_out
        h_e = h if x_e is x else base(x_e).to(h.dtype)
        b, n, d = h.shape
        e = d // self.heads
        split = lambda t: t.view(b, -1, self.heads, e).transpose(1, 2)  # noqa: E731
        q, both = split(h), split(torch.cat([h, h_e], dim=1))
        grid = token_grid(n, self._size())
        augmented, _ = self.attend(q, both, both, n, grid, e**-0.5)
        plain = F.scaled_dot_product_attention(q, q, q)
        return h + (augmented - plain).transpose(1, 2).reshape(b, n, d)

    @classmethod
    def expected_trainable(cls, base: BaseView, config: AMAdapterConfig) -> int:  # type: ignore[override]
        return encoder_params(cls.heads_of(base, config), list(config.hidden), config.kernel)


# ------------------------------------------------------------------------------------------------ the setter
def am_adapters(model: AdaptedModel) -> dict[str, list[AMAdapter]]:
    """``{module path: [AM-Adapters at that module]}`` over every adapter name of ``model``."""
    found: dict[str, list[AMAdapter]] = {}
    for name in model.adapter_names:
        for path, adapter in model.adapter_modules(name).items():
            if isinstance(adapter, AMAdapter):
                found.setdefault(path, []).append(adapter)
    return found


def set_exemplar(
    model: AdaptedModel,
    tokens: Mapping[str, Tensor] | None = None,
    *,
    target_labels: Tensor | None = None,
    exemplar_labels: Tensor | None = None,
    size: tuple[int, int] | None = None,
    shift_rows: Tensor | None = None,
) -> None:
    """Give every AM-Adapter of ``model`` its exemplar until :func:`clear_exemplar`.

    Args:
        tokens: ``{module path: exemplar input tokens}`` (from :func:`capture_exemplar`), one row per batch row
            or a single row for all; every AM-adapted path must be present. ``None``: no exemplar (each adapter
            follows its ``without_exemplar``).
        target_labels, exemplar_labels: label maps ``[B, H, W]`` (class ids) or ``[B, C, H, W]`` (colour maps)
            of the target and the exemplar for the label-correlation channel (without them it is 0).
        size: ``(H, W)`` whose aspect gives the token grids when no label maps are given.
        shift_rows: bool ``[B]``: rows that get the refiner's shift (classifier-free guidance: the conditional
            half); the others get the frozen augmented attention.

    Raises:
        InvalidConfigError: a missing or unknown path, labels given for one side only, or a model without
            AM-Adapters.
    """
    adapters = am_adapters(model)
    if not adapters:
        raise InvalidConfigError("the model holds no AM-Adapter")
    if (target_labels is None) != (exemplar_labels is None) and tokens is not None:
        raise InvalidConfigError("give both target_labels and exemplar_labels (or neither)")
    if tokens is not None:
        missing, unknown = set(adapters) - set(tokens), set(tokens) - set(adapters)
        if missing or unknown:
            raise InvalidConfigError(
                f"exemplar tokens must name every AM-adapted module: missing {sorted(missing)}, "
                f"unknown {sorted(unknown)}"
            )
    for path, mods in adapters.items():
        state = Exemplar(
            None if tokens is None else tokens[path].detach(),
            target_labels,
            exemplar_labels,
            None if size is None else (int(size[0]), int(size[1])),
            None if shift_rows is None else shift_rows.bool(),
        )
        for adapter in mods:
            adapter.exemplar = state


def clear_exemplar(model: AdaptedModel) -> None:
    """Drop the exemplar of every AM-Adapter of ``model``."""
    for mods in am_adapters(model).values():
        for adapter in mods:
            adapter.exemplar = None


@contextmanager
def exemplar(model: AdaptedModel, tokens: Mapping[str, Tensor] | None, **fields: Any) -> Iterator[None]:
    """:func:`set_exemplar` for the duration of a ``with`` block (then :func:`clear_exemplar`)."""
    set_exemplar(model, tokens, **fields)
    try:
        yield
    finally:
        clear_exemplar(model)


def capture_exemplar(
    model: AdaptedModel, run: Callable[[nn.Module], Any], source: nn.Module | None = None
) -> dict[str, Tensor]:
    """The input tokens of every AM-adapted module when ``run(module)`` runs a U-Net on the exemplar.

    ``run`` gets ``source`` (any module with the same module paths, e.g. a separate appearance U-Net) or, by
    default, ``model`` with its adapters disabled (the frozen generator), and calls it, e.g.
    ``lambda unet: unet(latents_e, t, encoder_hidden_states=text)``. Runs under ``no_grad``.
    """
    paths = list(am_adapters(model))
    if not paths:
        raise InvalidConfigError("the model holds no AM-Adapter")
    owner = source if source is not None else model.get_base_model()
    captured: dict[str, Tensor] = {}

    def hook(path: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            first = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
            captured[path] = first.detach()

        return record

    hooks = [owner.get_submodule(p).register_forward_pre_hook(hook(p), with_kwargs=True) for p in paths]
    try:
        with torch.no_grad():
            if source is not None:
                run(source)
            else:
                with model.adapters_disabled():
                    run(model)
    finally:
        for h in hooks:
            h.remove()
    missing = [p for p in paths if p not in captured]
    if missing:
        raise InvalidConfigError(f"the exemplar run never called the modules {missing}")
    return captured
