"""Shared data for the federated tests: a tiny BERT folder (``_tiny_lm.save_bert``) and a learnable two-class
text file over its 64-word vocabulary."""

from __future__ import annotations

import random
from pathlib import Path

from _tiny_lm import BERT_WORDS, save_bert, write_jsonl

import peftkit.federated  # noqa: F401  (before any flwr import: turns Flower's telemetry off)

POSITIVE, NEGATIVE = ["good", "best", "funny", "love"], ["bad", "not", "no", "too"]


def sentiment_rows(n: int = 80, seed: int = 0) -> list[dict[str, str]]:
    """``n`` rows alternating ``pos`` / ``neg``: four filler words and three class words, shuffled."""
    rng = random.Random(seed)
    filler = [w for w in BERT_WORDS[:24] if w not in POSITIVE + NEGATIVE]
    rows = []
    for i in range(n):
        words = rng.sample(filler, 4) + rng.sample(POSITIVE if i % 2 else NEGATIVE, 3)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": "pos" if i % 2 else "neg"})
    return rows


def tiny_setup(root: Path, n: int = 80) -> tuple[Path, Path]:
    """``(model folder, data file)`` under ``root``."""
    return save_bert(root / "bert"), write_jsonl(root / "data.jsonl", sentiment_rows(n))
