"""Engine correctness: each row of a mixed, continuously batched decode equals its own merged model."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt2
from serve_util import CharTokenizer, random_adapter, tiny_llama
from torch import nn

import peftkit as pk
from peftkit.errors import AdapterNotFoundError
from peftkit.serve.cache import AdapterCache, AdapterLoadError
from peftkit.serve.engine import Engine, EngineOverloadedError, Request, SamplingParams

BASES: dict[str, tuple[Callable[[], nn.Module], list[pk.AdapterConfig]]] = {
    "gpt2": (
        tiny_gpt2,
        [
            pk.LoRAConfig(r=2, alpha=4, targets=["c_attn"]),
            pk.LoRAConfig(r=8, alpha=8, targets=["c_attn", "c_proj", "c_fc"]),
            pk.DoRAConfig(r=4, targets=["c_fc"]),  # no low-rank form: the per-group path
        ],
    ),
    "llama": (
        tiny_llama,
        [
            pk.LoRAConfig(r=2, alpha=4, targets=["q_proj", "v_proj"]),
            pk.LoRAConfig(r=6, alpha=3, targets="all-linear"),
            pk.DoRAConfig(r=4, targets=["o_proj", "down_proj"]),
        ],
    ),
}
PROMPTS = ["a", "hello there", "The quick brown fox", "x1", "abc abc abc", "Q", "zz top 9", "lorem ipsum dolor"]


def _setup(tmp: Path, kind: str, **engine_kw) -> tuple[Engine, dict[str, Path], Callable[[], nn.Module]]:
    make, configs = BASES[kind]
    paths = {f"ad{i}": random_adapter(make, c, tmp / f"ad{i}", seed=i) for i, c in enumerate(configs)}
    cache = AdapterCache(max_bytes=1 << 24, root=tmp)
    cache.register_dir(tmp)
    return Engine(make(), CharTokenizer(), cache, record_logits=True, **engine_kw), paths, make


def _reference(make: Callable[[], nn.Module], path: Path | None, prompt: str, n: int) -> tuple[list[int], list]:
    """Greedy decoding without a KV cache on a plain model with the adapter merged into its weights."""
    model = pk.load(make(), path).merge() if path is not None else make()
    ids = CharTokenizer().encode(prompt)
    out, logits = [], []
    with torch.no_grad():
        for _ in range(n):
            step = model(torch.tensor([ids + out])).logits[0, -1]
            logits.append(step)
            out.append(int(step.argmax()))
    return out, logits


def _check(req: Request, ref: tuple[list[int], list]) -> None:
    tokens, logits = ref
    assert req.error is None, req.error
    assert req.output_ids == tokens[: len(req.output_ids)]
    assert len(req.output_ids) == len(tokens)
    for got, want in zip(req.logits, logits):
        assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_mixed_batch_equals_merged_models(tmp_path: Path, kind: str) -> None:
    engine, paths, make = _setup(tmp_path, kind)
    names = [*paths, None]
    n_tokens = 6
    reqs = [
        Request(p, adapter=names[i % len(names)], params=SamplingParams(max_tokens=n_tokens))
        for i, p in enumerate(PROMPTS)
    ]
    engine.generate(reqs)
    refs: dict[tuple, tuple] = {}
    for r in reqs:
        key = (r.adapter, r.prompt)
        refs[key] = refs.get(key) or _reference(make, paths.get(r.adapter or ""), r.prompt, n_tokens)
        _check(r, refs[key])
    assert engine.metrics["decode_steps"] < len(reqs) * n_tokens  # rows really were decoded together


def test_single_request_and_order_invariance(tmp_path: Path) -> None:
    engine, paths, make = _setup(tmp_path, "gpt2")
    (single,) = engine.generate([Request("hello", adapter="ad1", params=SamplingParams(max_tokens=5))])
    _check(single, _reference(make, paths["ad1"], "hello", 5))
    specs = [(p, a) for p, a in zip(PROMPTS, ["ad0", "ad1", None, "ad2", "ad1", None, "ad0", "ad2"])]
    first = engine.generate([Request(p, adapter=a, params=SamplingParams(max_tokens=5)) for p, a in specs])
    order = list(range(len(specs)))
    random.Random(0).shuffle(order)
    second = engine.generate([Request(*specs[i], params=SamplingParams(max_tokens=5)) for i in order])
    for j, i in enumerate(order):
        assert second[j].output_ids == first[i].output_ids
        assert torch.allclose(torch.stack(second[j].logits), torch.stack(first[i].logits), atol=1e-5)


def test_continuous_batching_and_slot_eviction(tmp_path: Path) -> None:
    """Requests join between decode steps; with max_loras=1 adapters cycle through the one slot."""
    engine, paths, make = _setup(tmp_path, "llama", max_loras=2, max_prefills_per_step=1)
    plan = [("hello", "ad0"), ("abc", "ad1"), ("zz", None), ("qq q", "ad2"), ("k", "ad0"), ("long prompt", "ad1")]
    reqs = []
    for prompt, adapter in plan:
        reqs.append(engine.submit(Request(prompt, adapter=adapter, params=SamplingParams(max_tokens=4 + len(reqs)))))
        engine.step()
    while engine.has_work():
        engine.step()
        assert len(engine.installed) <= 2
    for r in reqs:
        _check(r, _reference(make, paths.get(r.adapter or ""), r.prompt, r.params.max_tokens))
    assert engine.metrics["adapter_unloads"] >= 1


def test_sampling_is_seeded_per_request(tmp_path: Path) -> None:
    engine, _, _ = _setup(tmp_path, "gpt2")
    params = dict(max_tokens=8, temperature=0.9, top_p=0.8, seed=123)
    (alone,) = engine.generate([Request("hey", adapter="ad1", params=SamplingParams(**params))])
    batch = engine.generate(
        [
            Request(p, adapter=a, params=SamplingParams(max_tokens=8, temperature=1.0))
            for p, a in [("x", "ad0"), ("y", None)]
        ]
        + [Request("hey", adapter="ad1", params=SamplingParams(**params))]
    )
    assert batch[-1].output_ids == alone.output_ids
    other = engine.generate([Request("hey", adapter="ad1", params=SamplingParams(**{**params, "seed": 7}))])
    assert other[0].output_ids != alone.output_ids or len(set(alone.output_ids)) == 1


def test_stop_strings_max_tokens_and_eos(tmp_path: Path) -> None:
    engine, _, _ = _setup(tmp_path, "gpt2")

    def params(**kw) -> SamplingParams:
        return SamplingParams(max_tokens=10, temperature=1.0, seed=3, **kw)

    (free,) = engine.generate([Request("stop me", params=params())])
    assert free.finish_reason == "length" and len(free.output_ids) == 10
    stop = free.text[3:5]
    (cut,) = engine.generate([Request("stop me", params=params(stop=[stop]))])
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.find(stop)]
    j = next(i for i, t in enumerate(free.output_ids) if t not in free.output_ids[:i] and i > 0)
    engine.tokenizer.eos_token_id = free.output_ids[j]
    (eos,) = engine.generate([Request("stop me", params=params())])
    assert eos.finish_reason == "stop" and eos.output_ids == free.output_ids[:j]
    streamed: list[str] = []
    engine.tokenizer.eos_token_id = None
    req = Request("stop me", params=params(stop=[stop]), on_event=lambda r, d, f: streamed.append(d))
    engine.generate([req])
    assert "".join(streamed) == cut.text


def test_errors_stay_with_their_request(tmp_path: Path) -> None:
    engine, _, _ = _setup(tmp_path, "gpt2", max_queue=3)
    (tmp_path / "ad1" / "adapter.safetensors").write_bytes(b"broken")
    other = pk.LoRAConfig(r=2, targets=["q_proj"])
    random_adapter(tiny_llama, other, tmp_path / "llama_ad", seed=0)
    engine.cache.register("llama_ad", tmp_path / "llama_ad")
    with pytest.raises(AdapterNotFoundError):
        engine.submit(Request("x", adapter="nope"))
    reqs = engine.generate([Request("a", adapter="ad1"), Request("b", adapter="llama_ad"), Request("c", adapter="ad0")])
    assert isinstance(reqs[0].error, AdapterLoadError) and reqs[0].finish_reason == "error"
    assert isinstance(reqs[1].error, AdapterLoadError) and "llama_ad" in str(reqs[1].error)
    assert reqs[2].error is None and reqs[2].finish_reason == "length"
    for _ in range(3):
        engine.submit(Request("q"))
    with pytest.raises(EngineOverloadedError):
        engine.submit(Request("q"))


def test_unload_adapter(tmp_path: Path) -> None:
    engine, _, _ = _setup(tmp_path, "gpt2")
    engine.generate([Request("a", adapter="ad0", params=SamplingParams(max_tokens=2))])
    assert engine.installed == ["ad0"]
    engine.unload_adapter("ad0")
    assert engine.installed == [] and engine.model.adapter_names == []
    with pytest.raises(AdapterNotFoundError):
        engine.submit(Request("a", adapter="ad0"))
