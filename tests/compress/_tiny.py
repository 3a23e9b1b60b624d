"""Tiny models and calibration batches for the compression tests, built in code (no assets)."""

from __future__ import annotations

import torch

VOCAB = 64


def llama(seed: int = 0, *, layers: int = 3, heads: int = 4, kv_heads: int = 2, hidden: int = 32, ffn: int = 48):
    """A small random ``LlamaForCausalLM`` (eager attention, tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
        tie_word_embeddings=True, attn_implementation="eager",
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def batches(n: int = 3, size: int = 4, length: int = 16, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Random token batches with full attention masks."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (size, length), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out
