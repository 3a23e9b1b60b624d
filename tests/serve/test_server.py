"""End to end: the real ``openai`` client against a peftkit server on 127.0.0.1 (uvicorn in a thread)."""

from __future__ import annotations

import shutil
import socket
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
from serve_util import CharTokenizer, random_adapter  # noqa: E402

from peftkit.serve.cache import AdapterCache  # noqa: E402
from peftkit.serve.engine import Engine, Request  # noqa: E402
from peftkit.serve.server import create_app  # noqa: E402

KEY = "sk-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("adapters")
    random_adapter(tiny_gpt2, pk.LoRAConfig(r=4, targets=["c_attn", "c_fc"]), root / "math", seed=1)
    random_adapter(tiny_gpt2, pk.LoRAConfig(r=2, alpha=8, targets=["c_attn"]), root / "poem", seed=2)
    random_adapter(tiny_gpt2, pk.LoRAConfig(r=2, targets=["c_proj"]), root / "broken", seed=3)
    (root / "broken" / "adapter.safetensors").write_bytes(b"not safetensors")
    spare = tmp_path_factory.mktemp("spare")
    random_adapter(tiny_gpt2, pk.LoRAConfig(r=2, targets=["c_fc"]), spare / "late", seed=4)
    cache = AdapterCache(1 << 24, root=root)
    cache.register_dir(root)
    engine = Engine(tiny_gpt2(), CharTokenizer(), cache, max_loras=2)
    app = create_app(engine, base_name="tiny-gpt2", api_key=KEY)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=30)
    yield {"url": url, "client": client, "root": root, "spare": spare, "engine": engine}
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
    ids = [m.id for m in server["client"].models.list().data]
    assert ids == ["tiny-gpt2", "broken", "math", "poem"]
    assert httpx.get(f"{server['url']}/health").json() == {"status": "ok"}


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


def test_queue_full_is_429(tmp_path: Path) -> None:
    cache = AdapterCache(1 << 20, root=tmp_path)
    engine = Engine(tiny_gpt2(), CharTokenizer(), cache, max_queue=2)
    for _ in range(2):  # no engine loop runs here: the queue stays full
        engine.submit(Request("x"))
    with TestClient(create_app(engine, manage_engine=False)) as http:
        r = http.post("/v1/completions", json={"model": "base", "prompt": "x"})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        assert "peftkit_http_429_total 1" in http.get("/metrics").text
