"""Helpers of the serving tests: a character tokenizer, a tiny Llama, saved random adapters."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

import peftkit as pk

ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789."  # 64 symbols = tiny vocab


class CharTokenizer:
    """One token per character of :data:`ALPHABET` (unknown characters are dropped)."""

    eos_token_id: int | None = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ALPHABET.index(c) for c in text if c in ALPHABET]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(ALPHABET[i] for i in ids)


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
