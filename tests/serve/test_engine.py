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
from peftkit.errors import AdapterNotFoundError, InvalidConfigError
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
        _check(r, _reference(tiny_llama, paths.get(r.adapter or ""), r.prompt, 3))


def test_request_joins_the_running_batch(tmp_path: Path) -> None:
    """Continuous batching: a request submitted while another decodes is admitted at the next step and decoded
    in the same batch, and both still equal their references."""
    engine, paths, make = _setup(tmp_path, "llama")
    _warm(engine, "ad0", "ad1")
    first = engine.submit(Request("hello", adapter="ad0", params=SamplingParams(max_tokens=10)))
    engine.step()
    engine.step()
    assert engine.running == [first] and len(first.output_ids) == 3
    late = engine.submit(Request("late one", adapter="ad1", params=SamplingParams(max_tokens=4)))
    steps = engine.metrics["decode_steps"]
    engine.step()  # admits (prefills) `late`, then one decode step over both rows
    assert engine.running == [first, late] and not first.finished
    assert len(first.output_ids) == 4 and len(late.output_ids) == 2
    assert engine.metrics["decode_steps"] == steps + 1
    while engine.has_work():
        engine.step()
    _check(first, _reference(make, paths["ad0"], "hello", 10))
    _check(late, _reference(make, paths["ad1"], "late one", 4))


def test_cancel_removes_request_from_batch(tmp_path: Path) -> None:
    engine, paths, make = _setup(tmp_path, "gpt2")
    _warm(engine, "ad0", "ad1")
    gone = engine.submit(Request("bye", adapter="ad0", params=SamplingParams(max_tokens=8)))
    stays = engine.submit(Request("stay", adapter="ad1", params=SamplingParams(max_tokens=8)))
    queued = Request("never", params=SamplingParams(max_tokens=8))
    engine.step()
    engine.submit(queued)
    assert engine.cancel(gone) and engine.cancel(queued)
    assert gone.finish_reason == "cancelled" and gone not in engine.running and gone._kv is None
    assert queued not in engine.waiting and queued.output_ids == []
    assert engine.running == [stays]
    while engine.has_work():
        engine.step()
    assert len(gone.output_ids) == 2  # prefill token + one decode token, then it left the batch
    assert engine.metrics["requests_cancelled"] == 2 and not engine.cancel(stays)
    _check(stays, _reference(make, paths["ad1"], "stay", 8))


def test_drain_finishes_in_flight_then_refuses(tmp_path: Path) -> None:
    from peftkit.serve.engine import EngineClosedError

    engine, _, _ = _setup(tmp_path, "gpt2", max_batch=2)
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
            _check(req, _reference(tiny_gpt2, path, "hello", 4))
        else:
            assert expected > 1e-3


def _warm(engine: Engine, *names: str) -> None:
    """Load adapters into the cache first, so requests for them are admitted at the next step."""
    for name in names:
        engine.cache.get(name)


def _modules(model: pk.AdaptedModel, name: str) -> list:
    return [(p, a, model._layer(p)) for p, a in model.adapter_modules(name).items()]


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


def test_adapters_of_requests_admitted_together_are_not_evicted(tmp_path: Path) -> None:
    """With two slots and three adapters ready at once, the third request waits instead of evicting the
    adapter of a request admitted earlier in the same step (that request would then have no adapter)."""
    engine, paths, make = _setup(tmp_path, "gpt2", max_loras=2)
    _warm(engine, "ad0", "ad1", "ad2")
    reqs = engine.generate(
        [Request(p, adapter=f"ad{i}", params=SamplingParams(max_tokens=3)) for i, p in enumerate(["a", "bb", "ccc"])]
    )
    for r in reqs:
        _check(r, _reference(make, paths[r.adapter], r.prompt, 3))


def test_submit_and_cancel_do_not_wait_for_a_running_step(tmp_path: Path) -> None:
    """The waiting queue has its own lock: while a step holds the engine (simulated by holding its step lock
    in another thread), requests still join the queue, waiting ones can be cancelled, and the adapter of a new
    request starts loading at once."""
    import threading

    engine, paths, make = _setup(tmp_path, "gpt2")
    held, release = threading.Event(), threading.Event()

    def long_step() -> None:
        with engine._lock:
            held.set()
            release.wait(30)

    blocker = threading.Thread(target=long_step)
    blocker.start()
    try:
        held.wait(10)
        req = engine.submit(Request("hi", adapter="ad1", params=SamplingParams(max_tokens=2)))
        gone = engine.submit(Request("bye", params=SamplingParams(max_tokens=2)))
        assert list(engine.waiting) == [req, gone]
        assert engine.cancel(gone) and gone.finish_reason == "cancelled"
        engine.cache.get_async("ad1").result(10)  # joins (or finds) the load submit started: no second load
        assert engine.cache.stats["misses"] == 1 and engine.cache.resident() == ["ad1"]
    finally:
        release.set()
        blocker.join()
    with pytest.raises(InvalidConfigError, match="submitted already"):
        engine.submit(req)
    while engine.has_work():
        engine.step()
    _check(req, _reference(make, paths["ad1"], "hi", 2))


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
    _warm(engine, *paths)  # all in memory: requests are admitted in order, one adapter at a time
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
        _check(r, _reference(tiny_llama, paths[r.adapter], r.prompt, 3))
