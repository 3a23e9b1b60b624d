"""``peftkit.merge.knots``: KnOTS' shared basis is exact, merges run in it, trimming is global by default."""

from __future__ import annotations

import torch
from _helpers import adapted, delta, exact_sum, rel
from conftest import make_tiny_net

import peftkit as pk
from peftkit.merge.knots import align
from peftkit.merge.sources import collect

W = [0.7, -0.3]


def _tiny_pair() -> pk.AdaptedModel:
    return adapted(
        make_tiny_net(),
        {
            "a": pk.LoRAConfig(r=2, alpha=4.0, targets=["fc1", "fc2", "conv"]),
            "b": pk.LoRAConfig(r=3, alpha=3.0, targets=["fc1", "fc2", "conv"]),
        },
    )


def test_knots_aligns_exactly_and_merges_in_the_shared_basis() -> None:
    model = _tiny_pair()
    for source in collect(model, ["a", "b"]):
        a = align(source)
        assert a is not None and a.u.shape[1] <= 5  # k <= Σ r_i
        torch.testing.assert_close(a.u.T @ a.u, torch.eye(a.u.shape[1], dtype=torch.float64), atol=1e-10, rtol=0)
        for i, name in enumerate("ab"):
            want = delta(model, name, source.path).reshape(a.u.shape[0], -1)
            assert rel(a.u @ a.z[i], want) < 1e-6
    # task arithmetic in the aligned basis is task arithmetic; one task with weight 1 is that task
    pk.merge_adapters(model, ["a", "b"], W, method="knots", merge="task_arithmetic", new_name="k_ta")
    pk.merge_adapters(model, ["b"], method="knots", merge="ties", density=1.0, new_name="k_one")
    result = pk.merge_adapters(model, ["a", "b"], W, method="knots", density=0.3)
    assert result.method == "knots+ties" and max(result.ranks.values()) <= 5 and result.error == 0.0
    for path in ("fc1", "fc2", "conv"):
        assert rel(delta(model, "k_ta", path), exact_sum(model, ["a", "b"], W, path)) < 1e-6
        assert rel(delta(model, "k_one", path), delta(model, "b", path)) < 1e-6


def test_knots_trims_over_the_whole_model_by_default() -> None:
    """Global top-k (the official code): the kept share is density over all modules together, not per module."""
    model = _tiny_pair()
    pk.merge_adapters(model, ["a"], method="knots", merge="magnitude_prune", density=0.3, new_name="g")
    pk.merge_adapters(model, ["a"], method="knots", merge="magnitude_prune", density=0.3, scope="module", new_name="m")
    z = {s.path: align(s).z[0] for s in collect(model, ["a"])}
    every = torch.cat([t.reshape(-1) for t in z.values()])
    threshold = every.abs().topk(int(0.3 * every.numel())).values[-1]
    for path, t in z.items():
        kept = t * (t.abs() >= threshold)
        u = align(collect(model, ["a"])[list(z).index(path)]).u
        assert rel(delta(model, "g", path), (u @ kept).reshape(delta(model, "a", path).shape)) < 1e-5
        k = int(0.3 * t.numel())
        local = t * (t.abs() >= t.abs().reshape(-1).topk(k).values[-1])
        assert rel(delta(model, "m", path), (u @ local).reshape(delta(model, "a", path).shape)) < 1e-5
