"""Tiny models for training tests, built in code (no assets): a 2-layer Llama with a real byte-level BPE tokenizer
trained here on a small corpus with multi-byte characters, carrying SmolLM2's ChatML chat template (same
special tokens: ``<|im_start|>`` / ``<|im_end|>``, end-of-sequence ``<|im_end|>``); and a tiny BERT folder with
a 64-word WordPiece vocabulary (:func:`save_bert`); token data for ``conftest.TinyNet`` (:func:`token_dataset`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# SmolLM2-Instruct's chat template (ChatML with a default system turn).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The movie was wonderful and the acting was great.",
    "A dull, boring film with a weak story.",
    "Is the following movie review positive or negative? Answer with one word.",
    "positive negative positive negative",
    "Le café était délicieux, très naïve façade.",
    "Grüße aus München, schöne Straße.",
    "日本語のテキストと絵文字 👍🎬 も含む。",
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "system user assistant Review: Answer:",
] * 4
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tokenizer() -> Any:
    """A fast byte-level BPE tokenizer (vocabulary of 400) with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def model(vocab_size: int, seed: int = 0, context: int = 96) -> torch.nn.Module:
    """A 2-layer Llama (hidden 32, 4 heads / 2 KV heads, tied embeddings) with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def save(path: Path, seed: int = 0, context: int = 96) -> Path:
    """Write the tiny model and its tokenizer to ``path`` as a Hugging Face model folder."""
    tok = tokenizer()
    assert tok.convert_tokens_to_ids(SPECIAL) == [0, 1, 2]
    model(len(tok), seed, context).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def chat_rows(n: int = 40) -> list[dict[str, Any]]:
    """Sentiment as chat: the user asks, the assistant answers one word (a learnable rule on the review)."""
    good = ["wonderful", "great", "délicieux 👍", "schöne"]
    bad = ["dull", "boring", "weak", "日本語"]
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        word = (good if positive else bad)[i % 4]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Review: the film was {word}. Answer:"},
                    {"role": "assistant", "content": "positive" if positive else "negative"},
                ]
            }
        )
    return rows


def prompt_rows(n: int = 40) -> list[dict[str, Any]]:
    return [
        {"prompt": f"Review: {'great café' if i % 2 == 0 else 'dull Straße'} {i}. Answer:",
         "completion": " positive" if i % 2 == 0 else " negative"}
        for i in range(n)
    ]  # fmt: skip


BERT_WORDS = (
    "the a and of to is it in that film movie this as with but its for an on be by one not all good bad story "
    "more so you than has too about like his just at or are from have who most funny best out no can if much "
    "what there even some characters comedy action love , . '"
).split()


def save_bert(path: Path) -> Path:
    """A tiny random BertModel (from ``conftest.tiny_bert``) with a 64-word WordPiece tokenizer, saved as a
    Hugging Face model folder."""
    from conftest import tiny_bert
    from transformers import BertTokenizer

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BERT_WORDS]
    vocab = (vocab + [f"w{i}" for i in range(64)])[:64]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    tiny_bert().save_pretrained(path)
    return path


def token_dataset(n: int = 64, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Token sequences for ``conftest.TinyNet``; the label says whether the mean token id is high (learnable
    through mean pooling)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (n, 6), generator=g)
    return [(row, (row.float().mean() > 19.5).long()) for row in ids]


def token_loss(model: torch.nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of ``model(ids)`` on a :func:`token_dataset` batch."""
    ids, labels = batch
    return torch.nn.functional.cross_entropy(model(ids), labels)
