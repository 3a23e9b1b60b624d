"""Engine correctness: each row of a mixed, continuously batched decode equals its own merged model; adapters
loaded and unloaded; draining; embeddings and classification."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from serve_util import PROMPTS, CharTokenizer, check, merged_reference, random_adapter, setup_engine, tiny_llama
from torch import nn

import peftkit as pk
from peftkit.errors import AdapterNotFoundError, InvalidConfigError
from peftkit.serve.cache import AdapterCache, AdapterLoadError
from peftkit.serve.engine import Engine, EngineOverloadedError, Request, SamplingParams


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_mixed_batch_equals_merged_models(tmp_path: Path, kind: str) -> None:
    engine, paths, make = setup_engine(tmp_path, kind)
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
        refs[key] = refs.get(key) or merged_reference(make, paths.get(r.adapter or ""), r.prompt, n_tokens)
        check(r, refs[key])
    assert engine.metrics["decode_steps"] < len(reqs) * n_tokens  # rows really were decoded together


def test_single_request_and_order_invariance(tmp_path: Path) -> None:
    engine, paths, make = setup_engine(tmp_path, "gpt2")
    (single,) = engine.generate([Request("hello", adapter="ad1", params=SamplingParams(max_tokens=5))])
    check(single, merged_reference(make, paths["ad1"], "hello", 5))
    specs = [(p, a) for p, a in zip(PROMPTS, ["ad0", "ad1", None, "ad2", "ad1", None, "ad0", "ad2"])]
    first = engine.generate([Request(p, adapter=a, params=SamplingParams(max_tokens=5)) for p, a in specs])
    order = list(range(len(specs)))
    random.Random(0).shuffle(order)
    second = engine.generate([Request(*specs[i], params=SamplingParams(max_tokens=5)) for i in order])
    for j, i in enumerate(order):
        assert second[j].output_ids == first[i].output_ids
        assert torch.allclose(torch.stack(second[j].logits), torch.stack(first[i].logits), atol=1e-5)


def test_errors_stay_with_their_request(tmp_path: Path) -> None:
    engine, _, _ = setup_engine(tmp_path, "gpt2", max_queue=3)
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
    engine, _, _ = setup_engine(tmp_path, "gpt2")
    engine.generate([Request("a", adapter="ad0", params=SamplingParams(max_tokens=2))])
    assert engine.installed == ["ad0"]
    engine.unload_adapter("ad0")
    assert engine.installed == [] and engine.model.adapter_names == []
    with pytest.raises(AdapterNotFoundError):
        engine.submit(Request("a", adapter="ad0"))


def _lora_fleet(tmp: Path, n: int) -> dict[str, Path]:
    """``n`` LoRA adapters of mixed ranks (1-8) and targets on the tiny Llama."""
    targets = [["q_proj", "v_proj"], ["k_proj", "o_proj", "down_proj"], "all-linear", ["up_proj"]]
    return {
        f"f{i}": random_adapter(
            tiny_llama, pk.LoRAConfig(r=1 + i % 8, alpha=2.0 + i % 3, targets=targets[i % 4]), tmp / f"f{i}", seed=i
        )
        for i in range(n)
    }


@pytest.mark.parametrize("n_adapters", [1, 8, 64])
def test_every_row_of_a_mixed_batch_equals_its_merged_model(tmp_path: Path, n_adapters: int) -> None:
    """Issue 7 item 2: 1, 8 and 64 adapters, prompts of 1-20 tokens, base rows mixed in, one batch."""
    paths = _lora_fleet(tmp_path, n_adapters)
    cache = AdapterCache(max_bytes=1 << 26, root=tmp_path)
    cache.register_dir(tmp_path)
    rows = n_adapters + 3
    for name in paths:  # resident in the cache, so every row is admitted at the first step
        cache.get(name)
    engine = Engine(
        tiny_llama(),
        CharTokenizer(),
        cache,
        max_loras=64,
        max_batch=rows,
        max_prefills_per_step=rows,
        record_logits=True,
    )
    rng = random.Random(n_adapters)
    names: list[str | None] = [*paths, None, None, next(iter(paths))]
    prompts = ["".join(rng.choice("abcdefgh xyz") for _ in range(rng.randint(1, 20))) for _ in names]
    reqs = [Request(p, adapter=a, params=SamplingParams(max_tokens=3)) for p, a in zip(prompts, names)]
    engine.generate(reqs)
    assert engine.metrics["decode_steps"] == 2  # all rows in one batch: one prefill, then two joint decode steps
    for r in reqs:
        check(r, merged_reference(tiny_llama, paths.get(r.adapter or ""), r.prompt, 3))


def test_drain_finishes_in_flight_then_refuses(tmp_path: Path) -> None:
    from peftkit.serve.engine import EngineClosedError

    engine, _, _ = setup_engine(tmp_path, "gpt2", max_batch=2)
    engine.start()
    reqs = [engine.submit(Request(p, adapter="ad0", params=SamplingParams(max_tokens=6))) for p in PROMPTS[:5]]
    engine.stop(drain=True, timeout=60)
    assert all(r.finish_reason == "length" and len(r.output_ids) == 6 for r in reqs)
    with pytest.raises(EngineClosedError):
        engine.submit(Request("late"))
    engine.start()  # a restarted engine takes requests again
    (again,) = engine.generate([Request("x", params=SamplingParams(max_tokens=2))])
    assert again.finish_reason == "length"
    engine.stop()


def _tiny_bert(classifier: bool = False) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=3
    )
    return (BertForSequenceClassification(cfg) if classifier else BertModel(cfg)).eval()


@pytest.mark.parametrize("kind", ["encoder", "causal", "classifier"])
def test_embed_and_classify_equal_merged_model_per_input(tmp_path: Path, kind: str) -> None:
    """Embeddings (mean over real tokens, unit length) and class probabilities of a padded batch equal each
    input run alone through the merged model."""
    make = {"encoder": _tiny_bert, "causal": tiny_llama, "classifier": lambda: _tiny_bert(True)}[kind]
    targets = ["q_proj", "v_proj"] if kind == "causal" else ["query", "value"]
    path = random_adapter(make, pk.LoRAConfig(r=4, targets=targets), tmp_path / "enc", seed=0)
    cache = AdapterCache(max_bytes=1 << 24, root=tmp_path)
    cache.register_dir(tmp_path)
    engine = Engine(make(), CharTokenizer(), cache)
    texts = ["hello", "a much longer input text", "x"]
    merged = pk.load(make(), path).merge()
    for adapter, reference in [("enc", merged), (None, make())]:
        if kind == "classifier":
            got, n_tokens = engine.classify(texts, adapter)
        else:
            got, n_tokens = engine.embed(texts, adapter)
        assert n_tokens == sum(len(CharTokenizer().encode(t)) for t in texts)
        for row, text in zip(got, texts):
            with torch.no_grad():
                out = reference(torch.tensor([CharTokenizer().encode(text)]), output_hidden_states=True)
            if kind == "classifier":
                want = torch.softmax(out.logits[0], -1)
            else:
                hidden = out.last_hidden_state if kind == "encoder" else out.hidden_states[-1]
                want = torch.nn.functional.normalize(hidden[0].mean(0), dim=-1)
            assert (row - want).abs().max().item() <= 1e-5
    if kind != "classifier":
        with pytest.raises(InvalidConfigError):
            engine.classify(texts)
