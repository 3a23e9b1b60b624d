"""The adapters in the model (``peftkit.serve.slots``): installed through ``AdaptedModel.load_tensors`` /
``assign_tensors``, the path ``pk.load`` takes, so methods whose saved state needs ``fit_state`` (SVFit's
energy-chosen ranks, Bi-LoRA's saved form: latent weights, or packed 1-bit codes from ``onebit.save_packed``) serve
exactly what ``pk.load`` + forward computes (issue 12, item 20); the rank check; LRU eviction that spares the
adapters in use; evicted modules reused for an adapter of the same config; adapters without a low-rank form served
as the truncated SVD of their delta (``svd_rank``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt2
from serve_util import CharTokenizer, check, merged_reference, random_adapter, setup_engine, tiny_llama, warm
from torch import nn

import peftkit as pk
from peftkit.methods.onebit import BiLoRAConfig, save_packed
from peftkit.methods.svfit import SVFitConfig
from peftkit.serve.cache import AdapterCache, AdapterLoadError
from peftkit.serve.engine import Engine, Request, SamplingParams

TARGETS = ["q_proj", "v_proj"]
CONFIGS: dict[str, pk.AdapterConfig] = {
    # energy: each layer's rank comes from the base's spectrum (saved as the length of sigma)
    "svfit": SVFitConfig(energy=0.9, targets=TARGETS),
    "bilora": BiLoRAConfig(r=2, dropout=0.0, targets=TARGETS),
    "bilora_packed": BiLoRAConfig(r=2, dropout=0.0, targets=TARGETS),  # saved with onebit.save_packed
}
PROMPTS = ["hello there", "abc", "The quick brown fox"]


def safe_open_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path / "adapter.safetensors"), framework="pt") as f:
        return list(f.keys())


def _unmerged_reference(make: Callable[[], nn.Module], path: Path, prompt: str, n: int) -> list[torch.Tensor]:
    """Greedy next-token logits of ``pk.load(make(), path)`` (the adapter active, not merged), no KV cache."""
    model = pk.load(make(), path)
    ids = CharTokenizer().encode(prompt)
    out: list[int] = []
    logits = []
    with torch.no_grad():
        for _ in range(n):
            step = model(torch.tensor([ids + out])).logits[0, -1]
            logits.append(step)
            out.append(int(step.argmax()))
    return logits


@pytest.mark.parametrize("max_loras", [2, 1])  # 1: the adapters take turns in the single slot
@pytest.mark.parametrize("method", list(CONFIGS))
def test_engine_serves_what_pk_load_computes(tmp_path: Path, method: str, max_loras: int) -> None:
    """Engine logits (mixed batch with a LoRA adapter and the base; or one slot shared in turns) equal
    ``pk.load`` + forward of each adapter."""
    configs = {method: CONFIGS[method], "lora": pk.LoRAConfig(r=2, targets=TARGETS)}
    paths = {
        name: random_adapter(tiny_llama, c, tmp_path / name, seed=i) for i, (name, c) in enumerate(configs.items())
    }
    if method == "bilora_packed":  # the same random weights, saved as packed codes + [mu, sigma]
        save_packed(pk.load(tiny_llama(), paths[method]), paths[method])
        assert any(k.endswith("_codes") for k in safe_open_keys(paths[method]))
    if method == "svfit":
        loaded = pk.load(tiny_llama(), paths["svfit"]).adapter_modules("default").values()
        assert min(a.sigma.shape[0] for a in loaded) < 16  # energy chose the ranks, not the config's r=16
    cache = AdapterCache(1 << 24, root=tmp_path)
    cache.register_dir(tmp_path)
    engine = Engine(tiny_llama(), CharTokenizer(), cache, max_loras=max_loras, record_logits=True)
    n = 5
    reqs = [
        Request(p, adapter=name, params=SamplingParams(max_tokens=n))
        for p in PROMPTS
        for name in ([*paths, None] if max_loras > 1 else [*paths])
    ]
    if max_loras > 1:
        engine.generate(reqs)  # all in one mixed batch
    else:
        for r in reqs:  # one slot: the adapters take turns
            engine.generate([r])
    base = tiny_llama()
    for r in reqs:
        assert r.error is None, r.error
        if r.adapter is None:
            continue
        want = _unmerged_reference(tiny_llama, paths[r.adapter], r.prompt, n)
        got = torch.stack(r.logits)
        ref = torch.stack(want)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * ref.abs().max().item())
        assert r.output_ids == [int(x.argmax()) for x in want]
        with torch.no_grad():  # the adapter changes the output (the comparison is not base vs base)
            plain = base(torch.tensor([CharTokenizer().encode(r.prompt)])).logits[0, -1]
        assert (got[0] - plain).abs().max() > 1e-3


def test_install_error_is_adapter_load_error(tmp_path: Path) -> None:
    """Tensors that do not fit the config (adapter.json edited to r=3, the tensors have r=2) fail the requests
    of that adapter with AdapterLoadError naming the adapter, through assign_tensors's shape check; the engine
    keeps serving."""
    path = random_adapter(tiny_llama, pk.LoRAConfig(r=2, targets=TARGETS), tmp_path / "cut", seed=0)
    meta = json.loads((path / "adapter.json").read_text())
    meta["config"]["r"] = 3
    (path / "adapter.json").write_text(json.dumps(meta))
    cache = AdapterCache(1 << 24, root=tmp_path)
    cache.register_dir(tmp_path)
    engine = Engine(tiny_llama(), CharTokenizer(), cache)
    bad, good = engine.generate([Request("abc", adapter="cut"), Request("abc", params=SamplingParams(max_tokens=2))])
    assert isinstance(bad.error, AdapterLoadError) and "'cut'" in str(bad.error) and "shape" in str(bad.error)
    assert str(tmp_path) not in str(bad.error)  # no server path in the message
    assert good.error is None and len(good.output_ids) == 2
    assert engine.installed == [] and engine.model.adapter_names == []


def test_rank_above_max_rank_fails_alone(tmp_path: Path) -> None:
    from peftkit.serve.engine import AdapterRankError

    random_adapter(tiny_gpt2, pk.LoRAConfig(r=8, targets=["c_attn"]), tmp_path / "wide", seed=0)
    random_adapter(tiny_gpt2, pk.LoRAConfig(r=4, targets=["c_attn"]), tmp_path / "narrow", seed=1)
    cache = AdapterCache(max_bytes=1 << 24, root=tmp_path)
    cache.register_dir(tmp_path)
    engine = Engine(tiny_gpt2(), CharTokenizer(), cache, max_rank=4)
    wide, narrow = engine.generate([Request("a", adapter="wide"), Request("b", adapter="narrow")])
    assert isinstance(wide.error, AdapterLoadError) and isinstance(wide.error.__cause__, AdapterRankError)
    assert "max_rank=4" in str(wide.error)
    assert narrow.error is None and engine.installed == ["narrow"]


def test_adapters_of_requests_admitted_together_are_not_evicted(tmp_path: Path) -> None:
    """With two slots and three adapters ready at once, the third request waits instead of evicting the
    adapter of a request admitted earlier in the same step (that request would then have no adapter)."""
    engine, paths, make = setup_engine(tmp_path, "gpt2", max_loras=2)
    warm(engine, "ad0", "ad1", "ad2")
    reqs = engine.generate(
        [Request(p, adapter=f"ad{i}", params=SamplingParams(max_tokens=3)) for i, p in enumerate(["a", "bb", "ccc"])]
    )
    for r in reqs:
        check(r, merged_reference(make, paths[r.adapter], r.prompt, 3))


def test_evicted_adapter_modules_are_reused_for_the_same_config(tmp_path: Path, monkeypatch) -> None:
    """With one slot and adapters that share a config, each new adapter takes over the evicted one's modules
    (renamed, new tensors copied in) instead of being built; outputs stay those of its merged model, also when
    an adapter of another config comes in between."""
    same = pk.LoRAConfig(r=3, alpha=6.0, targets=["q_proj", "v_proj"])
    paths = {f"s{i}": random_adapter(tiny_llama, same, tmp_path / f"s{i}", seed=i) for i in range(3)}
    other = pk.LoRAConfig(r=2, targets=["o_proj"])
    paths["o0"] = random_adapter(tiny_llama, other, tmp_path / "o0", seed=9)
    cache = AdapterCache(max_bytes=1 << 24, root=tmp_path)
    cache.register_dir(tmp_path)
    engine = Engine(tiny_llama(), CharTokenizer(), cache, max_loras=1, record_logits=True)
    warm(engine, *paths)  # all in memory: requests are admitted in order, one adapter at a time
    built = []
    original = pk.AdaptedModel.add_adapter
    monkeypatch.setattr(
        pk.AdaptedModel, "add_adapter", lambda self, n, *a, **k: built.append(n) or original(self, n, *a, **k)
    )
    plan = [("hello", "s0"), ("abc", "s1"), ("zz", "o0"), ("qq q", "s2"), ("k", "s0")]
    reqs = engine.generate([Request(p, adapter=a, params=SamplingParams(max_tokens=3)) for p, a in plan])
    # both s0 requests run first (s0 is in the slot); then s1 takes over s0's modules, o0 is built (another
    # config), and s2 is built in place of o0
    assert built == ["s0", "o0", "s2"]
    assert engine.installed == ["s2"] and engine.metrics["adapter_unloads"] == 3
    for r in reqs:
        check(r, merged_reference(tiny_llama, paths[r.adapter], r.prompt, 3))


def test_svd_conversion_of_dora(tmp_path: Path) -> None:
    """A DoRA adapter (no low-rank form) is served through the stacked bank as the truncated SVD of its
    delta_weight; at full rank the output equals the merged model, at rank 2 the reported error is the
    discarded singular values' share of ‖ΔW‖."""
    from peftkit.serve.engine import SVDLowRank

    path = random_adapter(tiny_gpt2, pk.DoRAConfig(r=4, targets=["c_fc"]), tmp_path / "dora", seed=0)
    loaded = pk.load(tiny_gpt2(), path)
    deltas = {p: a.delta_weight(layer.base) for p, a, layer in _modules(loaded, loaded.adapter_names[0])}
    for svd_rank in (32, 2):
        cache = AdapterCache(max_bytes=1 << 24, root=tmp_path)
        cache.register_dir(tmp_path)
        engine = Engine(tiny_gpt2(), CharTokenizer(), cache, svd_rank=svd_rank, record_logits=True)
        (req,) = engine.generate([Request("hello", adapter="dora", params=SamplingParams(max_tokens=4))])
        modules = engine.model.adapter_modules("dora")
        assert all(isinstance(m, SVDLowRank) and m.down.shape[0] == svd_rank for m in modules.values())
        expected = 0.0
        for delta in deltas.values():
            sv = torch.linalg.svdvals(delta.detach())
            expected = max(expected, float((sv[svd_rank:].square().sum() / sv.square().sum()).sqrt()))
        assert engine.approximation_error["dora"] == pytest.approx(expected, abs=1e-6)
        if svd_rank == 32:
            assert expected < 1e-5
            check(req, merged_reference(tiny_gpt2, path, "hello", 4))
        else:
            assert expected > 1e-3


def _modules(model: pk.AdaptedModel, name: str) -> list:
    return [(p, a, model._layer(p)) for p, a in model.adapter_modules(name).items()]
