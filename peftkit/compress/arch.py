"""Model layout shared by the compression methods: where the decoder blocks and their projections are, the
factorised Linear (``W ≈ W₂W₁``), and the physical removal of attention heads / MLP channels (LoRAPrune's final
prune, LoRAM's pruned training model).

The decoder layout known here is LLaMA's (also Mistral, Qwen2, SmolLM2): a ``ModuleList`` of blocks, each with
``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``. Head pruning works with grouped-query attention
(GQA): the unit removed is one key/value head together with the ``g = n_heads / n_kv_heads`` query heads that share
it, so every remaining block keeps ``n_heads / n_kv_heads = g`` and the attention code (``view(..., -1,
head_dim)``, ``repeat_kv(g)``) runs unchanged on the smaller projections. With ``g = 1`` (multi-head attention)
the unit is one head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from peftkit.compress.errors import HeadPruneError, UnknownArchitectureError

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = tuple(f"self_attn.{n}" for n in ATTENTION) + tuple(f"mlp.{n}" for n in MLP)
LOOKED_FOR = (
    "a ModuleList of decoder blocks with self_attn.q_proj, self_attn.k_proj, self_attn.v_proj, self_attn.o_proj, "
    "mlp.gate_proj, mlp.up_proj and mlp.down_proj (nn.Linear; the LLaMA / Mistral / Qwen2 layout)",
)


def _is_projection(module: nn.Module) -> bool:
    # already factorised (PELA distils a factorised student), or wrapped by an adapter (LoRAPrune's masks)
    module = getattr(module, "base_layer", module)
    return isinstance(module, (nn.Linear, FactoredLinear))


def _is_block(block: nn.Module) -> bool:
    return all(_has(block, p) and _is_projection(block.get_submodule(p)) for p in PROJECTIONS)


def _has(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def decoder_blocks(model: nn.Module, method: str) -> tuple[str, nn.ModuleList]:
    """``(path, blocks)`` of the model's decoder blocks (the first ``ModuleList`` whose every item has the LLaMA
    projections).

    Raises:
        UnknownArchitectureError: no such list (the message names the modules looked for).
    """
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    for name, blocks in lists:
        if all(_is_block(b) for b in blocks):
            return name, blocks
    found = f"; its ModuleLists are {', '.join(n for n, _ in lists) or 'none'}"
    raise UnknownArchitectureError(method, LOOKED_FOR, found)


def block_linears(model: nn.Module, method: str, names: Sequence[str] = PROJECTIONS) -> dict[str, nn.Linear]:
    """``{full path: Linear}`` of the projections ``names`` (suffixes of :data:`PROJECTIONS`) in every block, in
    model order."""
    unknown = [n for n in names if not any(p.endswith(n) for p in PROJECTIONS)]
    if unknown:
        raise UnknownArchitectureError(method, [f"projections among {', '.join(PROJECTIONS)}"], f"; got {unknown}")
    prefix, blocks = decoder_blocks(model, method)
    chosen = [p for p in PROJECTIONS if any(p.endswith(n) for n in names)]
    return {f"{prefix}.{i}.{p}": b.get_submodule(p) for i, b in enumerate(blocks) for p in chosen}


def linears(model: nn.Module, targets: Sequence[str] | None, method: str) -> dict[str, nn.Linear]:
    """The Linears to compress: LLaMA's projections when ``targets`` is ``None``, else every ``nn.Linear`` whose
    path ends with one of ``targets`` (a name component boundary).

    Raises:
        UnknownArchitectureError: nothing matches (names what was looked for).
    """
    if targets is None:
        return block_linears(model, method)
    found = {
        path: m
        for path, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(path == t or path.endswith("." + t) for t in targets)
    }
    if not found:
        raise UnknownArchitectureError(method, [f"nn.Linear modules named {', '.join(targets)}"], "; none matched")
    return found


def replace(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` inside ``root``."""
    parent, _, leaf = path.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    if isinstance(owner, (nn.ModuleList, nn.Sequential)) and leaf.isdigit():
        owner[int(leaf)] = module
    else:
        setattr(owner, leaf, module)


class FactoredLinear(nn.Sequential):
    """``y = W₂(W₁x) + b``: ``Linear(in → k, no bias)`` then ``Linear(k → out, bias)`` (LoRD, PELA, AFM). Both
    factors are ordinary trainable Linears, so LoRA can target ``"0"`` / ``"1"`` of it like any Linear."""

    def __init__(self, in_features: int, rank: int, out_features: int, bias: bool = True) -> None:
        super().__init__(nn.Linear(in_features, rank, bias=False), nn.Linear(rank, out_features, bias=bias))

    @classmethod
    def from_factors(
        cls, down: Tensor, up: Tensor, bias: Tensor | None, *, down_bias: Tensor | None = None
    ) -> FactoredLinear:
        """A module computing ``up · (down · x + down_bias) + bias`` (``down [k, in]``, ``up [out, k]``)."""
        module = cls(down.shape[1], down.shape[0], up.shape[0], bias=bias is not None)
        if down_bias is not None:
            module[0].bias = nn.Parameter(torch.empty(down.shape[0]))
        with torch.no_grad():
            module[0].weight.copy_(down)
            module[1].weight.copy_(up)
            if bias is not None:
                module[1].bias.copy_(bias)
            if down_bias is not None:
                module[0].bias.copy_(down_bias)
        return module.to(down.dtype)

    @property
    def rank(self) -> int:
        return self[0].out_features

    @property
    def in_features(self) -> int:
        return self[0].in_features

    @property
    def out_features(self) -> int:
        return self[1].out_features

    def weight_product(self) -> Tensor:
        """``W₂W₁`` (the dense weight it computes)."""
        return self[1].weight @ self[0].weight


def describe(module: nn.Module) -> dict[str, object]:
    """The shapes that rebuild ``module`` (a Linear or :class:`FactoredLinear`) before its weights are loaded."""
    if isinstance(module, FactoredLinear):
        return {"kind": "factored", "in": module.in_features, "rank": module.rank, "out": module.out_features,
                "bias": module[1].bias is not None, "down_bias": module[0].bias is not None}  # fmt: skip
    if isinstance(module, nn.Linear):
        return {"kind": "linear", "in": module.in_features, "out": module.out_features, "bias": module.bias is not None}
    raise TypeError(f"cannot describe a {type(module).__name__}")


def build(spec: dict[str, object]) -> nn.Module:
    """An uninitialised module of the shapes :func:`describe` recorded."""
    if spec["kind"] == "factored":
        module = FactoredLinear(int(spec["in"]), int(spec["rank"]), int(spec["out"]), bool(spec["bias"]))
        if spec.get("down_bias"):
            module[0].bias = nn.Parameter(torch.empty(int(spec["rank"])))
        return module
    return nn.Linear(int(spec["in"]), int(spec["out"]), bias=bool(spec["bias"]))


# --------------------------------------------------------------------------------------------- structured
@dataclass(frozen=True)
class HeadLayout:
    """Attention shape of one block: ``n_heads`` query heads, ``n_kv`` key/value heads of ``head_dim``."""

    n_heads: int
    n_kv: int
    head_dim: int

    @property
    def group(self) -> int:
        """Query heads per key/value head (``g``)."""
        return self.n_heads // self.n_kv

    def query_rows(self, kv_heads: Tensor) -> Tensor:
        """Rows of ``q_proj`` (= columns of ``o_proj``) of the query heads sharing the kv heads ``kv_heads``."""
        width = self.group * self.head_dim
        return (kv_heads[:, None] * width + torch.arange(width)).reshape(-1)

    def kv_rows(self, kv_heads: Tensor) -> Tensor:
        """Rows of ``k_proj`` / ``v_proj`` of the kv heads ``kv_heads``."""
        return (kv_heads[:, None] * self.head_dim + torch.arange(self.head_dim)).reshape(-1)


def head_layout(attention: nn.Module) -> HeadLayout:
    """The head layout of a LLaMA attention module, read from its projections and ``head_dim``."""
    head_dim = int(getattr(attention, "head_dim", 0)) or attention.config.head_dim
    return HeadLayout(attention.q_proj.out_features // head_dim, attention.k_proj.out_features // head_dim, head_dim)


def sliced(linear: nn.Linear, rows: Tensor | None = None, cols: Tensor | None = None) -> nn.Linear:
    """A new Linear holding ``linear``'s weight restricted to ``rows`` (outputs) and ``cols`` (inputs)."""
    w = linear.weight.detach()
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    out = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if linear.bias is not None:
            out.bias.copy_(linear.bias.detach()[rows] if rows is not None else linear.bias.detach())
    return out


def _check_keep(keep: Tensor, total: int, what: str) -> Tensor:
    keep = torch.as_tensor(keep, dtype=torch.long).unique(sorted=True)
    if keep.numel() == 0:
        raise HeadPruneError(f"pruning all {total} {what} of a layer leaves none; prune fewer")
    if int(keep.min()) < 0 or int(keep.max()) >= total:
        raise HeadPruneError(f"{what} indices must lie in [0, {total}), got {keep.tolist()}")
    return keep


def prune_attention(attention: nn.Module, keep_kv_heads: Tensor) -> None:
    """Keep only the kv heads ``keep_kv_heads`` (and their query heads) of a LLaMA attention module, in place:
    rows of ``q/k/v_proj``, columns of ``o_proj``."""
    layout = head_layout(attention)
    keep = _check_keep(keep_kv_heads, layout.n_kv, "key/value head groups")
    q_rows, kv_rows = layout.query_rows(keep), layout.kv_rows(keep)
    attention.q_proj = sliced(attention.q_proj, rows=q_rows)
    attention.k_proj = sliced(attention.k_proj, rows=kv_rows)
    attention.v_proj = sliced(attention.v_proj, rows=kv_rows)
    attention.o_proj = sliced(attention.o_proj, cols=q_rows)


def prune_mlp(mlp: nn.Module, keep_channels: Tensor) -> None:
    """Keep only the intermediate channels ``keep_channels`` of a LLaMA MLP, in place: rows of ``gate/up_proj``,
    columns of ``down_proj``."""
    keep = _check_keep(keep_channels, mlp.gate_proj.out_features, "MLP channels")
    mlp.gate_proj = sliced(mlp.gate_proj, rows=keep)
    mlp.up_proj = sliced(mlp.up_proj, rows=keep)
    mlp.down_proj = sliced(mlp.down_proj, cols=keep)


def unit_count(block: nn.Module) -> tuple[int, int]:
    """``(kv head groups, MLP channels)`` of a block: the units structured pruning removes."""
    return head_layout(block.self_attn).n_kv, block.mlp.gate_proj.out_features
