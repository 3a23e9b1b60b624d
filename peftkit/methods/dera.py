"""ToonComposer's spatial low-rank adapter (DeRA) and spatial-only targeting for spatio-temporal models
(Li et al., 2025, "ToonComposer: Streamlining Cartoon Production with Generative Post-Keyframing"; official
code TencentARC/ToonComposer, ``model/dera.py``, ``model/dit.py``).

**DeRA** adds a low-rank branch parallel to a (spatio-temporal) self-attention module ``SelfAttn``:
``z = down(x)`` reshaped to ``(B·T) × (h·w) × R`` (one sequence per frame),
``z' = o(Attn(RoPE₂D(q(z)), RoPE₂D(k(z)), v(z)))`` (full attention over the ``h·w`` tokens of one frame, 4 heads),
``y = SelfAttn(x) + up(z')``. ``down: Linear(d→R)`` and ``up: Linear(R→d)`` without bias, ``q, k, v, o:
Linear(R→R)`` with bias: ``2dR + 4R² + 4R`` trainable. ``up = 0`` at init (identity at init); the rest torch
default. Not mergeable (contains attention). Since the branch attends only within a frame, the base model's
temporal behaviour is untouched.

2-D RoPE: as Wan's 3-D RoPE with the time part's frequencies set to 1 (no rotation): a head of width ``e`` is
split into ``e − 4⌊e/6⌋`` unrotated (time) channels, then ``2⌊e/6⌋`` rotated by the token's row and ``2⌊e/6⌋``
by its column (``θ = 10000``; pairs of adjacent channels rotate as complex numbers).

The frame layout comes from ``grid = [h, w]`` (tokens of one frame, row-major; the sequence holds ``T`` frames
one after another, ``T = n / (h·w)``). ``grid = None`` treats the whole sequence as one ``1 × n`` frame.
*Decision (inferred)*: the input ``x`` is the attention module's own input; in Wan that is the modulated,
normalised block input. Default ``R = 72`` (the code comment implies head dim 18; inferred).

**Spatial-only targeting** ("LoRA only on spatial layers"; a decision: offered besides DeRA):
:func:`spatial_only_targets` lists the Linear layers inside spatial-attention modules of a factorised video
model and never those inside temporal-attention modules; :func:`spatial_only_lora` builds a plain
:class:`~peftkit.methods.lora.LoRAConfig` on them. It is ordinary target matching (a list of module names), so
it works for every method: pass the list as any config's ``targets``.
"""

from __future__ import annotations

import re
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
    TargetModuleNotFound,
    layer_kind,
    register,
)

#: A path component that names a spatial-attention module (factorised video transformers / U-Nets).
SPATIAL_ATTENTION = r"(spatial|spatial_attn|attn_spatial|s_attn|attn_s|attn1|attn2)"
#: A path component that names a temporal module; anything below it is never adapted by spatial-only rules.
TEMPORAL = r"(.*temporal.*|temp_.*|.*_temp|t_attn|attn_t|time_.*|motion_modules?|.*_time)"


def spatial_only_targets(model: nn.Module, spatial: str = SPATIAL_ATTENTION, temporal: str = TEMPORAL) -> list[str]:
    """Names of the Linear / Conv1D layers of ``model`` below a spatial-attention module and below no
    temporal module: a path component (between dots) must fully match ``spatial`` and none may fully match
    ``temporal``.

    Raises:
        TargetModuleNotFound: no layer qualifies (the model has no module named like a spatial attention).
    """
    found = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if layer_kind(module) != "linear":
            continue
        if any(re.fullmatch(temporal, p) for p in parts):
            continue
        if any(re.fullmatch(spatial, p) for p in parts[:-1]):
            found.append(name)
    if not found:
        raise TargetModuleNotFound(f"spatial attention ({spatial})", dict(model.named_modules()))
    return found


def spatial_only_lora(model: nn.Module, r: int = 8, alpha: float = 8.0, **lora_fields: object) -> AdapterConfig:
    """A LoRA config (``r``, ``alpha``, other LoRA fields) on :func:`spatial_only_targets` of ``model``."""
    from peftkit.methods.lora import LoRAConfig

    return LoRAConfig(r=r, alpha=alpha, targets=spatial_only_targets(model), **lora_fields)  # type: ignore[arg-type]


@dataclass(kw_only=True)
class DeRAConfig(AdapterConfig):
    """Settings of DeRA.

    Attributes:
        targets: the self-attention modules (default: ``self_attn`` / ``attn`` modules, whole-module kind).
        r: ``R``, width of the low-rank space (default 72, inferred from the released code).
        heads: heads of the small attention (ToonComposer: 4; must divide ``R``).
        grid: ``[h, w]`` tokens per frame; ``None``: the whole sequence is one ``1 × n`` frame.
        theta: RoPE base.
    """

    targets: list[str] | str = r"(.*\.)?(self_attn|attn)"
    r: PositiveInt = 72
    heads: PositiveInt = 4
    grid: list[PositiveInt] | None = None
    theta: float = 10000.0

    def validate(self) -> None:
        if self.r % self.heads:
            raise InvalidConfigError(f"heads={self.heads} must divide r={self.r}")
        if self.grid is not None and len(self.grid) != 2:
            raise InvalidConfigError(f"grid must be [h, w], got {self.grid!r}")

    tiny_fields: ClassVar[dict] = {"r": 24, "heads": 4}


def rope_2d(t: Tensor, rows: Tensor, cols: Tensor, theta: float) -> Tensor:
    """Rotate heads ``t [..., n, e]`` by 2-D positions (``rows``, ``cols`` ``[n]``): Wan's split with the time
    channels unrotated (see the module docstring)."""
    e = t.shape[-1]
    c = e // 6
    if c == 0:
        return t
    keep = e - 4 * c
    out = [t[..., :keep]]
    for pos, part in ((rows, t[..., keep : keep + 2 * c]), (cols, t[..., keep + 2 * c :])):
        freqs = 1.0 / theta ** (torch.arange(0, 2 * c, 2, device=t.device, dtype=torch.float32) / (2 * c))
        angle = pos.to(torch.float32)[:, None] * freqs  # [n, c]
        rot = torch.polar(torch.ones_like(angle), angle)
        pairs = torch.view_as_complex(part.float().reshape(*part.shape[:-1], c, 2).contiguous())
        out.append(torch.view_as_real(pairs * rot).flatten(-2).to(t.dtype))
    return torch.cat(out, dim=-1)


@register("dera", DeRAConfig)
class DeRA(Adapter[DeRAConfig]):
    """``y = SelfAttn(x) + up(o(Attn₂D(q, k, v)(down(x))))`` per frame (see the module docstring)."""

    exempt: ClassVar[dict[str, str]] = {"mergeable": "spec: not mergeable (the branch contains attention)"}
    kinds = frozenset({"linear", None})

    def __init__(self, base: BaseView, config: DeRAConfig) -> None:
        super().__init__(base, config)
        r = config.r
        self.down = nn.Linear(base.in_features, r, bias=False)
        self.up = nn.Linear(r, base.out_features, bias=False)
        self.q, self.k, self.v, self.o = (nn.Linear(r, r) for _ in range(4))

    def reset_parameters(self, base: BaseView) -> None:
        for lin in (self.down, self.q, self.k, self.v, self.o):
            lin.reset_parameters()  # torch default
        self.up.weight.zero_()  # identity at init

    def branch(self, x: Tensor) -> Tensor:
        """``up(z')`` for ``x [B, T·h·w, d]``: the per-frame low-rank attention."""
        b, n = x.shape[0], x.shape[1]
        h, w = self.config.grid if self.config.grid is not None else (1, n)
        if n % (h * w):
            raise InvalidConfigError(f"DeRA grid {h}x{w} does not tile a sequence of {n} tokens into frames")
        heads, r = self.config.heads, self.config.r
        z = self.down(x).reshape(b * (n // (h * w)), h * w, r)

        def split(t: Tensor) -> Tensor:
            return t.view(t.shape[0], h * w, heads, r // heads).transpose(1, 2)

        cells = torch.arange(h * w, device=x.device)
        rows, cols = cells // w, cells % w
        q = rope_2d(split(self.q(z)), rows, cols, self.config.theta)
        k = rope_2d(split(self.k(z)), rows, cols, self.config.theta)
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, split(self.v(z)))
        z = self.o(attended.transpose(1, 2).reshape(z.shape))
        return self.up(z.reshape(b, n, r))

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        if x.dim() != 3:
            raise InvalidConfigError(f"DeRA adapts token sequences [batch, tokens, width], got shape {tuple(x.shape)}")
        return base_out + self.branch(x).to(base_out.dtype)

    @classmethod
    def expected_trainable(cls, base: BaseView, config: DeRAConfig) -> int:  # type: ignore[override]
        r = config.r
        return r * (base.in_features + base.out_features) + 4 * r * r + 4 * r
