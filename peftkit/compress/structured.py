"""Structured pruning of LLaMA-style blocks, shared by LoRAPrune (scores from LoRA), its magnitude baseline and
LoRAM (an L2-norm criterion or a given index map).

A block has two kinds of units (:mod:`peftkit.compress.arch`): key/value head groups (a kv head and its query
heads) and MLP intermediate channels. A unit's score sums, over the modules that touch it, the element
importance of its rows (``q, k, v, gate, up``: outputs) or columns (``o, down``: inputs); each module's vector
of unit scores is divided by its L2 norm (``+1e-8``) first, so modules of different scale weigh alike
(LoRAPrune's ``compute_sensitivity``). Pruning removes the ``⌊ratio·n⌋`` lowest-scoring units of every
prunable block; the first ``⌊0.1·L⌋`` blocks and the last block are left whole (LoRAPrune's default; LoRAM keeps
the first and last few too).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from peftkit.compress import arch
from peftkit.compress.errors import HeadPruneError, check_fraction

Importance = Callable[[str, nn.Linear], Tensor]
"""``(projection name, Linear) -> element importance [out, in]``."""
Plan = dict[int, tuple[Tensor, Tensor]]
"""``{block index: (kv head groups to keep, MLP channels to keep)}``."""

OUTPUT_SIDE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def prunable(n_blocks: int, first: float = 0.1, last: int = 1) -> list[int]:
    """Indices of the blocks pruning may touch: all but the first ``⌊first·L⌋`` and the last ``last``."""
    return list(range(int(first * n_blocks), n_blocks - last))


def _normalised(v: Tensor) -> Tensor:
    return v / (v.norm() + 1e-8)


def unit_scores(block: nn.Module, importance: Importance) -> tuple[Tensor, Tensor]:
    """``(kv head group scores [n_kv], channel scores [d_ff])`` of one block (see the module docstring)."""
    layout = arch.head_layout(block.self_attn)
    heads = torch.zeros(layout.n_kv, dtype=torch.float64)
    for name in arch.ATTENTION:
        linear = getattr(block.self_attn, name)
        element = importance(name, linear).double()
        per_row = element.sum(1) if name in OUTPUT_SIDE else element.sum(0)
        width = layout.head_dim if name in ("k_proj", "v_proj") else layout.group * layout.head_dim
        heads += _normalised(per_row.reshape(layout.n_kv, width).sum(1))
    channels = torch.zeros(block.mlp.gate_proj.out_features, dtype=torch.float64)
    for name in arch.MLP:
        element = importance(name, getattr(block.mlp, name)).double()
        channels += _normalised(element.sum(1) if name in OUTPUT_SIDE else element.sum(0))
    return heads, channels


def lowest(scores: Tensor, ratio: float, mask: Tensor | None = None) -> Tensor:
    """A 0/1 mask keeping all but the ``⌊ratio·n⌋`` lowest of ``scores ⊙ mask`` (already-pruned units count)."""
    n = scores.numel()
    drop = int(ratio * n)
    if drop >= n:
        raise HeadPruneError(f"pruning {drop} of {n} units leaves none; use a smaller ratio")
    masked = scores * (mask if mask is not None else 1)
    keep = torch.ones(n, dtype=torch.float32)
    keep[masked.argsort()[:drop]] = 0.0
    return keep


def plan_from_scores(scores: Mapping[int, tuple[Tensor, Tensor]], ratio: float) -> Plan:
    """Keep-indices of every block in ``scores`` after removing its ``⌊ratio·n⌋`` lowest units of each kind."""
    check_fraction("ratio", ratio)
    return {
        i: (lowest(h, ratio).nonzero().flatten(), lowest(c, ratio).nonzero().flatten()) for i, (h, c) in scores.items()
    }


def plan_from_removed(model: nn.Module, removed: Mapping[int, tuple[Sequence[int], Sequence[int]]]) -> Plan:
    """Keep-indices from an index map ``{block: (kv head groups to remove, channels to remove)}``.

    Raises:
        HeadPruneError: a block index out of range, or removing as many units as a block has (or more).
    """
    _, blocks = arch.decoder_blocks(model, "structured pruning")
    plan: Plan = {}
    for i, (heads, channels) in removed.items():
        if not 0 <= i < len(blocks):
            raise HeadPruneError(f"block {i} does not exist: the model has {len(blocks)} blocks")
        n_kv, n_ch = arch.unit_count(blocks[i])
        for what, drop, total in (("key/value head groups", heads, n_kv), ("MLP channels", channels, n_ch)):
            if len(set(drop)) >= total:
                raise HeadPruneError(f"cannot prune {len(set(drop))} {what} of block {i}: it has {total}")
        plan[i] = (
            torch.tensor([h for h in range(n_kv) if h not in set(heads)], dtype=torch.long),
            torch.tensor([c for c in range(n_ch) if c not in set(channels)], dtype=torch.long),
        )
    return plan


def magnitude(p: int = 1) -> Importance:
    """Element importance ``|W|^p`` (p = 1: magnitude; p = 2: the squared L2 criterion)."""
    return lambda name, linear: linear.weight.detach().abs() ** p


def score_blocks(model: nn.Module, importance: Importance, blocks: Sequence[int] | None = None) -> dict:
    """:func:`unit_scores` of the prunable blocks (default :func:`prunable`)."""
    _, found = arch.decoder_blocks(model, "structured pruning")
    chosen = prunable(len(found)) if blocks is None else blocks
    return {i: unit_scores(found[i], importance) for i in chosen}


@torch.no_grad()
def apply(model: nn.Module, plan: Plan) -> dict[str, dict[str, object]]:
    """Remove the units not kept by ``plan`` from ``model`` in place (physically: smaller Linears); returns the
    new shapes of the changed Linears (``{path: describe(...)}``)."""
    prefix, blocks = arch.decoder_blocks(model, "structured pruning")
    for i, (heads, channels) in plan.items():
        arch.prune_attention(blocks[i].self_attn, heads)
        arch.prune_mlp(blocks[i].mlp, channels)
    return {f"{prefix}.{i}.{p}": arch.describe(blocks[i].get_submodule(p)) for i in plan for p in arch.PROJECTIONS}


def magnitude_prune(model: nn.Module, ratio: float) -> Plan:
    """The baseline: structured magnitude pruning (``|W|`` scores) of the prunable blocks, in place."""
    plan = plan_from_scores(score_blocks(model, magnitude(1)), ratio)
    apply(model, plan)
    return plan
