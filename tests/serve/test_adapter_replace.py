"""``Engine.load_adapter``: registering checks that an adapter loads; ``replace=True`` swaps an adapter atomically
(issue 12, item 21): a request runs on one version from admission to end, and a failed load keeps the old one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt2
from serve_util import CharTokenizer, random_adapter

import peftkit as pk
from peftkit.errors import AdapterExistsError, AdapterNameError
from peftkit.serve.cache import AdapterCache, AdapterLoadError
from peftkit.serve.engine import Engine, Request, SamplingParams

CONFIG = pk.LoRAConfig(r=2, alpha=4, targets=["c_attn", "c_fc"])


def _reference(path: Path, prompt: str, n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and next-token logits of ``pk.load(base, path)`` alone, no KV cache."""
    model = pk.load(tiny_gpt2(), path)
    ids, out, logits = CharTokenizer().encode(prompt), [], []
    with torch.no_grad():
        for _ in range(n):
            step = model(torch.tensor([ids + out])).logits[0, -1]
            logits.append(step)
            out.append(int(step.argmax()))
    return out, torch.stack(logits)


def _same(req: Request, path: Path) -> None:
    """``req`` ran on the adapter saved at ``path`` at every step."""
    assert req.error is None, req.error
    tokens, logits = _reference(path, str(req.prompt), len(req.logits))
    assert req.output_ids == tokens
    torch.testing.assert_close(torch.stack(req.logits), logits, rtol=0, atol=1e-5 * logits.abs().max().item())


def test_replace_while_a_request_runs(tmp_path: Path) -> None:
    v1 = random_adapter(tiny_gpt2, CONFIG, tmp_path / "ad", seed=1)
    v2 = random_adapter(tiny_gpt2, CONFIG, tmp_path / "ad_v2", seed=2)
    bad = random_adapter(tiny_gpt2, CONFIG, tmp_path / "bad", seed=3)
    meta = json.loads((bad / "adapter.json").read_text())
    meta["config"]["r"] = 3  # the tensors have r=2: fails only when the tensors are assigned
    (bad / "adapter.json").write_text(json.dumps(meta))
    cache = AdapterCache(1 << 24, root=tmp_path)
    engine = Engine(tiny_gpt2(), CharTokenizer(), cache, record_logits=True)
    assert engine.load_adapter("ad", "ad") is False  # a new name
    n = 8
    old = engine.submit(Request("hello", adapter="ad", params=SamplingParams(max_tokens=n)))
    for _ in range(3):
        engine.step()
    assert 1 <= len(old.output_ids) < n  # in flight

    with pytest.raises(AdapterExistsError):
        engine.load_adapter("ad", "ad_v2")  # no replace asked
    assert engine.load_adapter("ad", "ad_v2", replace=True) is True
    new = engine.submit(Request("hello", adapter="ad", params=SamplingParams(max_tokens=n)))
    with pytest.raises(AdapterLoadError, match=r"adapter 'ad' cannot be loaded: bad: .*shape") as info:
        engine.load_adapter("ad", "bad", replace=True)  # refused at once: the trial install fails
    assert str(tmp_path) not in str(info.value)
    with pytest.raises(AdapterNameError, match=r"'\.\./x' lies outside"):
        engine.load_adapter("ad", "../x", replace=True)
    while engine.has_work():
        engine.step()
    _same(old, v1)  # started on v1, finished on v1
    _same(new, v2)  # the failed replace left v2 serving
    assert engine.model.adapter_names == ["ad"]  # no trial adapter left behind

    # a retrained adapter saved over the same folder: replace re-reads it (a plain re-register would not)
    model = pk.load(tiny_gpt2(), v1)
    with torch.no_grad():
        for p in model.adapter_modules("default").values():
            for t in p.parameters():
                t.mul_(-1.5)
    v3 = model.save(tmp_path / "ad_v2")
    engine.load_adapter("ad", "ad_v2", replace=True)
    (again,) = engine.generate([Request("hello", adapter="ad", params=SamplingParams(max_tokens=n))])
    _same(again, v3)


def test_replace_waits_for_the_old_version_with_a_background_loop(tmp_path: Path) -> None:
    """With the engine's own loop running: a replace during a long request; both requests check out."""
    v1 = random_adapter(tiny_gpt2, CONFIG, tmp_path / "ad", seed=1)
    v2 = random_adapter(tiny_gpt2, CONFIG, tmp_path / "ad_v2", seed=2)
    cache = AdapterCache(1 << 24, root=tmp_path)
    engine = Engine(tiny_gpt2(), CharTokenizer(), cache, record_logits=True)
    engine.load_adapter("ad", "ad")
    engine.start()
    try:
        old = engine.submit(Request("abc", adapter="ad", params=SamplingParams(max_tokens=24)))
        while not old.output_ids:
            old.wait(0.001)
        engine.load_adapter("ad", "ad_v2", replace=True)
        new = engine.submit(Request("abc", adapter="ad", params=SamplingParams(max_tokens=4)))
        assert old.wait(60) and new.wait(60)
    finally:
        engine.stop()
    _same(old, v1)
    _same(new, v2)


def test_module_rank_above_max_rank_is_refused_with_the_adapter_named(tmp_path: Path) -> None:
    """A per-module rank above ``max_rank`` (the config's own ``r`` is within it) fails the trial install with
    AdapterLoadError naming the adapter (not the scratch name it was tried under)."""
    config = pk.LoRAConfig(r=2, targets=["c_attn", "c_fc"], overrides={"c_fc": {"r": 8}})
    random_adapter(tiny_gpt2, config, tmp_path / "wide", seed=0)
    engine = Engine(tiny_gpt2(), CharTokenizer(), AdapterCache(1 << 24, root=tmp_path), max_rank=4)
    with pytest.raises(AdapterLoadError, match=r"^adapter 'wide' cannot be loaded: module .*c_fc' has rank 8"):
        engine.load_adapter("wide", "wide")
    assert "wide" not in engine.cache and engine.model.adapter_names == []
