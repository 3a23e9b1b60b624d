"""Choosing the next token (``peftkit.serve.sampling``): greedy, temperature + top-p with a per-request seeded
generator, log-probabilities of the raw logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from serve_util import setup_engine

from peftkit.errors import InvalidConfigError
from peftkit.serve.engine import Request, SamplingParams
from peftkit.serve.sampling import prompt_logprobs, sample, token_logprob


def test_sampling_is_seeded_per_request(tmp_path: Path) -> None:
    engine, _, _ = setup_engine(tmp_path, "gpt2")
    params = dict(max_tokens=8, temperature=0.9, top_p=0.8, seed=123)
    (alone,) = engine.generate([Request("hey", adapter="ad1", params=SamplingParams(**params))])
    batch = engine.generate(
        [
            Request(p, adapter=a, params=SamplingParams(max_tokens=8, temperature=1.0))
            for p, a in [("x", "ad0"), ("y", None)]
        ]
        + [Request("hey", adapter="ad1", params=SamplingParams(**params))]
    )
    assert batch[-1].output_ids == alone.output_ids
    other = engine.generate([Request("hey", adapter="ad1", params=SamplingParams(**{**params, "seed": 7}))])
    assert other[0].output_ids != alone.output_ids or len(set(alone.output_ids)) == 1


def test_top_p_draws_from_the_nucleus_in_proportion() -> None:
    """p = (0.5, 0.3, 0.15, 0.05), top_p = 0.7: the nucleus is the two most likely tokens (0.5 < 0.7, the
    second starts at 0.5 < 0.7, the third at 0.8); draws follow 0.5 : 0.3 renormalised (0.625 for token 0)."""
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    params = SamplingParams(temperature=1.0, top_p=0.7)
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample(logits, params, g) for _ in range(4000)])
    assert set(draws.tolist()) == {0, 1}
    share = float((draws == 0).float().mean())
    assert abs(share - 0.625) < 0.03  # 4000 draws: standard error 0.0077
    assert sample(logits, SamplingParams(temperature=0.0)) == 0  # greedy


def test_logprobs_are_the_log_softmax_of_the_raw_logits() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 11) * 3
    text = str  # a token's "text" is its id, written out
    logp = torch.log_softmax(logits, -1)
    one = token_logprob(logits[2], 7, 3, offset=4, text=text)
    assert one.token == "7" and one.offset == 4 and one.logprob == pytest.approx(float(logp[2, 7]), abs=1e-6)
    assert [t[0] for t in one.top] == logp[2].topk(3).indices.tolist()
    ids = [3, 1, 4, 1, 5, 9]  # logits[j] predicts ids[j + 1]
    got = prompt_logprobs(ids, logits, 2, offsets=list(range(6)), text=text)
    assert got[0].logprob is None and [e.token_id for e in got] == ids
    want = logp[torch.arange(5), torch.tensor(ids[1:])]
    torch.testing.assert_close(torch.tensor([e.logprob for e in got[1:]]), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", -1),
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("logprobs", 21),
        ("prompt_logprobs", -1),
    ],
)
def test_bad_sampling_params_name_the_field(field: str, value: float) -> None:
    with pytest.raises(InvalidConfigError, match=field):
        SamplingParams(**{field: value})
