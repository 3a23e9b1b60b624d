"""MoSA: Split & Merge — sparse sub-adapters trained stochastically, merged into one adapter ("Split & Merge:
Unlocking the Potential of Visual Adapters via Sparse Training", 2024; official code Theia-4869/MoSA,
``vit_mosa.py``, ``pruner.py``).

A parallel AdaptFormer-style adapter with a fresh input LayerNorm ``LN_a``, ``down: Linear(d_in→r)`` dense and
shared, GELU, dropout 0.1, scale ``s = 0.1`` (share="down", all official scripts). Its up weight is split
into ``N`` experts by a frozen index map ``P ∈ {0..N−1}^{d_out×r}`` (a partition: expert ``k`` owns the
entries with ``P == k``); every expert has its own up bias ``b_k``. One trainable tensor ``W`` holds all
experts' entries (``W₀ = 0`` is the init of every expert, so expert ``k``'s weight is ``W ⊙ [P == k]``).

* Training step (``self.training`` with gradients enabled): one expert ``k ~ U{0..N−1}`` per adapter per
  forward, ``y = F(x) + s·((W ⊙ [P==k]) h + b_k)`` with ``h = drop(GELU(down(LN_a(x))))``; gradients reach
  only ``W``'s entries where ``P == k`` (the mask is in the graph).
* Otherwise (evaluation): the merged adapter, ``W_merged = W / N``, ``b_merged = mean_k b_k`` (the
  expectation of the training forward over ``k``). :func:`merge_experts` turns it into a plain
  :class:`~peftkit.methods.bottleneck.ParallelAdapter` (``adaptformer``, ``in_ln=True``, GELU) whose stored
  size equals a plain adapter's.

Trainable per module: ``2d_in + r·d_in + r + r·d_out + N·d_out``. Identity at init (up weight and biases 0).
``P``: ``score ~ U[0,1)^{d_out×r}`` (adapter RNG: seeded by ``seed``), expert ``i`` takes the entries whose
rank lies in the official ``kthvalue`` slab ``[int(i·n/N)+1, int((i+1)·n/N)]``; saved (int8) with the adapter.
:func:`consistency_loss` is the official two-pass regulariser (``REG_WEIGHT = 1``).

*Decisions*: the expert draw happens only when gradients are being computed (evaluation under ``no_grad``, in
train mode too, runs the merged adapter, so a mixed batch equals its rows run one by one); ``torch.randint`` on
the global RNG replaces Python's ``random``. Only ``share="down"`` is implemented. One tensor for all experts
(spec decision: no weight-decay leak into other experts' zero init); an optimizer with momentum still moves an
entry on steps where its expert was not drawn (the official per-expert copies get no update then: their grad
is ``None``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.core.api import Adapter, AdapterConfig, BaseView, PositiveInt, Probability, register
from peftkit.methods.bottleneck import PRESETS, BottleneckBranch, ParallelConfig


@dataclass(kw_only=True)
class MoSAConfig(AdapterConfig):
    """Settings of MoSA.

    Attributes:
        r: bottleneck width (official 64 on FGVC, 16 on VTAB).
        experts: ``N``, the number of sparse sub-adapters (official ``EXPERT_NUM`` 4).
        scale: output scale ``s`` (0.1).
        dropout: dropout after GELU (0.1; off in eval mode).
    """

    targets: list[str] | str = PRESETS["parallel"]
    r: PositiveInt = 16
    experts: PositiveInt = 4
    scale: float = 0.1
    dropout: Probability = 0.1

    tiny_fields: ClassVar[dict] = {"r": 4, "experts": 3, "dropout": 0.0}
    variant_fields: ClassVar[list[dict]] = [{"experts": 2, "dropout": 0.1}]


def partition(score: Tensor, n: int) -> Tensor:
    """The official expert index map: expert ``i`` gets the entries of ``score`` whose (1-based) rank lies in
    ``[int(i·numel/n)+1, int((i+1)·numel/n)]``; int8, same shape as ``score``."""
    numel = score.numel()
    rank = torch.empty(numel, dtype=torch.long)
    rank[score.flatten().argsort()] = torch.arange(numel)
    lower = torch.tensor([int(i * numel / n) for i in range(n)])
    return (torch.searchsorted(lower, rank, right=True) - 1).view(score.shape).to(torch.int8)


@register("mosa", MoSAConfig)
class MoSA(Adapter[MoSAConfig]):
    """Parallel adapter whose up weight is split into ``N`` sparse experts; see the module docstring."""

    exempt: ClassVar[dict[str, str]] = {"mergeable": "spec: the adapter itself is not mergeable (GELU)"}
    kinds = frozenset({"linear", None})  # Linear / Conv1D, or a whole module ("module" kind)

    def __init__(self, base: BaseView, config: MoSAConfig) -> None:
        super().__init__(base, config)
        d_in, d_out, r = base.in_features, base.out_features, config.r
        self.ln = nn.LayerNorm(d_in)
        self.down = nn.Linear(d_in, r)
        self.W = nn.Parameter(torch.empty(d_out, r))  # every expert's up-weight entries (expert = P)
        self.b = nn.Parameter(torch.empty(config.experts, d_out))  # one up bias per expert
        self.register_buffer("P", torch.empty(d_out, r, dtype=torch.int8))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None

    @torch.no_grad()
    def reset_parameters(self, base: BaseView) -> None:
        self.ln.reset_parameters()
        bound = 1.0 / math.sqrt(self.down.in_features)  # = kaiming_uniform_(a=√5)
        self.down.weight.uniform_(-bound, bound)
        self.down.bias.zero_()
        self.W.zero_()
        self.b.zero_()
        self.P.copy_(partition(torch.rand(self.W.shape), self.config.experts))

    def hidden(self, x: Tensor) -> Tensor:
        h = F.gelu(self.down(self.ln(x)))
        return self.dropout(h) if self.dropout is not None else h

    def merged(self) -> tuple[Tensor, Tensor]:
        """``(W_merged, b_merged) = (W / N, mean_k b_k)``."""
        return self.W / self.config.experts, self.b.mean(0)

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        h = self.hidden(x)
        if self.training and torch.is_grad_enabled():
            k = int(torch.randint(self.config.experts, ()))
            weight, bias = self.W * (self.P == k), self.b[k]
        else:
            weight, bias = self.merged()
        return base_out + self.config.scale * F.linear(h, weight, bias)

    @classmethod
    def expected_trainable(cls, base: BaseView, config: MoSAConfig) -> int:
        d_in, d_out, r = base.in_features, base.out_features, config.r
        return 2 * d_in + r * d_in + r + r * d_out + config.experts * d_out


def consistency_loss(logits_1: Tensor, logits_2: Tensor) -> Tensor:
    """``½[KL(softmax(o₂).detach() ‖ softmax(o₁)) + KL(softmax(o₁).detach() ‖ softmax(o₂))]`` (batchmean) for
    two forward passes of the same batch (independent expert draws and dropout)."""

    def kl(inputs: Tensor, target: Tensor) -> Tensor:
        return F.kl_div(F.log_softmax(inputs, -1), F.softmax(target.detach(), -1), reduction="batchmean")

    return 0.5 * (kl(logits_1, logits_2) + kl(logits_2, logits_1))


@torch.no_grad()
def merge_experts(model: nn.Module, name: str, merged_name: str | None = None) -> str:
    """Add the merged MoSA adapter ``name`` of ``model`` (an ``AdaptedModel``) as a plain ``adaptformer``
    adapter (``in_ln=True``, GELU, same ``r`` / ``s`` / dropout, up weight ``W/N``, up bias ``mean_k b_k``) named
    ``merged_name`` (default ``f"{name}_merged"``) on the same modules; returns its name. The MoSA adapter is
    left in place (delete it with ``model.delete_adapter(name)``)."""
    config = model.configs[name]
    if not isinstance(config, MoSAConfig):
        raise TypeError(f"adapter {name!r} is a {type(config).__name__}, not a MoSA adapter")
    merged_name = merged_name or f"{name}_merged"
    plain = ParallelConfig(
        targets=list(model.layer_paths[name]),
        r=config.r,
        activation="gelu",
        in_ln=True,
        dropout=config.dropout,
        scale=config.scale,
    )
    model.add_adapter(merged_name, plain)
    sources = model.adapter_modules(name)
    for path, adapter in model.adapter_modules(merged_name).items():
        mosa = sources[path]
        branch: BottleneckBranch = adapter.branch
        weight, bias = mosa.merged()
        branch.ln.load_state_dict(mosa.ln.state_dict())  # type: ignore[union-attr]
        branch.down.load_state_dict(mosa.down.state_dict())
        branch.up.weight.copy_(weight)
        branch.up.bias.copy_(bias)
    return merged_name
