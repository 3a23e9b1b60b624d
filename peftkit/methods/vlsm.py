"""VLSM-Adapter (Dhakal et al., 2024, "VLSM-Adapter: Finetuning Vision-Language Segmentation Efficiently with
Lightweight Blocks"; official code naamiinepal/vlsm-adapter, ``src/models/clipseg_adapter.py``).

A serial bottleneck on a sub-layer output ``o``: ``Ad(o) = o + ReLU(fc2(ReLU(fc1(o))))`` with
``fc1: Linear(d→r)``, ``fc2: Linear(r→d)`` (biases; ``2rd + r + d`` trainable). Note the ReLU after the
up-projection too (spec decision: keep it, as the official code does). Init: torch default for both layers, so
**not** identity at init; not mergeable.

Placement: the *dense* variant (Houlsby placement: attention output and MLP output of each layer, r = 64) is
the default ``targets`` (:data:`peftkit.methods.bottleneck.PRESETS` ``"houlsby"``). The *shallow* CLIPSeg
variant (adapters on extracted hidden states, the EOT text token and the conditional embedding, r = 512) acts
on tensors between modules of a CLIPSeg decoder, not on a module's output; it is not offered (CLIPSeg users
can target the projection layers that produce those tensors — *inferred*, not the official wiring).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from peftkit.core.api import Adapter, AdapterConfig, BaseView, PositiveInt, register
from peftkit.methods.bottleneck import PRESETS, BottleneckBranch


@dataclass(kw_only=True)
class VLSMConfig(AdapterConfig):
    """Settings of the VLSM-Adapter.

    Attributes:
        targets: default: attention and MLP output projections of BERT/GPT-2/ViT-like models (dense variant).
        r: bottleneck width (dense variant default 64; the shallow variant used 512).
    """

    targets: list[str] | str = PRESETS["houlsby"]
    r: PositiveInt = 64

    tiny_fields: ClassVar[dict] = {"r": 4}


@register("vlsm", VLSMConfig)
class VLSMAdapter(Adapter[VLSMConfig]):
    """``o' = o + ReLU(fc2(ReLU(fc1(o))))`` on the adapted module's output ``o``."""

    exempt: ClassVar[dict[str, str]] = {
        "identity_at_init": "spec: torch default init on fc1 and fc2, not identity at init",
        "mergeable": "spec: not mergeable (ReLU on both sides of the bottleneck)",
    }
    kinds = frozenset({"linear", None})  # Linear / Conv1D, or a whole module

    def __init__(self, base: BaseView, config: VLSMConfig) -> None:
        super().__init__(base, config)
        d = base.out_features
        self.branch = BottleneckBranch(d, d, config.r, activation="relu")

    def reset_parameters(self, base: BaseView) -> None:
        self.branch.down.reset_parameters()  # torch default (kaiming_uniform a=√5, bias U(±1/√fan_in))
        self.branch.up.reset_parameters()

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        return base_out + F.relu(self.branch(base_out))

    @classmethod
    def expected_trainable(cls, base: BaseView, config: VLSMConfig) -> int:  # type: ignore[override]
        d = base.out_features
        return BottleneckBranch.count(d, d, config.r, in_ln=False, learnable_scale=False)
