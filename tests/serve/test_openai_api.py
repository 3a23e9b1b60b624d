"""OpenAI compatibility of the server, with the real ``openai`` client (issue 12, item 22): chat without
``max_tokens`` runs to EOS or the context's end; ``max_tokens=0`` follows OpenAI / vLLM (400, except
completions with ``echo``, which score the prompt); ``echo``, ``logprobs`` / ``top_logprobs`` and
``stream_options.include_usage`` are implemented; options the server does not implement are a 400 naming them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt2
from serve_util import CharTokenizer, random_adapter, start_server

import peftkit as pk
from peftkit.serve.cache import AdapterCache
from peftkit.serve.engine import Engine, Request, SamplingParams

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from peftkit.serve.server import chat_prompt, create_app  # noqa: E402

CONTEXT = 32  # tiny_gpt2's n_positions
TOK = CharTokenizer()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("adapters")
    random_adapter(tiny_gpt2, pk.LoRAConfig(r=2, targets=["c_attn"]), root / "ad", seed=1)
    cache = AdapterCache(1 << 24, root=root)
    cache.register_dir(root)
    engine = Engine(tiny_gpt2(), CharTokenizer(), cache)
    srv, thread, url = start_server(create_app(engine))
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)
    yield {"client": client, "root": root, "engine": engine}
    srv.should_exit = True
    thread.join(30)


def _logits(path: Path | None, ids: list[int]) -> torch.Tensor:
    """Next-token logits at every position of ``ids`` on the (adapted) model, one forward, no cache."""
    model = pk.load(tiny_gpt2(), path) if path is not None else tiny_gpt2()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _greedy(path: Path | None, prompt: str, n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the log-softmax of each step's logits."""
    ids, out, steps = TOK.encode(prompt), [], []
    for _ in range(n):
        logp = torch.log_softmax(_logits(path, ids + out)[-1], -1)
        steps.append(logp)
        out.append(int(logp.argmax()))
    return out, torch.stack(steps)


def _close(got: list[float], want: torch.Tensor) -> None:
    torch.testing.assert_close(torch.tensor(got), want.float(), rtol=0, atol=1e-5 * want.abs().max().item())


def test_chat_without_max_tokens_runs_to_the_context_end(server: dict) -> None:
    """No max_tokens: the tiny model has no EOS, so generation stops where the 32-position context is full (it
    stopped at 16 tokens)."""
    messages = [{"role": "user", "content": "x"}]
    prompt_len = len(TOK.encode(chat_prompt(TOK, messages)))
    out = server["client"].chat.completions.create(model="base", messages=messages, temperature=0)
    assert out.usage.prompt_tokens == prompt_len
    assert out.usage.completion_tokens == CONTEXT - prompt_len > 16
    assert out.choices[0].finish_reason == "length"
    tokens, _ = _greedy(None, chat_prompt(TOK, messages), CONTEXT - prompt_len)
    assert out.choices[0].message.content == TOK.decode(tokens)


def test_max_tokens_zero(server: dict) -> None:
    """Chat: 400 naming the parameter (OpenAI: integer below minimum). Completions: 400 unless echo=true, which
    returns the prompt and generates nothing (it generated 16 tokens)."""
    client = server["client"]
    messages = [{"role": "user", "content": "hi"}]
    for kw in ({"max_tokens": 0}, {"max_completion_tokens": 0}):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="base", messages=messages, **kw)
        assert info.value.body["param"] == next(iter(kw)) and "at least 1" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="0 only with echo"):
        client.completions.create(model="base", prompt="hello", max_tokens=0)
    out = client.completions.create(model="base", prompt="hello", max_tokens=0, echo=True)
    assert out.choices[0].text == "hello" and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == 5


def test_echo(server: dict) -> None:
    client, root = server["client"], server["root"]
    tokens, _ = _greedy(root / "ad", "hello", 5)
    kw = dict(model="ad", prompt="hello", max_tokens=5, temperature=0, echo=True)
    assert client.completions.create(**kw).choices[0].text == "hello" + TOK.decode(tokens)
    chunks = [c.choices[0].text for c in client.completions.create(**kw, stream=True)]
    assert chunks[0] == "hello" and "".join(chunks) == "hello" + TOK.decode(tokens)


def test_completion_logprobs_match_the_model(server: dict) -> None:
    """logprobs=3: each token's logprob is log-softmax of the adapted model's logits (checked against a plain
    forward), the top 3 alternatives are the 3 largest, offsets index the text; streamed, the same."""
    client, root = server["client"], server["root"]
    tokens, logp = _greedy(root / "ad", "hello", 6)
    kw = dict(model="ad", prompt="hello", max_tokens=6, temperature=0, logprobs=3)
    lp = client.completions.create(**kw).choices[0].logprobs
    assert lp.tokens == [TOK.decode([t]) for t in tokens]
    _close(lp.token_logprobs, logp[torch.arange(6), torch.tensor(tokens)])
    assert lp.text_offset == list(range(6))  # one character per token
    for top, row in zip(lp.top_logprobs, logp):
        best = row.topk(3)
        assert list(top) == [TOK.decode([int(i)]) for i in best.indices]  # the chosen (greedy) one is the first
        _close(list(top.values()), best.values)
    streamed = [c.choices[0].logprobs for c in client.completions.create(**kw, stream=True)]
    assert [t for s in streamed if s for t in s.tokens] == lp.tokens
    assert [x for s in streamed if s for x in s.token_logprobs] == lp.token_logprobs


def test_echo_logprobs_score_the_prompt(server: dict) -> None:
    """echo + logprobs + max_tokens=0 (how evaluation harnesses score a text): the prompt's tokens with their
    logprobs under the model, the first one null."""
    client, root = server["client"], server["root"]
    ids = TOK.encode("hello there")
    out = client.completions.create(model="ad", prompt="hello there", max_tokens=0, echo=True, logprobs=1)
    lp = out.choices[0].logprobs
    assert lp.tokens == list("hello there") and lp.text_offset == list(range(len(ids)))
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = torch.log_softmax(_logits(root / "ad", ids)[:-1], -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    _close(lp.token_logprobs[1:], want)
    # with generation after the prompt: the generated tokens' offsets continue after the echoed prompt
    out = client.completions.create(model="ad", prompt="hello there", max_tokens=3, echo=True, logprobs=0)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 3 and lp.text_offset == list(range(len(ids) + 3))
    assert out.choices[0].text == "".join(lp.tokens)


def test_chat_logprobs(server: dict) -> None:
    client, root = server["client"], server["root"]
    messages = [{"role": "user", "content": "hey"}]
    tokens, logp = _greedy(root / "ad", chat_prompt(TOK, messages), 5)
    kw = dict(model="ad", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = client.chat.completions.create(**kw).choices[0].logprobs.content
    assert [c.token for c in content] == [TOK.decode([t]) for t in tokens]
    _close([c.logprob for c in content], logp[torch.arange(5), torch.tensor(tokens)])
    assert all(len(c.top_logprobs) == 2 and c.bytes == list(c.token.encode()) for c in content)
    streamed = [c.choices[0].logprobs for c in client.chat.completions.create(**kw, stream=True)]
    assert [c.token for s in streamed if s for c in s.content] == [c.token for c in content]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="ad", messages=messages, max_tokens=2, top_logprobs=2)
    assert info.value.body["param"] == "top_logprobs"


def test_stream_include_usage(server: dict) -> None:
    """A last chunk without choices carries the usage; the others have usage null (OpenAI's shape)."""
    client = server["client"]
    opts = {"include_usage": True}
    chunks = list(client.completions.create(model="base", prompt="abc", max_tokens=4, stream=True, stream_options=opts))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4 and chunks[-1].usage.prompt_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])
    messages = [{"role": "user", "content": "hi"}]
    chunks = list(
        client.chat.completions.create(model="base", messages=messages, max_tokens=3, stream=True, stream_options=opts)
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert chunks[-2].choices[0].finish_reason == "length" and all(c.usage is None for c in chunks[:-1])
    plain = list(client.completions.create(model="base", prompt="abc", max_tokens=2, stream=True))
    assert all(c.choices for c in plain)  # no usage chunk unless asked
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="base", prompt="abc", max_tokens=2, stream_options=opts)
    assert info.value.body["param"] == "stream_options"


@pytest.mark.parametrize(
    ("endpoint", "option", "value"),
    [
        ("completions", "suffix", "!"),
        ("completions", "best_of", 2),
        ("completions", "presence_penalty", 0.5),
        ("completions", "logit_bias", {"1": 5}),
        ("chat", "frequency_penalty", 0.5),
        ("chat", "tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ("chat", "response_format", {"type": "json_object"}),
    ],
)
def test_unimplemented_options_are_refused_by_name(server: dict, endpoint: str, option: str, value: object) -> None:
    client = server["client"]
    with pytest.raises(openai.BadRequestError) as info:
        if endpoint == "completions":
            client.completions.create(model="base", prompt="x", max_tokens=1, **{option: value})
        else:
            messages = [{"role": "user", "content": "x"}]
            client.chat.completions.create(model="base", messages=messages, max_tokens=1, **{option: value})
    assert info.value.body["param"] == option and option in info.value.body["message"]


def test_engine_logprobs_follow_a_stop_cut(tmp_path: Path) -> None:
    """A stop string cuts the text: logprobs keep only the tokens whose text starts before the cut."""
    engine = Engine(tiny_gpt2(), CharTokenizer(), AdapterCache(1 << 20))
    (free,) = engine.generate([Request("abc", params=SamplingParams(max_tokens=8, logprobs=0))])
    stop = free.text[4:6]
    cut = free.text.find(stop)
    (req,) = engine.generate([Request("abc", params=SamplingParams(max_tokens=8, logprobs=0, stop=[stop]))])
    assert req.text == free.text[:cut] and req.finish_reason == "stop"
    assert [lp.token for lp in req.logprobs] == list(req.text)
    assert [lp.offset for lp in req.logprobs] == list(range(cut))


def test_engine_prompt_scoring_in_a_batch(tmp_path: Path) -> None:
    """Requests that score their prompt are prefilled on their own in the step that admits them (all positions'
    logits); the others in that step keep their results."""
    engine = Engine(tiny_gpt2(), CharTokenizer(), AdapterCache(1 << 20), max_prefills_per_step=4)
    reqs = [
        Request("the quick", params=SamplingParams(max_tokens=0, prompt_logprobs=2)),
        Request("brown fox", params=SamplingParams(max_tokens=4)),
        Request("jumps", params=SamplingParams(max_tokens=3, prompt_logprobs=0, logprobs=0)),
    ]
    engine.generate(reqs)
    assert reqs[0].output_ids == [] and reqs[0].finish_reason == "length" and reqs[0].logprobs == []
    (alone,) = engine.generate([Request("brown fox", params=SamplingParams(max_tokens=4))])
    assert reqs[1].output_ids == alone.output_ids and reqs[1].prompt_logprobs == []
    for req in (reqs[0], reqs[2]):
        ids = req.prompt_ids
        logp = torch.log_softmax(_logits(None, ids)[:-1], -1)
        got = req.prompt_logprobs
        assert [e.token_id for e in got] == ids and got[0].logprob is None
        _close([e.logprob for e in got[1:]], logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])])
        k = req.params.prompt_logprobs
        assert all([t[0] for t in e.top] == logp[j].topk(k).indices.tolist() for j, e in enumerate(got[1:]))
    tokens, steps = _greedy(None, "jumps", 3)
    assert reqs[2].output_ids == tokens
    _close([e.logprob for e in reqs[2].logprobs], steps[torch.arange(3), torch.tensor(tokens)])
