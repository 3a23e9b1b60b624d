"""Layout discovery, the factorised Linear and the physical removal of heads / channels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit.compress import arch
from peftkit.compress.errors import HeadPruneError, UnknownArchitectureError
from tests.compress import _tiny


def test_block_linears_and_targets():
    model = _tiny.llama()
    found = arch.block_linears(model, "test")
    assert len(found) == 3 * 7 and next(iter(found)) == "model.layers.0.self_attn.q_proj"
    assert list(arch.linears(model, ["down_proj"], "test")) == [f"model.layers.{i}.mlp.down_proj" for i in range(3)]
    with pytest.raises(UnknownArchitectureError, match=r"self_attn.q_proj.*ModuleLists are none"):
        arch.decoder_blocks(nn.Sequential(nn.Linear(2, 2)), "test")
    with pytest.raises(UnknownArchitectureError, match=r"nn\.Linear modules named nothing"):
        arch.linears(model, ["nothing"], "test")


def test_factored_linear_round_trip():
    down, up, bias = torch.randn(3, 5), torch.randn(4, 3), torch.randn(4)
    module = arch.FactoredLinear.from_factors(down, up, bias)
    x = torch.randn(2, 5)
    torch.testing.assert_close(module(x), x @ (up @ down).T + bias)
    rebuilt = arch.build(arch.describe(module))
    rebuilt.load_state_dict(module.state_dict())
    torch.testing.assert_close(rebuilt(x), module(x))
    assert arch.describe(nn.Linear(5, 4, bias=False)) == {"kind": "linear", "in": 5, "out": 4, "bias": False}


def _masked_forward(model, block_index, kv_keep, ch_keep, ids):
    """The model with the removed units' outputs zeroed (q, k, v rows of dropped kv groups; MLP channels)."""
    block = model.model.layers[block_index]
    layout = arch.head_layout(block.self_attn)
    drop_kv = torch.tensor([h for h in range(layout.n_kv) if h not in kv_keep])
    drop_ch = torch.tensor([c for c in range(block.mlp.gate_proj.out_features) if c not in ch_keep])
    handles = []

    def zero(rows):
        def hook(module, args, output):
            output = output.clone()
            output[..., rows] = 0
            return output

        return hook

    if drop_kv.numel():
        handles.append(block.self_attn.q_proj.register_forward_hook(zero(layout.query_rows(drop_kv))))
        for name in ("k_proj", "v_proj"):
            handles.append(getattr(block.self_attn, name).register_forward_hook(zero(layout.kv_rows(drop_kv))))
    handles.append(block.mlp.gate_proj.register_forward_hook(zero(drop_ch)))
    with torch.no_grad():
        out = model(input_ids=ids).logits
    for h in handles:
        h.remove()
    return out


def test_pruned_block_equals_the_masked_block():
    model, ids = _tiny.llama(), _tiny.batches(n=1)[0]["input_ids"]
    kv_keep, ch_keep = [1], list(range(0, 48, 2))
    masked = _masked_forward(model, 1, kv_keep, ch_keep, ids)
    block = model.model.layers[1]
    arch.prune_attention(block.self_attn, torch.tensor(kv_keep))
    arch.prune_mlp(block.mlp, torch.tensor(ch_keep))
    assert block.self_attn.q_proj.out_features == 16 and block.self_attn.k_proj.out_features == 8
    assert block.mlp.down_proj.in_features == 24 and arch.unit_count(block) == (1, 24)
    with torch.no_grad():
        pruned = model(input_ids=ids).logits
    torch.testing.assert_close(pruned, masked, rtol=0, atol=1e-5)


def test_pruning_everything_is_refused():
    block = _tiny.llama().model.layers[0]
    with pytest.raises(HeadPruneError, match="all 2 key/value head groups"):
        arch.prune_attention(block.self_attn, torch.tensor([], dtype=torch.long))
    with pytest.raises(HeadPruneError, match=r"\[0, 48\)"):
        arch.prune_mlp(block.mlp, torch.tensor([48]))
