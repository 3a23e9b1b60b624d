"""SelaVPR global adapters and local head (Lu et al., 2024, "Towards Seamless Adaptation of Pre-trained Models
for Visual Place Recognition"; official code Lu-Feng/SelaVPR, ``backbone/dinov2/block.py``, ``network.py``).

Global adaptation, per transformer block (``fc1: Linear(d_in→r)``, ``fc2: Linear(r→d_out)``, biases,
``r = ratio · d``, ratio 0.5):

* serial adapter after attention: ``S(h) = h + fc2(ReLU(fc1(h)))`` on the attention output ``h``;
* parallel adapter beside the MLP: ``MLP(LN2(x)) + 0.2 · fc2'(ReLU(fc1'(LN2(x))))``.

*Decision*: one method, and which of the two an adapted module gets follows from what it is: a Linear / Conv1D
(the attention output projection) gets the serial adapter on its output; a whole module (the MLP, kind
``"module"``, whose input is ``LN2(x)``) gets the parallel one on its input with scale ``parallel_scale``. The
default ``targets`` select both in HF ViT (``layers.N.attention.o_proj`` and ``layers.N.mlp``) and in DINOv2-like
timm blocks (``blocks.N.attn.proj`` and ``blocks.N.mlp``). DINOv2's LayerScale ``ls1``/``ls2`` stays outside
the adapted modules, as in the official block.

Init: fc2 weight and bias 0 (identity at init), fc1 torch default. Not mergeable (ReLU).

Local adaptation: :class:`SelaVPRLocalHead` (a new, fully trained head: ``ConvTranspose2d(d→256, k3, s2, p1)``
– ReLU – ``ConvTranspose2d(256→128, k3, s2, p1)``, L2-normalised per location; a 16×16 patch grid becomes
61×61) and :func:`gem` (the GeM-pooled, L2-normalised global descriptor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.core.api import Adapter, AdapterConfig, BaseView, Bound, InvalidConfigError, register
from peftkit.methods.bottleneck import BottleneckBranch

_TARGETS = r"(.*\.)?layers\.\d+\.(attention\.o_proj|mlp)|(.*\.)?blocks\.\d+\.(attn\.proj|mlp)"


@dataclass(kw_only=True)
class SelaVPRConfig(AdapterConfig):
    """Settings of the SelaVPR global adapters.

    Attributes:
        targets: default: attention output projections (serial) and MLP modules (parallel) of HF ViT and
            DINOv2/timm blocks.
        ratio: bottleneck ratio ``r / d`` (spec default 0.5).
        parallel_scale: scale of the parallel (MLP) adapter (spec default 0.2).
    """

    targets: list[str] | str = _TARGETS
    ratio: Annotated[float, Bound(low=0, high=4, low_open=True)] = 0.5
    parallel_scale: float = 0.2

    def width(self, d: int) -> int:
        return max(1, round(self.ratio * d))

    tiny_fields: ClassVar[dict] = {"ratio": 0.25}


@register("selavpr", SelaVPRConfig)
class SelaVPRAdapter(Adapter[SelaVPRConfig]):
    """Serial ``h + fc2(ReLU(fc1(h)))`` on a projection's output, or parallel
    ``F(x) + s · fc2(ReLU(fc1(x)))`` beside a whole module ``F`` (see the module docstring)."""

    exempt: ClassVar[dict[str, str]] = {"mergeable": "spec: not mergeable (ReLU bottleneck)"}
    kinds = frozenset({"linear", None})

    @staticmethod
    def _widths(base: BaseView) -> tuple[int, int, bool]:
        parallel = base.kind == "module"
        return (base.in_features if parallel else base.out_features), base.out_features, parallel

    def __init__(self, base: BaseView, config: SelaVPRConfig) -> None:
        super().__init__(base, config)
        d_in, d_out, self.parallel = self._widths(base)
        scale = config.parallel_scale if self.parallel else 1.0
        self.branch = BottleneckBranch(d_in, d_out, config.width(d_in), activation="relu", scale=scale)

    def reset_parameters(self, base: BaseView) -> None:
        self.branch.down.reset_parameters()  # fc1: torch default
        self.branch.up.weight.zero_()  # fc2 = 0: identity at init
        self.branch.up.bias.zero_()

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        return base_out + self.branch(x if self.parallel else base_out)

    @classmethod
    def expected_trainable(cls, base: BaseView, config: SelaVPRConfig) -> int:  # type: ignore[override]
        d_in, d_out, _ = cls._widths(base)
        return BottleneckBranch.count(d_in, d_out, config.width(d_in), in_ln=False, learnable_scale=False)


class SelaVPRLocalHead(nn.Module):
    """The local-adaptation head: patch tokens ``[B, h·w, d]`` on an ``h×w`` grid → dense local features
    ``[B, 128, (2(2h−1)−1), (2(2w−1)−1)]``, L2-normalised per location (16×16 → 61×61). Trained in full."""

    def __init__(self, d: int, hidden: int = 256, out: int = 128) -> None:
        super().__init__()
        self.up1 = nn.ConvTranspose2d(d, hidden, kernel_size=3, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(hidden, out, kernel_size=3, stride=2, padding=1)

    def forward(self, patch_tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        b, n, d = patch_tokens.shape
        h, w = grid
        if h * w != n:
            raise InvalidConfigError(f"grid {grid} has {h * w} cells but there are {n} patch tokens")
        fmap = patch_tokens.transpose(1, 2).reshape(b, d, h, w)
        return F.normalize(self.up2(F.relu(self.up1(fmap))), dim=1)


def gem(patch_tokens: Tensor, p: float = 3.0, eps: float = 1e-6) -> Tensor:
    """GeM pooling over the patch tokens ``[B, n, d]`` (``(mean xᵖ)^{1/p}`` of the clamped features),
    L2-normalised: SelaVPR's global descriptor."""
    pooled = patch_tokens.clamp(min=eps).pow(p).mean(dim=1).pow(1.0 / p)
    return F.normalize(pooled, dim=-1)


__all__ = ["SelaVPRAdapter", "SelaVPRConfig", "SelaVPRLocalHead", "gem"]
