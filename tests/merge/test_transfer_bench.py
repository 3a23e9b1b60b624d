"""benchmarks/bench_transfer.py's core functions at toy sizes (a 2-layer random BERT, a word-hash tokenizer, three
hand-written tasks): the SG-LoRA leave-one-out fold, the Trans-LoRA pipeline, the table and the plot."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import torch
from conftest import tiny_bert

import peftkit as pk

ROOT = Path(__file__).resolve().parents[2]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_transfer", ROOT / "benchmarks" / "bench_transfer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_transfer"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class WordHash:
    """Words to ids 1..63 (0 pads), with the call signature the benchmark uses."""

    pad_token_id = 0

    def __call__(self, texts, padding=True, truncation=True, max_length=16, return_tensors="pt"):
        rows = [[1 + sum(map(ord, w)) % 63 for w in t.lower().split()][:max_length] for t in texts]
        width = max_length if padding == "max_length" else max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


GOOD = ["a great film", "wonderful acting", "loved it", "superb story"]
BAD = ["awful film", "boring plot", "bad acting"]
NEWS = ["the market fell", "shares rose today", "the election result", "the minister spoke", "the team won"]


def _tasks(bench):
    sentiment = [(t, 1) for t in GOOD] + [(t, 0) for t in BAD]
    topic = [(t, int(i < 2)) for i, t in enumerate(NEWS)]
    return [
        bench.Task("sentiment", "is this movie review positive or negative", ["bad review", "good review"],
                   sentiment, sentiment[:5]),
        bench.Task("topic", "is this news about business", ["other news", "business news"], topic, topic),
        bench.Task("mood", "is this review positive", ["negative", "positive"], sentiment[1:], sentiment[2:]),
    ]  # fmt: skip


def test_sglora_fold_and_translora_run_at_toy_sizes(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    bench = load_bench()
    enc = bench.Encoder(WordHash(), max_length=8)
    base = tiny_bert(0)
    tasks = _tasks(bench)
    descriptions = bench.embed_descriptions(base, enc, [t.description for t in tasks])
    model = pk.adapt(base, pk.LoRAConfig(**bench.LORA), tasks[0].name)
    seconds = bench.train_bank(model, enc, tasks, steps=3, lr=1e-2)
    assert list(seconds) == [t.name for t in tasks] and model.adapter_names == [t.name for t in tasks]
    assert all(float(v.abs().max()) > 0 for n in model.adapter_names for k, v in model.adapter_state_dict(n).items()
               if "lora_B" in k)  # fmt: skip

    fold = bench.sglora_fold(model, enc, tasks, descriptions, 2, {"steps": 5, "chunk": 64, "latent": 8, "hidden": 32})
    assert fold["bank"] == ["sentiment", "topic"]  # the held-out task's own LoRA is not in the generator's bank
    assert model.adapter_names == [t.name for t in tasks]  # the fold's adapters are removed again
    sims = torch.nn.functional.cosine_similarity(descriptions[2][None], descriptions[:2], dim=-1)
    assert fold["nearest"] == ["sentiment", "topic"][int(sims.argmax())]
    assert abs(sum(fold["pi"].values()) - 1) < 1e-6
    model.set_adapter("mood")
    assert fold["trained_on_task"] == bench.accuracy(model, enc, tasks[2].prompts, tasks[2].held_out)
    with model.adapters_disabled():
        assert fold["zero_shot_base"] == bench.accuracy(model, enc, tasks[2].prompts, tasks[2].held_out)
    for key in bench.SG_ROWS:
        assert 0.0 <= fold[key] <= 1.0

    target_base = copy.deepcopy(tiny_bert(1))
    target_base.encoder.layer = target_base.encoder.layer[:1]
    pool = [*NEWS, "the plot of the film", "a man travels home", "the actor won an award"]
    out = bench.translora_run(model, "sentiment", target_base, enc, tasks[0], pool, GOOD + BAD, steps=3, lr=1e-2,
                              disc_steps=3, count=6, per_round=4, max_rounds=3)  # fmt: skip
    assert "_disc" not in model.adapter_names
    filtered, unfiltered = out["transferred"]["filtered"], out["transferred"]["unfiltered"]
    assert filtered["generated"] <= 12 and filtered["kept"] <= 6 and 0 <= filtered["keep_rate"] <= 1
    assert unfiltered["kept"] == 6 and unfiltered["keep_rate"] == 6 / 8  # two rounds of 4, all kept, 6 used
    model.set_adapter("sentiment")
    assert out["source_with_adapter"] == bench.accuracy(model, enc, tasks[0].prompts, tasks[0].held_out)

    record = {"command": "toy", "machine": "toy", "seconds": 1.0, "sglora": [fold], "translora": out}
    table = bench.markdown(record)
    assert "| mood |" in table and "keep rate" in table
    bench.plot(record, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
