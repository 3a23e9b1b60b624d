"""The ``causal-lm`` task: next-token training of ``AutoModelForCausalLM`` on a JSONL file.

Each line holds one of three row kinds (a file may mix them):

* ``{"text": ...}``: the loss covers every token (plus an end-of-sequence token);
* ``{"prompt": ..., "completion": ...}``: the text is ``prompt + completion`` (put the separating space at the
  start of the completion), the loss covers the completion and a final end-of-sequence token only;
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: the conversation as the tokenizer's chat template
  renders it; the loss covers the assistant turns only (their content and the template's end-of-turn text).

Where the loss applies is found on the rendered text, not by re-tokenising pieces: the conversation is
rendered up to each assistant turn with and without it (``apply_chat_template(messages[:i],
add_generation_prompt=True)`` and ``messages[:i + 1]``), which gives each turn's character span, and a token
trains when its characters (the fast tokenizer's offsets) overlap a span. This needs no ``{% generation %}``
markers in the template, and byte-level tokens of multi-byte characters map to the character they belong to.

Evaluation: held-out loss and perplexity (the exponential of the mean loss per trained token), and, for rows
with a target (prompt/completion rows, chat rows that end with an assistant turn), the exact-match rate of
greedy completions (compared after stripping white space). Optional packing concatenates the training
examples into blocks of ``max_length`` tokens (documents are separated by the end-of-sequence token and see
each other's tokens, as in the ``group_texts`` packing of Hugging Face's ``run_clm`` example); evaluation
never packs.
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

from peftkit.train.data import Row
from peftkit.train.errors import DataError

NAME = "causal-lm"
PEFT_TASK_TYPE = "CAUSAL_LM"
IGNORE = -100  # label of positions without loss (PyTorch's cross_entropy ignore_index)
# Hyperparameters of a causal-lm run unless set (common LoRA settings for small LMs).
TRAIN_DEFAULTS: dict[str, Any] = {"lr": 2e-4, "warmup_ratio": 0.03, "batch_size": 8}


@dataclass
class Options:
    """Settings of the ``causal-lm`` task (``--set name=value``).

    Attributes:
        max_length: tokens per example; longer ones are cut at the end (counted in the log). Capped at the
            model's context length. With ``packing``, the length of each packed block.
        packing: concatenate the training examples into full blocks of ``max_length`` tokens.
        exact_match: also report the exact-match rate of greedy completions (rows with a target).
        max_new_tokens: most tokens generated per completion when measuring exact match.
        eval_batch_size: examples per forward pass when evaluating.
    """

    max_length: int = 1024
    packing: bool = False
    exact_match: bool = True
    max_new_tokens: int = 64
    eval_batch_size: int = 8


@dataclass
class Example:
    """Token ids, their labels (``-100`` where no loss applies) and, for exact match, the prompt and target."""

    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int] | None = None
    target: str | None = None


@dataclass
class EncodeStats:
    """What encoding a file cut or dropped (reported in the run's log)."""

    truncated: int = 0
    dropped: int = 0


def row_kind(row: Row, path: str | Path) -> str:
    """``"messages"``, ``"prompt"`` or ``"text"``; a row of none of these kinds is a :class:`DataError`."""
    fields = row.fields
    if "messages" in fields:
        return "messages"
    if "prompt" in fields or "completion" in fields:
        missing = [k for k in ("prompt", "completion") if k not in fields]
        if missing:
            raise DataError(
                f"{path}, line {row.line}: a prompt row needs 'completion' too (found: {', '.join(fields)})"
            )
        return "prompt"
    if "text" in fields:
        return "text"
    raise DataError(
        f"{path}, line {row.line}: a causal-lm row needs 'text', 'prompt' and 'completion', or 'messages' "
        f"(found: {', '.join(fields) or 'no columns'})"
    )


def check_rows(rows: Sequence[Row], tokenizer: Any, path: str | Path) -> None:
    """Check every row's kind and fields in file order (so an error names the file's first bad line), before
    any tokenisation."""
    for row in sorted(rows, key=lambda r: r.line):
        kind = row_kind(row, path)
        if kind == "messages":
            _messages(row, path, tokenizer)
        else:
            for key in ("text",) if kind == "text" else ("prompt", "completion"):
                _string(row, key, path)


def _string(row: Row, key: str, path: str | Path) -> str:
    value = row.fields[key]
    if not isinstance(value, str):
        raise DataError(f"{path}, line {row.line}: {key!r} must be a string, found {type(value).__name__}")
    return value


def _messages(row: Row, path: str | Path, tokenizer: Any) -> list[dict[str, str]]:
    messages = row.fields["messages"]
    where = f"{path}, line {row.line}"
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i + 1} must be an object with string 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        roles = ", ".join(m["role"] for m in messages)
        raise DataError(f"{where}: a chat row without an assistant turn (roles: {roles}): nothing to train on")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{where}: 'messages' rows need a chat template, and this model's tokenizer has none")
    return messages


def _render(tokenizer: Any, messages: list[dict[str, str]], prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)


def _chat_spans(tokenizer: Any, messages: list[dict[str, str]], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn."""
    text = _render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = _render(tokenizer, messages[:i], prompt=True), _render(tokenizer, messages[: i + 1])
        if not (upto.startswith(before) and text.startswith(upto)):
            raise DataError(
                f"{where}: the chat template renders earlier turns differently once later turns follow (it "
                "rewrites history), so the assistant turns cannot be located; use prompt/completion rows"
            )
        spans.append((len(before), len(upto)))
    return text, spans


def _tokens(tokenizer: Any, text: str, special: bool) -> tuple[list[int], list[tuple[int, int]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("the causal-lm task needs a fast tokenizer (character offsets); this model's is a slow one")
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def encode_row(row: Row, tokenizer: Any, path: str | Path) -> Example:
    """One row as token ids with labels (see the module docstring), untruncated."""
    kind = row_kind(row, path)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    where = f"{path}, line {row.line}"
    if kind == "messages":
        messages = _messages(row, path, tokenizer)
        text, spans = _chat_spans(tokenizer, messages, where)
        ids, offsets = _tokens(tokenizer, text, special=False)
        labels = [t if any(s < b and e > a for a, b in spans) else IGNORE for t, (s, e) in zip(ids, offsets)]
        prompt_ids = target = None
        if messages[-1]["role"] == "assistant":
            prompt_ids = _tokens(tokenizer, _render(tokenizer, messages[:-1], prompt=True), special=False)[0]
            target = messages[-1]["content"]
        return Example(ids, labels, prompt_ids, target)
    if kind == "text":
        ids = _tokens(tokenizer, _string(row, "text", path), special=True)[0] + eos
        return Example(ids, list(ids))
    prompt, completion = _string(row, "prompt", path), _string(row, "completion", path)
    ids, offsets = _tokens(tokenizer, prompt + completion, special=True)
    labels = [t if e > len(prompt) else IGNORE for t, (s, e) in zip(ids, offsets)]
    prompt_ids = _tokens(tokenizer, prompt, special=True)[0]
    return Example(ids + eos, labels + eos, prompt_ids, completion)


def encode(rows: Sequence[Row], tokenizer: Any, max_length: int, path: str | Path) -> tuple[list[Example], EncodeStats]:
    """Every row encoded and cut to ``max_length`` tokens; examples left with no trained token after the cut
    are dropped. Both are counted in the returned :class:`EncodeStats`."""
    out, stats = [], EncodeStats()
    for row in rows:
        ex = encode_row(row, tokenizer, path)
        if len(ex.input_ids) > max_length:
            stats.truncated += 1
            ex.input_ids, ex.labels = ex.input_ids[:max_length], ex.labels[:max_length]
        # position 0 predicts nothing (labels shift by one), so a trained token must sit at position 1 or later
        if all(label == IGNORE for label in ex.labels[1:]):
            stats.dropped += 1
            continue
        out.append(ex)
    return out, stats


def pack(examples: Sequence[Example], max_length: int) -> list[Example]:
    """The examples concatenated and cut into blocks of ``max_length`` tokens (the last may be shorter);
    blocks without a trained token are left out."""
    ids = [t for e in examples for t in e.input_ids]
    labels = [t for e in examples for t in e.labels]
    blocks = [Example(ids[i : i + max_length], labels[i : i + max_length]) for i in range(0, len(ids), max_length)]
    return [b for b in blocks if any(label != IGNORE for label in b.labels[1:])]


def pad_id(tokenizer: Any) -> int:
    """The id padding uses: the pad token, else end-of-sequence, else 0 (padded positions are masked)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


class Collator:
    """Right-pad a list of :class:`Example` into ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on
    padding)."""

    def __init__(self, tokenizer: Any) -> None:
        self.pad_id = pad_id(tokenizer)

    def __call__(self, examples: Sequence[Example]) -> dict[str, Tensor]:
        width = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e.input_ids)
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def context_length(model_or_config: Any) -> int | None:
    """The most positions a model takes (``max_position_embeddings`` / ``n_positions`` of its config), if it
    says; takes the model or its config."""
    config = getattr(model_or_config, "config", model_or_config)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_model(model_id: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``AutoModelForCausalLM`` from a folder or a Hub id, in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype).eval()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Sequence[Example], tokenizer: Any, options: Options, progress: bool = True
) -> dict[str, float]:
    """``eval_loss`` (mean per trained token), ``perplexity`` and, when ``options.exact_match`` and some
    examples have a target, ``exact_match``; with progress bars. The model is put in eval mode and restored."""
    if not data:
        return {}
    was_training = model.training
    model.eval()
    collate, device, size = Collator(tokenizer), _device(model), options.eval_batch_size
    total, count = 0.0, 0
    try:
        for i in tqdm(range(0, len(data), size), desc="eval loss", leave=False, disable=not progress):
            batch = {k: v.to(device) for k, v in collate(data[i : i + size]).items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits[:, :-1].float()
            targets = labels[:, 1:]
            total += float(F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="sum"))
            count += int((targets != IGNORE).sum())
        loss = total / max(count, 1)
        metrics = {"eval_loss": loss, "perplexity": float(torch.tensor(loss).exp())}
        scored = [e for e in data if e.prompt_ids is not None and e.target is not None]
        if options.exact_match and scored:
            metrics["exact_match"] = exact_match(model, scored, tokenizer, options, progress)
    finally:
        model.train(was_training)
    return metrics


def exact_match(
    model: nn.Module, data: Sequence[Example], tokenizer: Any, options: Options, progress: bool = True
) -> float:
    """Share of ``data`` whose greedy completion of ``prompt_ids`` equals ``target`` (white space stripped).
    Prompts are left-padded into batches; generation stops at the end-of-sequence token(s)."""
    from transformers import GenerationConfig

    device, pad = _device(model), pad_id(tokenizer)
    eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    eos = {*(eos if isinstance(eos, list) else [eos] if eos is not None else []), tokenizer.eos_token_id} - {None}
    config = GenerationConfig(max_new_tokens=options.max_new_tokens, do_sample=False, pad_token_id=pad,
                              eos_token_id=sorted(eos) or None)  # fmt: skip
    hits, size = 0, options.eval_batch_size
    for i in tqdm(range(0, len(data), size), desc="eval exact match", leave=False, disable=not progress):
        chunk = data[i : i + size]
        width = max(len(e.prompt_ids or []) for e in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, e in enumerate(chunk):
            n = len(e.prompt_ids or [])
            ids[j, width - n :], mask[j, width - n :] = torch.tensor(e.prompt_ids or []), 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        for j, e in enumerate(chunk):
            new = []
            for t in out[j, width:].tolist():
                if t in eos:
                    break
                new.append(t)
            hits += tokenizer.decode(new, skip_special_tokens=True).strip() == (e.target or "").strip()
    return hits / len(data)
