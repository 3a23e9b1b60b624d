"""LoRAM: pruned training copy, recovery of the adapter onto the full model (shapes, zeros, exactness)."""

from __future__ import annotations

import pytest
import torch

import peftkit as pk
from peftkit.compress import arch, loram
from peftkit.compress.errors import HeadPruneError, RatioError
from tests.compress import _tiny


def _labelled(n=3):
    data = _tiny.batches(n=n)
    for b in data:
        b["labels"] = b["input_ids"]
    return data


def _trained(removed=None, ratio=None, layers=4):
    full = _tiny.llama(layers=layers)
    small = loram.prune(full, ratio=ratio, removed=removed)
    adapted = loram.adapt(small.model)
    loram.train(adapted, _labelled(), steps=4, lr=1e-2)
    return full, small, adapted


def test_recovered_adapter_equals_the_trained_one_on_kept_positions_and_is_zero_elsewhere(tmp_path):
    full, small, adapted = _trained(removed={1: ([0], list(range(0, 48, 3)))})
    assert arch.unit_count(small.model.model.layers[1]) == (1, 32)
    assert arch.unit_count(full.model.layers[1]) == (2, 48)  # the original is untouched
    recovered = loram.recovered_adapter(adapted, "loram", small.plan, full)
    layout = arch.head_layout(full.model.layers[1].self_attn)
    heads, channels = small.plan[1]
    trained = adapted.adapter_modules("loram")
    for name, rows, cols in [
        ("self_attn.q_proj", layout.query_rows(heads), None),
        ("self_attn.k_proj", layout.kv_rows(heads), None),
        ("self_attn.o_proj", None, layout.query_rows(heads)),
        ("mlp.up_proj", channels, None),
        ("mlp.down_proj", None, channels),
    ]:
        path = f"model.layers.1.{name}"
        small_delta = trained[path].delta_weight(adapted.base_view(path))
        big_delta = recovered.adapter_modules("loram")[path].delta_weight(recovered.base_view(path))
        assert big_delta.shape == full.get_submodule(path).weight.shape
        assert small_delta.abs().max() > 0
        r_idx = rows if rows is not None else torch.arange(big_delta.shape[0])
        c_idx = cols if cols is not None else torch.arange(big_delta.shape[1])
        torch.testing.assert_close(big_delta[r_idx][:, c_idx], small_delta, rtol=0, atol=1e-6)
        assert float(big_delta.abs().sum()) == pytest.approx(float(small_delta.abs().sum()), rel=1e-5)  # zero elsewhere
    # unpruned blocks: the adapter is carried over unchanged
    path = "model.layers.3.mlp.up_proj"
    torch.testing.assert_close(recovered.adapter_modules("loram")[path].B, trained[path].B, rtol=0, atol=0)
    recovered.save(tmp_path / "rec")
    ids = _tiny.batches(n=1, seed=5)[0]["input_ids"]
    with torch.no_grad():
        out = recovered(input_ids=ids).logits
        reloaded = pk.load(recovered.unload(), tmp_path / "rec")
        torch.testing.assert_close(reloaded(input_ids=ids).logits, out, rtol=0, atol=1e-6)


def test_no_pruning_recovers_the_identity_map_and_ratio_pruning_shrinks_blocks():
    full, small, adapted = _trained(removed={})
    tensors = adapted.adapter_state_dict("loram")
    rec = loram.recover(tensors, small.plan, full)
    assert all(torch.equal(rec[k], v) for k, v in tensors.items())
    full = _tiny.llama(layers=4)
    small = loram.prune(full, ratio=0.5)
    assert set(small.plan) == {0, 1}  # ⌊0.05·4⌋ = 0 first blocks and the last two stay whole
    assert arch.unit_count(small.model.model.layers[0]) == (1, 24)
    assert loram.base_parameters(small.model) < loram.base_parameters(full)
    assert loram.base_parameters(full, bits=4) < loram.base_parameters(full) / 2


def test_pruned_model_with_zero_lora_equals_the_original_with_channels_zeroed():
    full = _tiny.llama(layers=4)
    small = loram.prune(full, removed={2: ([], [0, 1, 2, 3])})
    ids = _tiny.batches(n=1)[0]["input_ids"]
    handle = full.model.layers[2].mlp.gate_proj.register_forward_hook(
        lambda m, a, o: torch.cat([torch.zeros_like(o[..., :4]), o[..., 4:]], -1)
    )
    with torch.no_grad():
        masked = full(input_ids=ids).logits
        handle.remove()
        adapted = loram.adapt(small.model)
        torch.testing.assert_close(adapted(input_ids=ids).logits, masked, rtol=0, atol=1e-5)


def test_quantised_copy_and_bad_input():
    pytest.importorskip("hqq")
    full = _tiny.llama(layers=4)
    small = loram.prune(full, ratio=0.5, quantize="hqq4")
    w = small.model.model.layers[3].mlp.up_proj.weight
    assert not torch.equal(w, full.model.layers[3].mlp.up_proj.weight)
    with pytest.raises(HeadPruneError, match="it has 2"):
        loram.prune(full, removed={0: ([0, 1, 1], [])})
    with pytest.raises(RatioError):
        loram.prune(full, ratio=1.0)
