"""A mean-pooling sentence classifier on a Hugging Face encoder (the benchmarks' demo task).

``peftkit train`` and ``make demo`` use the ``classify`` task on the Hugging Face classes instead
(:mod:`peftkit.train.classify`: ``AutoModelForSequenceClassification``, so exports load with plain PEFT and
merged models with ``Auto*`` classes); this module stays for the benchmarks, whose numbers it defines.

A :class:`SentenceClassifier` is a Hugging Face encoder, attention-mask-weighted mean pooling over tokens
and a linear ``head``. The head is built from a fixed seed, so a fresh base rebuilt later has the identical
head: an adapter that trains it through ``modules_to_save=["head"]`` (a dense delta from that head)
reloads onto the fresh base with identical predictions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Example = tuple[str, int]
CLASSIFIER_FILE = "classifier.json"
HEAD_FILE = "head.safetensors"


def mean_pool(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Mean of ``hidden [B, T, H]`` over the tokens where ``attention_mask [B, T]`` is 1."""
    if attention_mask is None:
        return hidden.mean(1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class SentenceClassifier(nn.Module):
    """Encoder + mean pooling + linear head; returns ``{"logits", "loss"}`` (loss when labels are given).

    Args:
        encoder: a Hugging Face encoder (``BertModel`` ...) returning ``last_hidden_state``.
        num_labels: number of classes.
        head_seed: seed of the head's initialisation (``nn.Linear`` default init drawn from it).
    """

    def __init__(self, encoder: nn.Module, num_labels: int = 2, head_seed: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        self.num_labels = num_labels
        self.head_seed = head_seed
        hidden = encoder.config.hidden_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(head_seed)
            self.head = nn.Linear(hidden, num_labels)

    @property
    def config(self) -> Any:
        """The encoder's Hugging Face config."""
        return self.encoder.config

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Classify a tokenised batch; with ``labels`` also return the mean cross-entropy as ``loss``."""
        kwargs: dict[str, Tensor] = {"attention_mask": attention_mask} if attention_mask is not None else {}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.encoder(input_ids=input_ids, **kwargs).last_hidden_state
        logits = self.head(mean_pool(hidden, attention_mask))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out

    def save_pretrained(self, path: str | Path, tokenizer: Any = None) -> Path:
        """Save the encoder (``save_pretrained``, safetensors), the head and, if given, the tokenizer.

        Raises:
            NotADirectoryError: ``path`` is a file (``transformers`` would only log an error and save nothing).
        """
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"{path} is a file, not a folder: the model cannot be saved there")
        path.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        save_file({k: v.detach().contiguous() for k, v in self.head.state_dict().items()}, str(path / HEAD_FILE))
        meta = {"num_labels": self.num_labels, "head_seed": self.head_seed, "pooling": "mean"}
        (path / CLASSIFIER_FILE).write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, num_labels: int = 2, head_seed: int = 0) -> SentenceClassifier:
        """Load an encoder folder; if it holds a saved head (``head.safetensors``) load that too."""
        from transformers import AutoModel

        path = Path(path)
        meta = json.loads((path / CLASSIFIER_FILE).read_text()) if (path / CLASSIFIER_FILE).is_file() else {}
        encoder = AutoModel.from_pretrained(str(path), local_files_only=True)
        model = cls(encoder, meta.get("num_labels", num_labels), meta.get("head_seed", head_seed))
        if (path / HEAD_FILE).is_file():
            from safetensors.torch import load_file

            model.head.load_state_dict(load_file(str(path / HEAD_FILE)))
        return model.eval()


class TextCollator:
    """Turn a list of ``(text, label)`` into a padded batch dict (``input_ids``, ``attention_mask``, ``labels``).

    Args:
        tokenizer: a Hugging Face tokenizer.
        max_length: truncate to this many tokens (padding is per batch, to its longest text).
    """

    def __init__(self, tokenizer: Any, max_length: int = 64) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, examples: Sequence[Example]) -> dict[str, Tensor]:
        texts = [t for t, _ in examples]
        batch = dict(
            self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        )
        batch.pop("token_type_ids", None)  # all zeros for single sentences
        batch["labels"] = torch.tensor([label for _, label in examples], dtype=torch.long)
        return batch


@torch.no_grad()
def predict(model: nn.Module, data: Sequence[Example], collate: TextCollator, batch_size: int = 64) -> Tensor:
    """Predicted class of every example (the model in eval mode, restored afterwards)."""
    was_training = model.training
    model.eval()
    preds = []
    for i in range(0, len(data), batch_size):
        batch = collate(data[i : i + batch_size])
        batch.pop("labels")
        preds.append(model(**batch)["logits"].argmax(-1))
    model.train(was_training)
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, data: Sequence[Example], collate: TextCollator, batch_size: int = 64) -> float:
    """Share of ``data`` the model classifies correctly."""
    if not data:
        return float("nan")
    preds = predict(model, data, collate, batch_size)
    labels = torch.tensor([label for _, label in data])
    return (preds == labels).float().mean().item()
