"""The engine installs a saved adapter through ``AdaptedModel.assign_tensors``, the path ``pk.load`` takes, so
methods whose saved state needs ``fit_state`` (SVFit's energy-chosen ranks, Bi-LoRA's saved form: latent weights,
or packed 1-bit codes from ``onebit.save_packed``) serve exactly what ``pk.load`` + forward computes (issue 12,
item 20)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from serve_util import CharTokenizer, random_adapter, tiny_llama
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
