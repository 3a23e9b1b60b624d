"""Calibration batches and held-out perplexity for compressing causal LMs.

Calibration follows the GPTQ / EoRA recipe: the token stream of the calibration texts is cut into blocks of
``seq_len`` tokens (no padding), a few of which are enough. A calibration file is any ``peftkit train --task
causal-lm`` data file (JSONL/CSV rows of ``text``, ``prompt``/``completion`` or chat ``messages``), encoded by
that task's own row encoder. Held-out perplexity is that task's evaluation (:func:`peftkit.train.causal_lm.evaluate`:
the exponential of the mean next-token loss) over blocks of held-out text. The packaged text is Rotten Tomatoes
(Pang & Lee; academic research data without an explicit licence), split by movie: calibration from the
training side, evaluation from the held-out side.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.compress.errors import CalibrationError

Batch = dict[str, Tensor]


def token_stream(tokenizer: Any, texts: Iterable[str]) -> list[int]:
    """The texts tokenised and joined, each followed by the end-of-sequence token (if the tokenizer has one)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in texts:
        ids += list(tokenizer(text, add_special_tokens=False)["input_ids"]) + eos
    return ids


def blocks(ids: Sequence[int], seq_len: int, n_blocks: int | None = None) -> list[list[int]]:
    """Consecutive full blocks of ``seq_len`` tokens (the last partial block dropped), at most ``n_blocks``."""
    out = [list(ids[i : i + seq_len]) for i in range(0, len(ids) - seq_len + 1, seq_len)]
    return out[:n_blocks] if n_blocks is not None else out


def batches(token_blocks: Sequence[Sequence[int]], batch_size: int = 4) -> list[Batch]:
    """Blocks of equal length as ``{"input_ids", "attention_mask"}`` batches."""
    out = []
    for i in range(0, len(token_blocks), batch_size):
        ids = torch.tensor([list(b) for b in token_blocks[i : i + batch_size]], dtype=torch.long)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def calibration(
    tokenizer: Any, texts: Iterable[str], *, seq_len: int = 128, n_samples: int = 16, batch_size: int = 4
) -> list[Batch]:
    """``n_samples`` blocks of ``seq_len`` tokens of ``texts`` in batches.

    Raises:
        CalibrationError: the texts do not fill one block.
    """
    found = blocks(token_stream(tokenizer, texts), seq_len, n_samples)
    if not found:
        raise CalibrationError(f"the calibration texts are empty or shorter than one block of {seq_len} tokens")
    return batches(found, batch_size)


def read_calibration(
    path: str | Path, tokenizer: Any, *, seq_len: int = 128, n_samples: int = 16, batch_size: int = 4
) -> list[Batch]:
    """Calibration batches from a causal-lm data file (see the module docstring), every row's tokens joined.

    Raises:
        DataError: the file cannot be read or a row is malformed (:mod:`peftkit.train.data`).
        CalibrationError: the rows do not fill one block of ``seq_len`` tokens.
    """
    from peftkit.train.causal_lm import check_rows, encode_row
    from peftkit.train.data import read_rows

    rows = read_rows(path)
    check_rows(rows, tokenizer, path)
    ids = [t for row in rows for t in encode_row(row, tokenizer, path).input_ids]
    found = blocks(ids, seq_len, n_samples)
    if not found:
        raise CalibrationError(f"{path}: its {len(ids)} tokens do not fill one calibration block of {seq_len}")
    return batches(found, batch_size)


def vocab_size(model: nn.Module) -> int | None:
    """Rows of the model's input embedding (``get_input_embeddings``), if it has one."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    return int(embedding.num_embeddings) if isinstance(embedding, nn.Embedding) else None


def check_calibration(model: nn.Module, data: Iterable[Any], tokenizer: Any = None) -> list[Any]:
    """The calibration batches as a list, checked against the model.

    Raises:
        CalibrationError: no batch; a token id outside the model's vocabulary (data tokenised for another
            tokenizer); a ``tokenizer`` with more tokens than the model's embedding has rows.
    """
    data = list(data)
    if not data:
        raise CalibrationError("the calibration data is empty: give at least one batch")
    vocab = vocab_size(model)
    if tokenizer is not None and vocab is not None and len(tokenizer) > vocab:
        raise CalibrationError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {vocab} rows: "
            "calibration data for another tokenizer"
        )
    for i, batch in enumerate(data):
        ids = batch.get("input_ids") if isinstance(batch, dict) else None
        if isinstance(ids, Tensor):
            if ids.numel() == 0:
                raise CalibrationError(f"calibration batch {i} holds no tokens")
            if vocab is not None and (int(ids.max()) >= vocab or int(ids.min()) < 0):
                raise CalibrationError(
                    f"calibration batch {i} holds token id {int(ids.max())} but the model's vocabulary has {vocab} "
                    "ids: the data was tokenised for another tokenizer"
                )
    return data


def rotten_tomatoes_texts(seed: int = 0) -> tuple[list[str], list[str]]:
    """``(calibration texts, held-out texts)``: the training and held-out sides of the packaged Rotten Tomatoes
    snippets (:func:`peftkit.assets.rotten_tomatoes`, split by movie)."""
    from peftkit.assets import rotten_tomatoes

    split = rotten_tomatoes(seed=seed)
    return [t for t, _ in split.train], [t for t, _ in split.held_out]


def perplexity(
    model: nn.Module, tokenizer: Any, texts: Iterable[str], *, seq_len: int = 128, n_blocks: int = 16,
    batch_size: int = 8, progress: bool = False,
) -> float:  # fmt: skip
    """Perplexity of ``model`` on the first ``n_blocks`` blocks of ``seq_len`` tokens of ``texts``: the
    causal-lm task's evaluation (every token but a block's first is predicted).

    Raises:
        CalibrationError: the texts do not fill one block.
    """
    from peftkit.train.causal_lm import Example, Options, evaluate

    found = blocks(token_stream(tokenizer, texts), seq_len, n_blocks)
    if not found:
        raise CalibrationError(f"the evaluation texts do not fill one block of {seq_len} tokens")
    examples = [Example(b, list(b)) for b in found]
    options = Options(exact_match=False, eval_batch_size=batch_size)
    return evaluate(model, examples, tokenizer, options, progress=progress)["perplexity"]
