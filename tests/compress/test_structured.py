"""Structured pruning plans: scores, lowest units, index maps, the excluded blocks."""

from __future__ import annotations

import pytest
import torch

from peftkit.compress import arch, structured
from peftkit.compress.errors import HeadPruneError, RatioError
from tests.compress import _tiny


def test_prunable_blocks_and_lowest_units():
    assert structured.prunable(30) == list(range(3, 29))
    assert structured.prunable(4) == [0, 1, 2]  # ⌊0.1·4⌋ = 0 first blocks excluded, and the last
    keep = structured.lowest(torch.tensor([3.0, 1.0, 2.0, 5.0]), 0.5)
    assert keep.tolist() == [1.0, 0.0, 0.0, 1.0]
    # already-pruned units (mask 0) count towards the ratio
    assert structured.lowest(torch.tensor([3.0, 1.0, 2.0, 5.0]), 0.25, torch.tensor([0.0, 1, 1, 1])).tolist() == [
        0.0, 1.0, 1.0, 1.0]  # fmt: skip
    with pytest.raises(HeadPruneError, match="leaves none"):
        structured.lowest(torch.ones(1), 1.0)


def test_unit_scores_of_magnitude_sum_rows_and_columns_per_group():
    block = _tiny.llama().model.layers[0]
    heads, channels = structured.unit_scores(block, structured.magnitude(1))
    layout = arch.head_layout(block.self_attn)
    q = block.self_attn.q_proj.weight.detach().abs().sum(1).reshape(layout.n_kv, -1).sum(1).double()
    expected = q / (q.norm() + 1e-8)
    for name in ("k_proj", "v_proj"):
        v = getattr(block.self_attn, name).weight.detach().abs().sum(1).reshape(layout.n_kv, -1).sum(1).double()
        expected = expected + v / (v.norm() + 1e-8)
    o = block.self_attn.o_proj.weight.detach().abs().sum(0).reshape(layout.n_kv, -1).sum(1).double()
    torch.testing.assert_close(heads, expected + o / (o.norm() + 1e-8))
    assert channels.shape == (48,)


def test_plans_from_an_index_map_and_refusals():
    model = _tiny.llama()
    plan = structured.plan_from_removed(model, {1: ([0], [0, 5])})
    assert plan[1][0].tolist() == [1] and len(plan[1][1]) == 46
    shapes = structured.apply(model, plan)
    assert shapes["model.layers.1.mlp.down_proj"]["in"] == 46
    with pytest.raises(HeadPruneError, match="cannot prune 2 key/value head groups of block 0: it has 2"):
        structured.plan_from_removed(_tiny.llama(), {0: ([0, 1], [])})
    with pytest.raises(HeadPruneError, match="block 7 does not exist"):
        structured.plan_from_removed(_tiny.llama(), {7: ([], [])})
    with pytest.raises(RatioError):
        structured.plan_from_scores({}, 0.0)
