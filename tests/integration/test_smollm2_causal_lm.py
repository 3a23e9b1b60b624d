"""The causal-lm task on the real SmolLM2-135M-Instruct (slow: the one test with real SmolLM2 weights): the loss
covers exactly the assistant's answer in SmolLM2's own chat template (not its default system turn), and a
two-step run trains, evaluates and reproduces its numbers from the run folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftkit import assets
from peftkit.train import causal_lm
from peftkit.train.data import Row

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2() -> Path:
    pytest.importorskip("transformers")
    find = getattr(assets, "smollm2_dir", None)
    if find is None:
        pytest.skip("peftkit.assets has no smollm2_dir")
    try:
        return find(quiet=True)
    except assets.AssetNotFoundError as exc:
        pytest.skip(str(exc))


def chat(review: str, answer: str) -> dict:
    question = f"Is the following movie review positive or negative? Answer with one word. Review: {review}"
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def test_assistant_only_loss_and_a_short_run(smollm2: Path, tmp_path: Path) -> None:
    from _tiny_lm import write_jsonl
    from transformers import AutoTokenizer

    from peftkit.train.run import evaluate, train

    tok = AutoTokenizer.from_pretrained(smollm2)
    ex = causal_lm.encode_row(Row(chat("Ein schönes Märchen, très émouvant 👍", "positive"), 1), tok, "rt.jsonl")
    trained = tok.decode([t for t, label in zip(ex.input_ids, ex.labels) if label != causal_lm.IGNORE])
    assert trained == "positive<|im_end|>\n"
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(ex.input_ids)  # the template's system turn

    rows = [chat("a gorgeous, witty film", "positive"), chat("dull and far too long", "negative")] * 3
    data = write_jsonl(tmp_path / "rt.jsonl", rows)
    result = train(tmp_path / "run", model=str(smollm2), data=str(data), task="causal-lm", r=2, alpha=4,
                   targets="q_proj,v_proj", lr=5e-4, batch_size=2, max_steps=2, progress=False, log=lambda m: None,
                   overrides={"task.max_new_tokens": 2, "eval_fraction": 0.2})  # fmt: skip
    assert result.train_result.global_step == 2 and result.num_eval == 1
    assert set(result.metrics) == {"eval_loss", "perplexity", "exact_match"}
    metrics, count = evaluate(tmp_path / "run", progress=False)
    assert count == 1 and metrics == pytest.approx(result.metrics, rel=1e-6)
