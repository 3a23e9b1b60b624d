"""The ``classify`` task: text classification on the Hugging Face classes.

The base is ``AutoModelForSequenceClassification`` loaded from a folder or a Hub id (a ``BertModel`` checkpoint
such as all-MiniLM-L6-v2 becomes ``BertForSequenceClassification``: the checkpoint's encoder and pooler plus a
new ``classifier``). The weights the checkpoint lacks (the new head) are drawn from the run's seed, so the same
run rebuilds the same head, and they train whole through ``modules_to_save``. Hence a PEFT export loads with
plain ``PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=...),
export)`` and a merged model with ``AutoModelForSequenceClassification.from_pretrained``.

Data: CSV or JSONL rows with a text column and a label column (names configurable). The label set is the
labels found in the file, sorted (integers ``0 .. k-1`` map to themselves), unless given; a label outside a
given set is an error naming the line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from peftkit.train.data import Row, require_columns
from peftkit.train.errors import DataError

NAME = "classify"
PEFT_TASK_TYPE = "SEQ_CLS"
# Hyperparameters of a classify run unless set (the demo's: LoRA r=8 on query/value with a new head).
TRAIN_DEFAULTS: dict[str, Any] = {"lr": 2e-3, "warmup_ratio": 0.06, "batch_size": 32}


@dataclass
class Options:
    """Settings of the ``classify`` task (``--set name=value``).

    Attributes:
        text_column: the column holding the text.
        label_column: the column holding the label.
        labels: the label set, in class-index order (default: the labels found in the data, sorted; integers
            ``0 .. k-1`` keep their value).
        max_length: tokens per text; longer texts are truncated (counted in the log). Capped at the model's
            context length.
        eval_batch_size: texts per forward pass when evaluating.
    """

    text_column: str = "text"
    label_column: str = "label"
    labels: list[str] | None = None
    max_length: int = 128
    eval_batch_size: int = 64


@dataclass
class Example:
    """A tokenised text and its class index."""

    input_ids: list[int]
    label: int


def label_set(rows: Sequence[Row], options: Options, path: str | Path) -> list[str]:
    """The classes in index order: ``options.labels`` if given (every row's label must be in it), else the
    labels found (integers ``0 .. k-1`` as themselves, anything else sorted as text)."""
    rows = sorted(rows, key=lambda row: row.line)  # report the first bad line of the file
    for row in rows:
        require_columns(row, [options.text_column, options.label_column], path,
                        "set text_column= / label_column= to the names in your file")  # fmt: skip
    if options.labels is not None:
        known = [str(x) for x in options.labels]
        for row in rows:
            if str(row.fields[options.label_column]) not in known:
                raise DataError(
                    f"{path}, line {row.line}: label {row.fields[options.label_column]!r} is not in the label set "
                    f"({', '.join(known)})"
                )
        return known
    found = {str(row.fields[options.label_column]) for row in rows}
    if len(found) < 2:
        raise DataError(f"{path}: every row has the label {next(iter(found))!r}; classification needs two or more")
    if all(x.isdigit() for x in found) and sorted(int(x) for x in found) == list(range(len(found))):
        return [str(i) for i in range(len(found))]
    return sorted(found)


def encode(
    rows: Sequence[Row], tokenizer: Any, labels: list[str], options: Options, max_length: int
) -> tuple[list[Example], int]:
    """Tokenise ``rows`` (truncated to ``max_length`` tokens); returns the examples and how many were cut."""
    index = {label: i for i, label in enumerate(labels)}
    texts = [str(row.fields[options.text_column]) for row in rows]
    return encode_texts(texts, [index[str(row.fields[options.label_column])] for row in rows], tokenizer, max_length)


def encode_texts(
    texts: Sequence[str], labels: Sequence[int], tokenizer: Any, max_length: int
) -> tuple[list[Example], int]:
    """Tokenise ``texts`` as the tokenizer does with ``truncation=True, max_length=max_length``; also count the
    texts that were longer."""
    if not texts:
        return [], 0
    full = tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]
    cut = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    longer = sum(len(f) > max_length for f in full)
    return [Example(ids, int(y)) for ids, y in zip(cut, labels)], longer


class Collator:
    """Pad a list of :class:`Example` into ``input_ids``, ``attention_mask`` and ``labels`` (right padding with
    the tokenizer's pad token, to the longest in the batch)."""

    def __init__(self, tokenizer: Any) -> None:
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __call__(self, examples: Sequence[Example]) -> dict[str, Tensor]:
        width = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[i, : len(e.input_ids)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e.label for e in examples])}


def load_model(
    model_id: str, labels: list[str], seed: int, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, list[str]]:
    """``(model, new modules)``: ``AutoModelForSequenceClassification`` for ``labels`` with the weights the
    checkpoint lacks (or has in another shape) drawn from ``seed``: matrices ``N(0, initializer_range)``,
    vectors zero, norm weights one (as transformers' ``_init_weights`` draws them, but from a generator of our
    own, so the head does not depend on what else drew from the global RNG). The second item lists the modules
    holding those weights (the head), which train whole (``modules_to_save``)."""
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(
        model_id,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        ignore_mismatched_sizes=True,
        output_loading_info=True,
        dtype=dtype,
    )
    mismatched = {k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", [])}
    fresh = sorted(set(info.get("missing_keys", [])) | mismatched)
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(seed)
    std = getattr(model.config, "initializer_range", 0.02)
    modules = []
    with torch.no_grad():
        for key in fresh:
            if key not in params:
                continue
            p = params[key]
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
            elif key.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
            modules.append(key.rsplit(".", 1)[0])
    return model.eval(), sorted(set(modules))


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Sequence[Example], collate: Collator, batch_size: int = 64, progress: bool = True
) -> dict[str, float]:
    """``accuracy`` and ``eval_loss`` (mean cross-entropy) on ``data``, with a progress bar; the model is put in
    eval mode and restored."""
    if not data:
        return {}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, loss = 0, 0.0
    try:
        for i in tqdm(range(0, len(data), batch_size), desc="eval", leave=False, disable=not progress):
            batch = {k: v.to(device) for k, v in collate(data[i : i + batch_size]).items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits
            correct += int((logits.argmax(-1) == labels).sum())
            loss += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
    finally:
        model.train(was_training)
    return {"accuracy": correct / len(data), "eval_loss": loss / len(data)}
