"""End to end: the real ``openai`` client against a peftkit server on 127.0.0.1 (uvicorn in a thread)."""

from __future__ import annotations

import copy
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from conftest import tiny_gpt2

import peftkit as pk

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402
from serve_util import CharTokenizer, random_adapter, start_server  # noqa: E402

from peftkit.serve.cache import AdapterCache  # noqa: E402
from peftkit.serve.engine import Engine, Request  # noqa: E402
from peftkit.serve.server import create_app  # noqa: E402

KEY = "sk-test"


class SlowTokenizer(CharTokenizer):
    """Decoding (once per generated token) takes ``delay`` seconds, so a request stays in flight long enough
    to disconnect from or shut down under."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def decode(self, ids, skip_special_tokens: bool = True) -> str:  # type: ignore[override]
        time.sleep(self.delay)
        return super().decode(ids, skip_special_tokens)


def _mean_pooled(model: torch.nn.Module, tokenizer: object, text: str) -> torch.Tensor:
    """sentence-transformers' all-MiniLM-L6-v2 embedding: mean over the tokens ([CLS] ... [SEP]), unit length."""
    ids = tokenizer(text, return_tensors="pt")  # type: ignore[operator]
    with torch.no_grad():
        hidden = model(**ids).last_hidden_state[0]
    return torch.nn.functional.normalize(hidden.mean(0), dim=-1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("adapters")
    random_adapter(tiny_gpt2, pk.LoRAConfig(r=4, targets=["c_attn", "c_fc"]), root / "math", seed=1)
    random_adapter(tiny_gpt2, pk.LoRAConfig(r=2, alpha=8, targets=["c_attn"]), root / "poem", seed=2)
    random_adapter(tiny_gpt2, pk.LoRAConfig(r=2, targets=["c_proj"]), root / "broken", seed=3)
    (root / "broken" / "adapter.safetensors").write_bytes(b"not safetensors")
    random_adapter(tiny_gpt2, pk.LoRAConfig(r=8, targets=["c_attn"]), root / "wide", seed=5)  # > max_rank
    spare = tmp_path_factory.mktemp("spare")
    random_adapter(tiny_gpt2, pk.LoRAConfig(r=2, targets=["c_fc"]), spare / "late", seed=4)
    cache = AdapterCache(1 << 24, root=root)
    cache.register_dir(root)
    engine = Engine(tiny_gpt2(), CharTokenizer(), cache, max_loras=2, max_rank=4)
    # the encoder for /v1/embeddings: the packaged all-MiniLM-L6-v2 and one LoRA adapter of its own
    from peftkit.assets import load_minilm

    enc_model, enc_tokenizer = load_minilm()
    pristine = copy.deepcopy(enc_model)  # the engine wraps enc_model in place; references need the plain one
    enc_root = tmp_path_factory.mktemp("encoder_adapters")
    make_minilm = lambda: copy.deepcopy(pristine)  # noqa: E731
    random_adapter(make_minilm, pk.LoRAConfig(r=4, targets=["query", "value"]), enc_root / "mini-lora", seed=6)
    enc_cache = AdapterCache(1 << 24, root=enc_root)
    enc_cache.register_dir(enc_root)
    embedder = Engine(enc_model, enc_tokenizer, enc_cache)
    app = create_app(engine, base_name="tiny-gpt2", api_key=KEY, embedder=embedder, embedder_name="minilm")
    srv, thread, url = start_server(app)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=30)
    yield {
        "url": url,
        "client": client,
        "root": root,
        "spare": spare,
        "engine": engine,
        "enc_root": enc_root,
        "enc_tokenizer": enc_tokenizer,
        "make_minilm": make_minilm,
    }
    srv.should_exit = True
    thread.join(10)
    assert not thread.is_alive()


def _greedy(path: Path | None, prompt: str, n: int) -> str:
    model = pk.load(tiny_gpt2(), path).merge() if path is not None else tiny_gpt2()
    tok = CharTokenizer()
    ids = tok.encode(prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([ids + out])).logits[0, -1].argmax()))
    return tok.decode(out)


def test_models_and_health(server: dict) -> None:
    """/v1/models lists the adapters that can serve; the corrupt one ("broken") and the one above max_rank
    ("wide") are listed by /v1/adapters as unavailable, with reasons that name no server path."""
    ids = [m.id for m in server["client"].models.list().data]
    assert ids == ["tiny-gpt2", "math", "poem", "minilm", "mini-lora"]
    assert httpx.get(f"{server['url']}/health").json() == {"status": "ok"}
    listing = httpx.get(f"{server['url']}/v1/adapters", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert listing["registered"] == ["broken", "math", "poem", "wide"]
    assert sorted(listing["unavailable"]) == ["broken", "wide"]
    assert "broken/adapter.safetensors" in listing["unavailable"]["broken"]
    assert "max_rank=4" in listing["unavailable"]["wide"]
    assert str(server["root"]) not in json.dumps(listing)


def test_completions_route_by_model(server: dict) -> None:
    client = server["client"]
    for model, path in [("math", server["root"] / "math"), ("poem", server["root"] / "poem"), ("tiny-gpt2", None)]:
        out = client.completions.create(model=model, prompt="hello world", max_tokens=6, temperature=0)
        assert out.choices[0].text == _greedy(path, "hello world", 6)
        assert out.choices[0].finish_reason == "length"
        assert out.usage.completion_tokens == 6 and out.usage.prompt_tokens == 11


def test_concurrent_requests_mix_adapters(server: dict) -> None:
    client = server["client"]
    results: dict[int, str] = {}
    models = ["math", "poem", "tiny-gpt2", "math", "poem", "tiny-gpt2"]

    def call(i: int) -> None:
        out = client.completions.create(model=models[i], prompt=f"q{i}", max_tokens=5, temperature=0)
        results[i] = out.choices[0].text

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, model in enumerate(models):
        path = None if model == "tiny-gpt2" else server["root"] / model
        assert results[i] == _greedy(path, f"q{i}", 5)


def test_chat_and_streaming(server: dict) -> None:
    client = server["client"]
    messages = [{"role": "user", "content": "hi there"}]
    full = client.chat.completions.create(model="poem", messages=messages, max_tokens=8, temperature=0)
    text = full.choices[0].message.content
    assert full.choices[0].message.role == "assistant" and len(text) == 8
    chunks = list(
        client.chat.completions.create(model="poem", messages=messages, max_tokens=8, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length"
    stream = client.completions.create(model="math", prompt="abc", max_tokens=5, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == _greedy(server["root"] / "math", "abc", 5)
    stopped = client.completions.create(model="math", prompt="abc", max_tokens=5, temperature=0, stop=[text[:1]])
    assert stopped.choices[0].finish_reason in ("stop", "length")


def test_seeded_sampling_reproducible(server: dict) -> None:
    client = server["client"]
    kw = dict(model="math", prompt="seed", max_tokens=8, temperature=0.8, top_p=0.9, seed=5)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_errors(server: dict) -> None:
    client = server["client"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="broken", prompt="x", max_tokens=2)
    bad = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(f"{server['url']}/v1/models").status_code == 401  # no Authorization header at all
    with pytest.raises(openai.UnprocessableEntityError, match="max_rank=4"):  # rank 8 > max_rank
        client.completions.create(model="wide", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="math", prompt="x", max_tokens=2, n=2)
    out = client.completions.create(model="math", prompt="still alive", max_tokens=2, temperature=0)
    assert len(out.choices[0].text) == 2  # the server survived


def test_load_unload_adapters(server: dict) -> None:
    url, client = server["url"], server["client"]
    headers = {"Authorization": f"Bearer {KEY}"}
    shutil.copytree(server["spare"] / "late", server["root"] / "late")
    r = httpx.post(f"{url}/v1/adapters", json={"name": "late"}, headers=headers)
    assert r.status_code == 200, r.text
    out = client.completions.create(model="late", prompt="new one", max_tokens=4, temperature=0)
    assert out.choices[0].text == _greedy(server["root"] / "late", "new one", 4)
    for bad in ({"name": "x", "path": "../../etc"}, {"name": "../x"}, {"name": "tiny-gpt2"}):
        assert httpx.post(f"{url}/v1/adapters", json=bad, headers=headers).status_code == 400
    corrupt = {"name": "broken2", "path": "broken"}
    assert httpx.post(f"{url}/v1/adapters", json=corrupt, headers=headers).status_code == 422
    assert httpx.delete(f"{url}/v1/adapters/late", headers=headers).status_code == 200
    assert "late" not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt="x", max_tokens=2)
    assert httpx.delete(f"{url}/v1/adapters/late", headers=headers).status_code == 404
    metrics = httpx.get(f"{url}/metrics").text
    assert "peftkit_tokens_generated" in metrics and "# TYPE peftkit_requests_running gauge" in metrics
    values = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if not line.startswith("#"))
    assert float(values["peftkit_tokens_per_second"]) > 0  # tokens were generated in the last 10 s
    assert float(values["peftkit_cache_hits_total"]) >= 1 and float(values["peftkit_requests_waiting"]) == 0


def test_adapter_name_conflict_replace_and_path_free_errors(server: dict) -> None:
    """POST /v1/adapters: a loaded name is 409 unless ``replace`` is true, which swaps the weights (requests then
    match the new adapter); a failed replace is 422 and the old adapter keeps serving; no error message names
    the server's adapters folder."""
    url, client, root = server["url"], server["client"], server["root"]
    headers = {"Authorization": f"Bearer {KEY}"}
    random_adapter(tiny_gpt2, pk.LoRAConfig(r=4, targets=["c_attn", "c_fc"]), root / "math_v2", seed=11)
    try:
        r = httpx.post(f"{url}/v1/adapters", json={"name": "math", "path": "math_v2"}, headers=headers)
        assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_exists", r.text
        out = client.completions.create(model="math", prompt="hello", max_tokens=5, temperature=0)
        assert out.choices[0].text == _greedy(root / "math", "hello", 5)  # still the old weights
        body = {"name": "math", "path": "math_v2", "replace": True}
        r = httpx.post(f"{url}/v1/adapters", json=body, headers=headers)
        assert r.status_code == 200 and r.json()["status"] == "replaced", r.text
        new_text = _greedy(root / "math_v2", "hello", 5)
        assert new_text != _greedy(root / "math", "hello", 5)
        out = client.completions.create(model="math", prompt="hello", max_tokens=5, temperature=0)
        assert out.choices[0].text == new_text
        failed = [
            ({"name": "math", "path": "broken", "replace": True}, 422, "broken/adapter.safetensors"),
            ({"name": "math", "path": "nothere", "replace": True}, 422, "nothere is not a saved peftkit adapter"),
            ({"name": "math", "path": "../../etc", "replace": True}, 400, "'../../etc' lies outside"),
        ]
        for body, status, says in failed:
            r = httpx.post(f"{url}/v1/adapters", json=body, headers=headers)
            message = r.json()["error"]["message"]
            assert r.status_code == status and says in message and str(root) not in message, r.text
        out = client.completions.create(model="math", prompt="hello", max_tokens=5, temperature=0)
        assert out.choices[0].text == new_text  # the failed replaces left math_v2 serving
        with pytest.raises(openai.UnprocessableEntityError) as info:
            client.completions.create(model="broken", prompt="x", max_tokens=2)
        assert str(root) not in str(info.value) and "'broken'" in str(info.value)
    finally:  # the other tests of this module expect the original math
        body = {"name": "math", "path": "math", "replace": True}
        assert httpx.post(f"{url}/v1/adapters", json=body, headers=headers).status_code == 200


def test_queue_full_is_429(tmp_path: Path) -> None:
    cache = AdapterCache(1 << 20, root=tmp_path)
    engine = Engine(tiny_gpt2(), CharTokenizer(), cache, max_queue=2)
    for _ in range(2):  # no engine loop runs here: the queue stays full
        engine.submit(Request("x"))
    with TestClient(create_app(engine, manage_engine=False)) as http:
        r = http.post("/v1/completions", json={"model": "base", "prompt": "x"})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        assert "peftkit_http_429_total 1" in http.get("/metrics").text


def test_embeddings_with_the_openai_client(server: dict) -> None:
    """/v1/embeddings on the packaged all-MiniLM-L6-v2: the base and its LoRA adapter (chosen by ``model``)
    equal sentence-transformers-style mean pooling of the (merged) model run alone per text."""
    client, tok, make = server["client"], server["enc_tokenizer"], server["make_minilm"]
    texts = ["A quiet film about a loud family.", "great"]
    for model, reference in [
        ("minilm", make()),
        ("mini-lora", pk.load(make(), server["enc_root"] / "mini-lora").merge()),
    ]:
        out = client.embeddings.create(model=model, input=texts)
        assert [d.index for d in out.data] == [0, 1]
        assert out.usage.prompt_tokens == sum(len(tok(t)["input_ids"]) for t in texts)
        for d, text in zip(out.data, texts):
            got = torch.tensor(d.embedding)
            assert got.shape == (384,)
            assert (got - _mean_pooled(reference, tok, text)).abs().max().item() <= 1e-5
    one = client.embeddings.create(model="minilm", input="great")
    assert torch.allclose(torch.tensor(one.data[0].embedding), _mean_pooled(make(), tok, "great"), atol=1e-5)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="math", input="x")  # an LM adapter is not an embedding model


def test_embeddings_and_classify_without_embedder(tmp_path: Path) -> None:
    """Only a causal LM served: /v1/embeddings pools its last hidden state; /v1/classify says it is not a
    classifier (400)."""
    random_adapter(tiny_gpt2, pk.LoRAConfig(r=2, targets=["c_attn"]), tmp_path / "ad", seed=0)
    cache = AdapterCache(1 << 20, root=tmp_path)
    cache.register_dir(tmp_path)
    engine = Engine(tiny_gpt2(), CharTokenizer(), cache)
    with TestClient(create_app(engine, manage_engine=False)) as http:
        r = http.post("/v1/embeddings", json={"model": "ad", "input": ["hello", "a b"], "encoding_format": "float"})
        assert r.status_code == 200, r.text
        want, _ = engine.embed(["hello", "a b"], "ad")
        got = torch.tensor([d["embedding"] for d in r.json()["data"]])
        assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(got, engine.embed(["hello", "a b"])[0])
        assert http.post("/v1/classify", json={"model": "base", "input": "x"}).status_code == 400
        assert http.post("/v1/embeddings", json={"model": "nope", "input": "x"}).status_code == 404


def test_classify_endpoint(tmp_path: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        cfg = BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
        )
        cfg.id2label, cfg.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
        return BertForSequenceClassification(cfg).eval()

    path = random_adapter(make, pk.LoRAConfig(r=2, targets=["query", "value"]), tmp_path / "enc" / "senti", seed=0)
    cache = AdapterCache(1 << 20, root=tmp_path / "enc")
    cache.register_dir(tmp_path / "enc")
    lm = Engine(tiny_gpt2(), CharTokenizer(), AdapterCache(1 << 20))
    app = create_app(lm, manage_engine=False, embedder=Engine(make(), CharTokenizer(), cache), embedder_name="clf")
    with TestClient(app) as http:
        r = http.post("/v1/classify", json={"model": "senti", "input": ["good film", "bad"]})
        assert r.status_code == 200, r.text
        merged = pk.load(make(), path).merge()
        for row, text in zip(r.json()["data"], ["good film", "bad"]):
            with torch.no_grad():
                want = torch.softmax(merged(torch.tensor([CharTokenizer().encode(text)])).logits[0], -1)
            assert torch.allclose(torch.tensor(row["probs"]), want, atol=1e-5)
            assert row["label"] == ["neg", "pos"][int(want.argmax())]


def test_request_size_limits(tmp_path: Path) -> None:
    engine = Engine(tiny_gpt2(), CharTokenizer(), AdapterCache(1 << 20))
    app = create_app(engine, manage_engine=False, max_body_bytes=400, max_tokens_limit=8, max_inputs=2)
    with TestClient(app) as http:
        r = http.post("/v1/completions", json={"model": "base", "prompt": "x" * 500})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = http.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 9})
        assert r.status_code == 400 and "max_tokens=9" in r.json()["error"]["message"]
        r = http.post("/v1/completions", json={"model": "base", "prompt": "x" * 40, "max_tokens": 4})  # context: 32
        assert r.status_code == 400 and "context" in r.json()["error"]["message"]
        r = http.post("/v1/embeddings", json={"model": "base", "input": ["a", "b", "c"]})
        assert r.status_code == 400
        chunked = http.post("/v1/completions", content=iter([b'{"model": "base", "prompt": "x"}']))
        assert chunked.status_code == 411
    assert engine.metrics["requests_total"] == 0  # nothing reached the engine


def _wait_for(condition: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_client_disconnect_cancels_request(tmp_path: Path) -> None:
    """A client that goes away mid-stream (or while waiting for a plain answer) has its request taken out of
    the running batch; the other request in the batch finishes normally."""
    engine = Engine(tiny_gpt2(), SlowTokenizer(0.05), AdapterCache(1 << 20))
    srv, thread, url = start_server(create_app(engine))
    try:
        body = {"model": "base", "prompt": "abc", "max_tokens": 25, "temperature": 0}
        result: dict = {}
        other = threading.Thread(
            target=lambda: result.update(r=httpx.post(f"{url}/v1/completions", json=body, timeout=60))
        )
        other.start()
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=30) as r:
            lines = (line for line in r.iter_lines() if line)  # SSE events are separated by blank lines
            assert next(lines).startswith("data: ")  # the request is in the engine; it needs 25 slow tokens
            assert next(lines).startswith("data: ")  # one generated token has arrived
        _wait_for(lambda: engine.metrics["requests_cancelled"] == 1)
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
            httpx.post(f"{url}/v1/completions", json=body, timeout=0.5)
        _wait_for(lambda: engine.metrics["requests_cancelled"] == 2)
        other.join(60)
        assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 25
        _wait_for(lambda: not engine.has_work())  # the step that finished it retires it right after
        assert engine.metrics["requests_finished"] == 1
        assert engine.metrics["tokens_generated"] < 3 * 25  # the two cancelled requests stopped early
    finally:
        srv.should_exit = True
        thread.join(30)


def test_graceful_shutdown_finishes_in_flight_requests(tmp_path: Path) -> None:
    engine = Engine(tiny_gpt2(), SlowTokenizer(0.03), AdapterCache(1 << 20))
    srv, thread, url = start_server(create_app(engine))
    results: list = []
    body = {"model": "base", "prompt": "abc", "max_tokens": 20, "temperature": 0}
    clients = [
        threading.Thread(target=lambda: results.append(httpx.post(f"{url}/v1/completions", json=body, timeout=60)))
        for _ in range(2)
    ]
    for c in clients:
        c.start()
    _wait_for(lambda: len(engine.running) == 2)
    srv.should_exit = True  # what SIGTERM / Ctrl-C does
    for c in clients:
        c.join(60)
    thread.join(60)
    assert not thread.is_alive()
    assert [r.status_code for r in results] == [200, 200]
    assert all(r.json()["usage"]["completion_tokens"] == 20 for r in results)
    assert engine.metrics["requests_finished"] == 2 and engine.metrics["requests_failed"] == 0
    with pytest.raises(httpx.ConnectError):  # and the server is gone
        httpx.post(f"{url}/v1/completions", json=body, timeout=5)
