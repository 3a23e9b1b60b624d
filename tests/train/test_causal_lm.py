"""peftkit.train.causal_lm: row kinds, where the loss applies (multi-byte text, chat templates), truncation,
packing, bad rows, and the held-out metrics, on a real byte-level BPE tokenizer and a tiny Llama."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _tiny_lm import CHAT_TEMPLATE, model, tokenizer

from peftkit.train import causal_lm
from peftkit.train.causal_lm import IGNORE, Example, Options
from peftkit.train.data import Row
from peftkit.train.errors import DataError

pytest.importorskip("transformers")
PATH = Path("data.jsonl")


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def trained_text(tok, ex: Example) -> str:
    """The text of the tokens that carry a loss."""
    return tok.decode([t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE])


def test_text_rows_train_every_token_and_end_with_eos(tok) -> None:
    ex = causal_lm.encode_row(Row({"text": "Grüße aus München 👍"}, 1), tok, PATH)
    assert ex.labels == ex.input_ids and ex.input_ids[-1] == tok.eos_token_id
    assert tok.decode(ex.input_ids[:-1]) == "Grüße aus München 👍"
    assert ex.prompt_ids is None


def test_prompt_rows_train_only_the_completion(tok) -> None:
    # Multi-byte characters on both sides of the boundary: the byte-level tokens of "é" / "日本" map to their
    # characters, so the boundary falls between characters, never inside one.
    prompt, completion = "Le café était:", " délicieux 日本語 👍"
    ex = causal_lm.encode_row(Row({"prompt": prompt, "completion": completion}, 3), tok, PATH)
    assert trained_text(tok, ex) == completion + "<|im_end|>"
    assert tok.decode(ex.input_ids) == prompt + completion + "<|im_end|>"
    assert ex.prompt_ids == tok(prompt)["input_ids"] and ex.target == completion
    # A token across the boundary (the prompt's trailing space merged with the completion) trains: the
    # completion's first characters always carry a loss.
    ex = causal_lm.encode_row(Row({"prompt": "Le café était: ", "completion": "délicieux"}, 3), tok, PATH)
    assert trained_text(tok, ex) == " délicieux<|im_end|>"


def test_chat_rows_train_only_the_assistant_turns(tok) -> None:
    messages = [
        {"role": "system", "content": "Sei kurz."},
        {"role": "user", "content": "Grüße? 日本"},
        {"role": "assistant", "content": "Schöne Grüße 👍"},
        {"role": "user", "content": "Und?"},
        {"role": "assistant", "content": "café"},
    ]
    ex = causal_lm.encode_row(Row({"messages": messages}, 2), tok, PATH)
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ex.input_ids) == rendered
    # both assistant turns, each with the template's end-of-turn text; nothing of the system or user turns
    assert trained_text(tok, ex) == "Schöne Grüße 👍<|im_end|>\ncafé<|im_end|>\n"
    assert tok.decode(ex.prompt_ids) == tok.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True
    )
    assert ex.target == "café"


def test_default_system_turn_of_the_template_is_not_trained(tok) -> None:
    # SmolLM2's template adds a system turn when there is none: it must not count as assistant text.
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "positive"}]
    ex = causal_lm.encode_row(Row({"messages": messages}, 1), tok, PATH)
    assert trained_text(tok, ex) == "positive<|im_end|>\n"
    assert "SmolLM" in tok.decode(ex.input_ids)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"messages": [{"role": "user", "content": "Hi"}]},
         "line 7: a chat row without an assistant turn (roles: user)"),
        ({"messages": []}, "line 7: 'messages' must be a non-empty list"),
        ({"messages": [{"role": "user"}]}, "line 7: message 1 must be an object with string 'role' and 'content'"),
        ({"prompt": "a"}, "line 7: a prompt row needs 'completion' too (found: prompt)"),
        ({"input": "a", "output": "b"}, "line 7: a causal-lm row needs 'text', 'prompt' and 'completion', or "
                                        "'messages' (found: input, output)"),
        ({"text": 3}, "line 7: 'text' must be a string, found int"),
    ],
)  # fmt: skip
def test_bad_rows_name_the_line(tok, fields: dict, message: str) -> None:
    with pytest.raises(DataError, match="^" + PATH.name.replace(".", r"\.") + ", " + _escape(message)):
        causal_lm.encode_row(Row(fields, 7), tok, PATH)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_chat_rows_need_a_template(tok) -> None:
    plain = tokenizer()
    plain.chat_template = None
    row = Row({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, 4)
    with pytest.raises(DataError, match="line 4: 'messages' rows need a chat template"):
        causal_lm.encode_row(row, plain, PATH)
    assert tok.chat_template == CHAT_TEMPLATE


def test_long_examples_are_truncated_and_counted(tok) -> None:
    rows = [Row({"text": "word " * 50}, 1), Row({"text": "short"}, 2),
            Row({"prompt": "x " * 60, "completion": " positive"}, 3)]  # fmt: skip
    examples, stats = causal_lm.encode(rows, tok, max_length=16, path=PATH)
    # row 1 is cut to 16 tokens, row 3 too, and then has no completion token left: dropped
    assert stats.truncated == 2 and stats.dropped == 1
    assert [len(e.input_ids) for e in examples] == [16, len(tok("short")["input_ids"]) + 1]


def test_packing_fills_blocks_and_keeps_labels(tok) -> None:
    rows = [
        Row({"prompt": f"Review {i}: ", "completion": "positive" if i % 2 else "negative"}, i + 1) for i in range(9)
    ]
    examples, _ = causal_lm.encode(rows, tok, max_length=64, path=PATH)
    blocks = causal_lm.pack(examples, max_length=16)
    assert all(len(b.input_ids) == 16 for b in blocks[:-1]) and 0 < len(blocks[-1].input_ids) <= 16
    assert [t for b in blocks for t in b.input_ids] == [t for e in examples for t in e.input_ids]
    assert [t for b in blocks for t in b.labels] == [t for e in examples for t in e.labels]


def test_collator_pads_right_with_ignored_labels(tok) -> None:
    batch = causal_lm.Collator(tok)([Example([5, 6, 7], [IGNORE, 6, 7]), Example([8], [8])])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]


def test_perplexity_is_the_exp_of_the_token_mean_loss(tok) -> None:
    lm = model(len(tok))
    rows = [Row({"prompt": "Review: great", "completion": " positive"}, 1), Row({"text": "Grüße 👍 schöne Straße"}, 2)]
    data, _ = causal_lm.encode(rows, tok, 64, PATH)
    metrics = causal_lm.evaluate(lm, data, tok, Options(exact_match=False, eval_batch_size=1), progress=False)
    # reference: the model's own (token-mean) loss over the concatenation of both examples' trained tokens
    total = count = 0.0
    for ex in data:
        labels = torch.tensor([ex.labels])
        with torch.no_grad():
            out = lm(input_ids=torch.tensor([ex.input_ids]), labels=labels)
        n = int((labels[:, 1:] != IGNORE).sum())
        total, count = total + out.loss.item() * n, count + n
    assert metrics["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-5)


def test_exact_match_compares_greedy_completions(tok, monkeypatch: pytest.MonkeyPatch) -> None:
    # A model that always greedily says " positive" then stops: right on the positive rows only.
    lm = model(len(tok))
    answer = tok(" positive")["input_ids"] + [tok.eos_token_id]
    vocab = len(tok)

    class Scripted(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = lm
            self.generation_config = lm.generation_config

        def generate(self, input_ids, attention_mask, generation_config):
            steps = torch.tensor(answer).repeat(input_ids.shape[0], 1)
            return torch.cat([input_ids, steps], dim=1)

    rows = [Row({"prompt": "Review: great. Answer:", "completion": " positive"}, 1),
            Row({"prompt": "Review: dull. Answer:", "completion": " negative"}, 2),
            Row({"prompt": "Review: schöne. Answer:", "completion": "positive "}, 3)]  # fmt: skip
    data, _ = causal_lm.encode(rows, tok, 64, PATH)
    rate = causal_lm.exact_match(Scripted(), data, tok, Options(eval_batch_size=2), progress=False)
    assert rate == pytest.approx(2 / 3)
    assert vocab == lm.config.vocab_size


def test_exact_match_runs_real_generation(tok) -> None:
    lm = model(len(tok))
    rows = [Row({"prompt": "Review: great. Answer:", "completion": " positive"}, 1)]
    data, _ = causal_lm.encode(rows, tok, 64, PATH)
    result = causal_lm.exact_match(lm, data, tok, Options(max_new_tokens=3), progress=False)
    assert result in (0.0, 1.0)


def test_context_length_reads_the_config(tok) -> None:
    assert causal_lm.context_length(model(len(tok), context=80)) == 80
    assert causal_lm.context_length(torch.nn.Linear(2, 2)) is None
