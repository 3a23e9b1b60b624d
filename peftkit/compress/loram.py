"""LoRAM (Zhang et al., 2025, "Train Small, Infer Large: Memory-Efficient LoRA Training for Large Language
Models"; official code junzhang-zj/LoRAM, ``3_recovered_low_rank_matrix_generation.py``).

1. Prune a copy of the model structurally (:mod:`peftkit.compress.structured`): kv head groups with their query
   heads (rows of q, k, v; columns of o) and MLP channels (rows of gate, up; columns of down), by an index map
   (the paper takes LLM-Pruner's) or by the L2 criterion ``Σ W²`` here; the first ``⌊0.05·L⌋`` blocks and the
   last two stay whole (the paper keeps 4 of 80 first and 2 last). Optionally the pruned copy is quantised
   (QLoRAM; here HQQ, :mod:`peftkit.compress.compressors`).
2. Train LoRA on the small copy (any loop; :func:`train` is a short AdamW one).
3. Recover: insert **zeros** at the pruned positions (``zeroA``, the default): rows of ``B`` for the
   output-pruned modules (q, k, v, gate, up), columns of ``A`` for the input-pruned ones (o, down); the other
   factor is kept. Then ``B_rec·A_rec`` restricted to the kept rows / columns equals the trained ``BA`` and is zero
   elsewhere, and the recovered adapter is an ordinary LoRA on the *original* model
   (:meth:`~peftkit.AdaptedModel.load_tensors`): it saves, loads, merges, serves and exports like any.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from peftkit.compress import arch, compressors, structured
from peftkit.compress.loop import adamw_steps
from peftkit.core.model import AdaptedModel
from peftkit.methods.lora import LoRAConfig

OUTPUT_PRUNED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
FIRST, LAST = 0.05, 2


class Pruned(NamedTuple):
    """The pruned copy and the kept indices per block (``structured.Plan``)."""

    model: nn.Module
    plan: structured.Plan


@torch.no_grad()
def prune(
    model: nn.Module,
    *,
    ratio: float | None = None,
    removed: Mapping[int, tuple[Sequence[int], Sequence[int]]] | None = None,
    quantize: str | None = None,
) -> Pruned:
    """A pruned (and with ``quantize="hqq4"`` etc. quantised) copy of ``model``; ``model`` is untouched.

    Args:
        ratio: fraction of kv head groups and of MLP channels removed in every prunable block (L2 criterion).
        removed: instead, ``{block: (kv head groups, channels)}`` to remove.
        quantize: a compressor name applied to every projection of the copy (QLoRAM).

    Raises:
        RatioError, HeadPruneError, UnknownArchitectureError, CompressorError.
    """
    small = copy.deepcopy(model)
    if removed is not None:
        plan = structured.plan_from_removed(small, removed)
    else:
        _, blocks = arch.decoder_blocks(small, "LoRAM")
        chosen = structured.prunable(len(blocks), FIRST, LAST)
        plan = structured.plan_from_scores(structured.score_blocks(small, structured.magnitude(2), chosen), ratio)
    structured.apply(small, plan)
    if quantize is not None:
        fn = compressors.get(quantize)
        for layer in arch.block_linears(small, "LoRAM").values():
            layer.weight.copy_(fn(layer.weight.detach()))
    return Pruned(small.eval(), plan)


def _kept(path: str, plan: structured.Plan, full: nn.Module, prefix: str) -> tuple[str, Tensor] | None:
    """``("rows" | "cols", kept indices)`` of a pruned module, or ``None`` if its block was not pruned."""
    rest = path[len(prefix) + 1 :]
    index, _, sub = rest.partition(".")
    if not index.isdigit() or int(index) not in plan:
        return None
    heads, channels = plan[int(index)]
    name = sub.rsplit(".", 1)[-1]
    block = full.get_submodule(f"{prefix}.{index}")
    layout = arch.head_layout(block.self_attn)
    if name in ("q_proj", "o_proj"):
        kept = layout.query_rows(heads)
    elif name in ("k_proj", "v_proj"):
        kept = layout.kv_rows(heads)
    else:
        kept = channels
    return ("rows" if name in OUTPUT_PRUNED else "cols"), kept


@torch.no_grad()
def recover(
    tensors: Mapping[str, Tensor], plan: structured.Plan, full: nn.Module, *, fill: str = "zero",
    seed: int = 0,
) -> dict[str, Tensor]:  # fmt: skip
    """The LoRA tensors of the pruned model (``{path.A, path.B}``) grown to the full model's shapes: zeros at
    pruned rows of ``B`` / columns of ``A`` (``fill="normal"``: ``N(0, 1/r²)`` in the new ``A`` columns, the
    official ``normA``)."""
    prefix, _ = arch.decoder_blocks(full, "LoRAM")
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for key, value in tensors.items():
        path, _, tensor = key.rpartition(".")
        where = _kept(path, plan, full, prefix)
        if where is None or tensor not in ("A", "B"):
            out[key] = value.clone()
            continue
        side, kept = where
        target = full.get_submodule(path)
        if side == "rows" and tensor == "B":
            grown = value.new_zeros(target.out_features, value.shape[1])
            grown[kept] = value
        elif side == "cols" and tensor == "A":
            grown = value.new_zeros(value.shape[0], target.in_features)
            if fill == "normal":
                grown.normal_(0.0, 1.0 / value.shape[0], generator=g)
            grown[:, kept] = value
        else:
            grown = value.clone()
        out[key] = grown
    return out


def recovered_adapter(
    pruned: AdaptedModel, name: str, plan: structured.Plan, full: nn.Module, *, new_name: str | None = None,
    fill: str = "zero",
) -> AdaptedModel:  # fmt: skip
    """The full model wrapped with adapter ``name`` of ``pruned`` recovered onto it (same config)."""
    config: LoRAConfig = pruned.configs[name]  # type: ignore[assignment]
    adapted = full if isinstance(full, AdaptedModel) else AdaptedModel(full)
    tensors = recover(pruned.adapter_state_dict(name), plan, adapted.get_base_model(), fill=fill)
    adapted.load_tensors(new_name or name, config, tensors, activate=True, source="LoRAM recovery")
    return adapted


def adapt(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.05, name: str = "loram"):
    """``model`` (the pruned copy) with LoRA on q, k, v, o, gate, up, down."""
    adapted = AdaptedModel(model)
    adapted.add_adapter(name, LoRAConfig(r=r, alpha=alpha, dropout=dropout, targets=list(arch.PROJECTIONS)))
    return adapted


def train(adapted: AdaptedModel, batches: Iterable[Any], *, steps: int, lr: float = 1e-4,
          progress: bool = False) -> list[float]:  # fmt: skip
    """A short AdamW run of the adapter on the model's own loss (batches with ``labels``)."""
    return adamw_steps(adapted, batches, steps=steps, lr=lr, desc="LoRAM", progress=progress)


def base_parameters(model: nn.Module, bits: int = 32) -> float:
    """Bytes of the frozen base a LoRA run holds: parameters × ``bits/8`` (projections at ``bits``, the rest at
    32; 4-bit storage overheads of scales are left out)."""
    proj = {id(m.weight) for m in arch.block_linears(model, "LoRAM").values()}
    total = 0.0
    for p in model.parameters():
        total += p.numel() * ((bits if id(p) in proj else 32) / 8)
    return total
