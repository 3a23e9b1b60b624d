"""Helpers of the serving tests: a character tokenizer, a tiny Llama, saved random adapters, an engine over three
saved adapters and the references its requests are checked against."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from conftest import tiny_gpt2
from torch import nn

import peftkit as pk
from peftkit.serve.cache import AdapterCache
from peftkit.serve.engine import Engine, Request

ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789."  # 64 symbols = tiny vocab


class CharTokenizer:
    """One token per character of :data:`ALPHABET` (unknown characters are dropped)."""

    eos_token_id: int | None = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ALPHABET.index(c) for c in text if c in ALPHABET]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(ALPHABET[i] for i in ids)


def start_server(app: object) -> tuple[Any, threading.Thread, str]:
    """uvicorn serving ``app`` on a free loopback port in a thread; returns ``(server, thread, url)`` once it
    accepts connections (stop it with ``server.should_exit = True`` and join the thread)."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    return srv, thread, f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def serve_cli(*args: str, env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """``python -m peftkit.cli serve ARGS --port P`` on a free loopback port (one thread, offline, plus ``env``);
    yields ``(process, url)`` once ``/health`` answers, and stops the process on exit."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    cmd = [sys.executable, "-m", "peftkit.cli", "serve", *args, "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        yield proc, url
    finally:
        proc.terminate()
        proc.wait(30)


def tiny_llama(seed: int = 0) -> nn.Module:
    """A 2-layer Llama with grouped-query attention and random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def random_adapter(make_base: Callable[[], nn.Module], config: pk.AdapterConfig, path: Path, seed: int) -> Path:
    """Save an adapter with random (non-identity) weights for the base ``make_base()`` builds."""
    model = pk.adapt(make_base(), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in model.adapter_modules("default").values():
            for p in adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return model.save(path)


def char_tokenizer_hf() -> object:
    """:class:`CharTokenizer`'s vocabulary as a Hugging Face fast tokenizer (saveable, loads with AutoTokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({c: i for i, c in enumerate(ALPHABET)}, unk_token="."))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token=".")


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what byte-level BPE vocabularies spell
    tokens with; Radford et al., 2019, released ``encoder.py``)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_level_bpe() -> object:
    """A GPT-2-style byte-level BPE tokenizer (ByteLevel pre-tokenizer and decoder, every byte a token,
    merges trained here on a small corpus), as a Hugging Face fast tokenizer with EOS ``<|endoftext|>``.
    Decoding joins the tokens' bytes and replaces invalid UTF-8 by U+FFFD, as GPT-2's, Llama 3's and Qwen's
    tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = ["hello there, the quick brown fox jumps over the lazy dog.", "role user assistant: 中文 😀"] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tk.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")


def successor_llama(vocab_size: int, successor: dict[int, int], default: int, hidden: int = 32) -> nn.Module:
    """A 1-layer Llama whose greedy next token depends only on the current token: ``successor[t]`` after a
    token ``t`` of the table, ``default`` after any other token. Attention and MLP write nothing (``o_proj`` and
    ``down_proj`` are zero), so the last hidden state is the token's embedding: a one-hot direction per table
    token (one shared direction for all others) that ``lm_head`` maps to its successor."""
    from transformers import LlamaConfig, LlamaForCausalLM

    assert len(successor) < hidden
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb.zero_()
        head.zero_()
        other = len(successor)  # the direction of every token outside the table
        emb[:, other] = 1.0
        head[default, other] = 1.0
        for d, (token, nxt) in enumerate(successor.items()):
            emb[token].zero_()
            emb[token, d] = 1.0
            head[nxt, d] = 1.0
    return model


# ------------------------------------------------------------------------------- engines and references
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


def setup_engine(tmp: Path, kind: str, **engine_kw) -> tuple[Engine, dict[str, Path], Callable[[], nn.Module]]:
    make, configs = BASES[kind]
    paths = {f"ad{i}": random_adapter(make, c, tmp / f"ad{i}", seed=i) for i, c in enumerate(configs)}
    cache = AdapterCache(max_bytes=1 << 24, root=tmp)
    cache.register_dir(tmp)
    return Engine(make(), CharTokenizer(), cache, record_logits=True, **engine_kw), paths, make


def merged_reference(make: Callable[[], nn.Module], path: Path | None, prompt: str, n: int) -> tuple[list[int], list]:
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


def check(req: Request, ref: tuple[list[int], list]) -> None:
    tokens, logits = ref
    assert req.error is None, req.error
    assert req.output_ids == tokens[: len(req.output_ids)]
    assert len(req.output_ids) == len(tokens)
    for got, want in zip(req.logits, logits):
        assert (got - want).abs().max().item() <= 1e-4


def warm(engine: Engine, *names: str) -> None:
    """Load adapters into the cache first, so requests for them are admitted at the next step."""
    for name in names:
        engine.cache.get(name)
