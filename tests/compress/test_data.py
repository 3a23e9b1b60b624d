"""Calibration batches and held-out perplexity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from peftkit.compress import data
from peftkit.compress.errors import CalibrationError
from tests import _tiny_lm
from tests.compress import _tiny


@pytest.fixture(scope="module")
def tok():
    return _tiny_lm.tokenizer()


def test_blocks_are_full_and_consecutive(tok):
    ids = data.token_stream(tok, ["the movie was great", "a dull film"])
    assert ids.count(tok.eos_token_id) == 2
    found = data.blocks(ids, 4)
    assert all(len(b) == 4 for b in found) and [t for b in found for t in b] == ids[: 4 * len(found)]
    batches = data.calibration(tok, _tiny_lm.CORPUS, seq_len=8, n_samples=5, batch_size=2)
    assert [b["input_ids"].shape for b in batches] == [(2, 8), (2, 8), (1, 8)]
    with pytest.raises(CalibrationError, match="empty or shorter"):
        data.calibration(tok, ["hi"], seq_len=64)


def test_read_calibration_uses_the_causal_lm_rows(tok, tmp_path):
    path = _tiny_lm.write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in _tiny_lm.CORPUS])
    batches = data.read_calibration(path, tok, seq_len=8, n_samples=3, batch_size=4)
    assert batches[0]["input_ids"].shape == (3, 8)
    short = _tiny_lm.write_jsonl(tmp_path / "s.jsonl", [{"text": "hi"}])
    with pytest.raises(CalibrationError, match="do not fill"):
        data.read_calibration(short, tok, seq_len=64)


def test_check_calibration_refuses_empty_and_foreign_data(tok):
    model = _tiny.llama()
    with pytest.raises(CalibrationError, match="empty"):
        data.check_calibration(model, [])
    with pytest.raises(CalibrationError, match="another tokenizer"):
        data.check_calibration(model, [{"input_ids": torch.tensor([[1, 70]])}])
    with pytest.raises(CalibrationError, match=r"has \d+ tokens but the model's embedding has 64"):
        data.check_calibration(model, _tiny.batches(), tokenizer=tok)
    assert len(data.check_calibration(model, iter(_tiny.batches()))) == 3


def test_perplexity_is_the_exponential_of_the_mean_next_token_loss(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    ppl = data.perplexity(model, tok, _tiny_lm.CORPUS, seq_len=16, n_blocks=3, batch_size=2)
    ids = torch.tensor(data.blocks(data.token_stream(tok, _tiny_lm.CORPUS), 16, 3))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    expected = math.exp(float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))))
    assert ppl == pytest.approx(expected, rel=1e-5)
