"""Text in and out (``peftkit.serve.text``): stop strings, end-of-sequence, what is held back while streaming.

Streaming with a byte-level BPE tokenizer: a UTF-8 character split across tokens reaches the client whole
(issue 12, item 19).

The model is a 1-layer Llama whose greedy next token is a fixed function of the current one
(:func:`serve_util.successor_llama`), so generation walks a chosen token sequence: ``a``, the two bytes of ``¯``,
the three of ``中``, the four of ``😀``, ``b``, a lone ``0xE5`` (a 3-byte lead that never completes: invalid
UTF-8), ``c``, then EOS. Decoded whole that is ``a¯中😀b�c``; decoded token by token, the prefixes end in U+FFFD
while a character is incomplete.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from serve_util import byte_level_bpe, byte_to_unicode, setup_engine, start_server, successor_llama

from peftkit.errors import InvalidConfigError
from peftkit.serve.cache import AdapterCache
from peftkit.serve.engine import Engine, Request, SamplingParams
from peftkit.serve.text import TextCodec, held_back, stop_cut

FFFD = "\ufffd"
BYTES = [ord("a"), *"¯中😀".encode(), ord("b"), 0xE5, ord("c")]


@pytest.fixture(scope="module")
def lm() -> tuple[object, object]:
    tok = byte_level_bpe()
    b2u = byte_to_unicode()
    ids = [tok.convert_tokens_to_ids(b2u[b]) for b in BYTES]  # type: ignore[attr-defined]
    assert len(set(ids)) == len(ids) and tok.decode(ids) == f"a¯中😀b{FFFD}c"  # type: ignore[attr-defined]
    succ = dict(itertools.pairwise(ids))
    succ[ids[-1]] = tok.eos_token_id  # type: ignore[attr-defined]
    return successor_llama(len(tok), succ, default=ids[0]), tok  # type: ignore[arg-type]


def _stream(engine: Engine, prompt: str, max_tokens: int) -> tuple[Request, list[tuple[str, bool]]]:
    chunks: list[tuple[str, bool]] = []
    req = Request(
        prompt,
        params=SamplingParams(max_tokens=max_tokens),
        on_event=lambda r, delta, done: chunks.append((delta, done)),
    )
    engine.generate([req])
    return req, chunks


@pytest.mark.parametrize(
    ("max_tokens", "text"),
    [
        (3, "a¯"),  # ends right after a split character completes
        (11, "a¯中😀b"),  # every multi-byte character split across tokens, all complete
        (12, f"a¯中😀b{FFFD}"),  # ends on an invalid (never completed) byte: flushed as U+FFFD
        (20, f"a¯中😀b{FFFD}c"),  # the invalid byte mid-text, then more text, then EOS
    ],
)
def test_engine_stream_never_splits_a_character(lm: tuple, max_tokens: int, text: str) -> None:
    model, tok = lm
    engine = Engine(model, tok, AdapterCache(1 << 20))
    req, chunks = _stream(engine, "hello there", max_tokens)
    assert req.error is None and req.text == text
    assert "".join(d for d, _ in chunks) == text
    # U+FFFD only where the final text has it (the invalid 0xE5), never for a character still arriving
    assert sum(d.count(FFFD) for d, _ in chunks) == text.count(FFFD)
    if text.endswith(FFFD):  # the final flush carries it
        assert chunks[-1][1] and chunks[-1][0].endswith(FFFD)
    assert req.finish_reason == ("stop" if max_tokens == 20 else "length")


def test_openai_stream_equals_plain_text(lm: tuple, tmp_path: Path) -> None:
    """Through the server with the real openai client: completions and chat, streamed and not."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from peftkit.serve.server import create_app

    model, tok = lm
    engine = Engine(model, tok, AdapterCache(1 << 20))
    srv, thread, url = start_server(create_app(engine))
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)
        for max_tokens in (11, 12, 20):
            kw = dict(model="base", prompt="hello there", max_tokens=max_tokens, temperature=0)
            plain = client.completions.create(**kw).choices[0].text
            chunks = [c.choices[0].text for c in client.completions.create(**kw, stream=True)]
            assert "".join(chunks) == plain and plain.startswith("a¯中😀b")
            assert sum(c.count(FFFD) for c in chunks) == plain.count(FFFD)
            messages = [{"role": "user", "content": "hi"}]
            ckw = dict(model="base", messages=messages, max_tokens=max_tokens, temperature=0)
            chat = client.chat.completions.create(**ckw).choices[0].message.content
            deltas = [c.choices[0].delta.content or "" for c in client.chat.completions.create(**ckw, stream=True)]
            assert "".join(deltas) == chat == plain
            assert sum(d.count(FFFD) for d in deltas) == chat.count(FFFD)
    finally:
        srv.should_exit = True
        thread.join(30)


def test_logprob_offsets_of_split_characters(lm: tuple) -> None:
    """The tokens of one split character all start where the character does (text offsets); each drawn (greedy)
    token is its position's most likely one."""
    model, tok = lm
    engine = Engine(model, tok, AdapterCache(1 << 20))
    (req,) = engine.generate([Request("hello there", params=SamplingParams(max_tokens=11, logprobs=1))])
    assert req.text == "a¯中😀b"
    assert [lp.offset for lp in req.logprobs] == [0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4]
    assert [lp.token_id for lp in req.logprobs] == req.output_ids
    assert all(lp.top == [(lp.token_id, lp.token, lp.logprob)] for lp in req.logprobs)
    assert sum(lp.token == FFFD for lp in req.logprobs) == 9  # byte tokens decoded alone


def test_stop_strings_max_tokens_and_eos(tmp_path: Path) -> None:
    engine, _, _ = setup_engine(tmp_path, "gpt2")

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


def test_stop_cut_and_held_back() -> None:
    assert stop_cut("hello world", ["lo", "wor"]) == 3 and stop_cut("hello", ["", "xyz"]) == -1
    assert held_back("abc", ["stop", "no"]) == 3  # a stop string of 4 characters may start in the last 3
    assert held_back("ab\ufffd\ufffd", []) == 2  # an unfinished UTF-8 character
    assert held_back("abc", []) == 0


def test_codec_takes_tokenizers_without_special_token_keywords() -> None:
    class Plain:
        eos_token_id = None

        def encode(self, text: str) -> list[int]:
            return [ord(c) for c in text]

        def decode(self, ids: list[int]) -> str:
            return "".join(map(chr, ids))

    codec = TextCodec(Plain(), max_len=4)
    assert codec.prompt_ids("hey", reserve=1) == [104, 101, 121] and codec.decode([104, 105]) == "hi"
    assert codec.token_text(33) == "!" and codec.offsets([104, 105]) == [0, 1] and codec.pad_id == 0
    with pytest.raises(InvalidConfigError, match="context is 4"):
        codec.prompt_ids("hey", reserve=2)
    with pytest.raises(InvalidConfigError, match="empty"):
        codec.prompt_ids("")
