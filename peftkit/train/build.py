"""From a :class:`~peftkit.train.settings.RunSpec` to what a run trains and evaluates: the base model and its
tokenizer, the tokenised train / held-out examples, the collator, the evaluation function and the adapter
config. Shared by ``peftkit train``, ``--resume`` and ``peftkit eval``, so all three rebuild the same things
from the same settings."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from peftkit.core.config import AdapterConfig
from peftkit.core.registry import get_method
from peftkit.quantize import DEFAULT_SKIP, check_scheme, quantize
from peftkit.train import causal_lm, classify
from peftkit.train.data import Row, file_sha256, read_rows, split_rows
from peftkit.train.errors import DataError
from peftkit.train.settings import RunSpec, build_spec, canonical, section_fields

TASKS: dict[str, ModuleType] = {classify.NAME: classify, causal_lm.NAME: causal_lm}
# Built-in data (no --data): the packaged Rotten Tomatoes snippets, as many as the demo uses.
BUILTIN_SAMPLES = {"max_train_samples": 3000, "max_eval_samples": 1000}
# Method settings of a run unless given (those of the methods that have them): the demo's LoRA r=8, alpha=16,
# as `peftkit train` has always used.
METHOD_DEFAULTS: dict[str, Any] = {"r": 8, "alpha": 16.0}
# Attention projections adapted when targets are not given: the first group whose names all occur in the model
# (the defaults Hugging Face PEFT uses for BERT / RoBERTa, Llama / Mistral / Qwen / OPT, DistilBERT, GPT-2,
# GPT-NeoX); other models get "all-linear".
DEFAULT_TARGETS = (("query", "value"), ("q_proj", "v_proj"), ("q_lin", "v_lin"), ("c_attn",), ("query_key_value",))


def labelled_tokens(batch: Mapping[str, Any]) -> int:
    """The tokens a causal LM's mean loss averages over in ``batch``: labels other than -100 after the one-token
    shift (Hugging Face's ``ForCausalLMLoss``). Processes holding different numbers of them weight their losses
    by it (:meth:`peftkit.train.distributed.Distributed.reduce_loss`)."""
    return int((batch["labels"][..., 1:] != -100).sum())


def task_module(name: str) -> ModuleType:
    """The module of task ``name``; an unknown name is a ``ValueError`` listing the tasks."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name]


def make_spec(*sources: Mapping[str, Any]) -> RunSpec:
    """A :class:`RunSpec` from flat settings (see :mod:`peftkit.train.settings`), later sources overriding
    earlier ones, on top of the task's training defaults and, for the built-in data, the demo's sample counts."""
    merged: dict[str, Any] = {}
    for source in sources:
        merged.update(source)
    task = task_module(str(merged.get("task", classify.NAME)))
    method = get_method(str(merged.get("method", "lora")))
    task_fields = [f.name for f in dataclasses.fields(task.Options)]
    method_fields = [f.name for f in dataclasses.fields(method.config_class)]
    fields = section_fields(task_fields, method_fields)
    values: dict[str, Any] = {}
    for source in sources:
        values.update(canonical(source, fields))
    spec = build_spec(values, task_fields=task_fields, method_fields=method_fields,
                      train_defaults={"log_every": 10, **task.TRAIN_DEFAULTS})  # fmt: skip
    task.Options(**spec.task_options)  # refuses mistyped task settings now
    if spec.data is None:
        for key, value in BUILTIN_SAMPLES.items():
            if getattr(spec, key) is None:
                setattr(spec, key, value)
    spec.train.setdefault("seed", spec.seed)
    return spec


def resolve_model(model: str | None, task: str) -> str:
    """The model to load: an existing folder as an absolute path, else a Hub id as given (loaded through the
    Hub unless ``HF_HUB_OFFLINE`` is set, which is the user's to set)."""
    if model is None:
        if task != classify.NAME:
            raise ValueError(f"the {task} task needs --model (a model folder or a Hugging Face Hub id)")
        from peftkit.assets import minilm_dir

        return str(minilm_dir())
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"--model {model} is a file; pass the model's folder or a Hub id")
        return str(path.resolve())
    if model.startswith((".", "/", "~")) or os.sep + os.sep in model or model.count("/") > 1:
        raise FileNotFoundError(f"model folder {model} does not exist (and it is not a Hub id such as org/name)")
    return model


def load_error(model_id: str, exc: OSError) -> OSError:
    """A one-line error for a model that failed to load, saying whether the Hub was reachable by setting."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    how = " (HF_HUB_OFFLINE is set: only models already in the Hugging Face cache load)" if offline else ""
    return OSError(f"cannot load model {model_id!r}{how}: {' '.join(str(exc).split())}")


@dataclass
class Built:
    """What a run trains and evaluates (see the module docstring)."""

    spec: RunSpec
    model: nn.Module
    tokenizer: Any
    train: list[Any]
    held_out: list[Any]
    collate: Callable[[list[Any]], Any]
    evaluate: Callable[..., dict[str, float]]
    adapter_config: AdapterConfig
    notes: list[str] = field(default_factory=list)
    data_sha256: str | None = None
    model_digest: str = ""


def _rows(spec: RunSpec, eval_only: bool) -> tuple[list[Row], list[Row], str]:
    """``(train rows, held-out rows, file named in errors)`` of a user's data file (``eval_only``: no train
    rows, and ``data`` is not read when ``eval_data`` holds the held-out rows)."""
    assert spec.data is not None
    if spec.eval_data is not None:
        held = read_rows(spec.eval_data)
        train = [] if eval_only else read_rows(spec.data)
    else:
        train, held = split_rows(read_rows(spec.data), spec.eval_fraction, spec.seed)
    if spec.max_train_samples is not None:
        train = train[: spec.max_train_samples]
    if spec.max_eval_samples is not None:
        held = held[: spec.max_eval_samples]
    return ([] if eval_only else train), held, spec.eval_data if eval_only and spec.eval_data else spec.data


@contextlib.contextmanager
def _loading(model_id: str, progress: bool) -> Iterator[None]:
    """Loading from transformers: its load report quiet (peftkit logs the new head in one line), its progress
    bar only with ``progress``, and a failure as one line saying whether the Hub was reachable by setting."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    if not progress:
        logging.disable_progress_bar()
    try:
        yield
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) and exc.filename is not None:
            raise
        raise load_error(model_id, exc) from None
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def load_tokenizer(spec: RunSpec, progress: bool = True) -> tuple[Any, int | None]:
    """``(tokenizer, context length or None)`` of the run's model, without loading its weights."""
    from transformers import AutoConfig, AutoTokenizer

    model_id = resolve_model(spec.model, spec.task)
    with _loading(model_id, progress):
        return AutoTokenizer.from_pretrained(model_id), causal_lm.context_length(AutoConfig.from_pretrained(model_id))


def load_base(spec: RunSpec, progress: bool = True, tokenizer: Any = None) -> tuple[nn.Module, Any, list[str]]:
    """``(model, tokenizer, new modules)``: the base model of ``spec`` (for classify, with the head for
    ``spec.task_options["labels"]`` drawn from the run's seed; its modules are the third item).

    Raises:
        OSError: the model cannot be loaded (one line, saying whether the Hub was reachable by setting).
    """
    model_id = resolve_model(spec.model, spec.task)
    dtype = getattr(torch, spec.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {spec.dtype!r} is not a torch dtype (float32, bfloat16, float16)")
    if tokenizer is None:
        tokenizer, _ = load_tokenizer(spec, progress)
    if spec.quantize is not None:
        check_scheme(spec.quantize)  # before any weights are loaded
    with _loading(model_id, progress):
        if spec.task == classify.NAME:
            model, modules = classify.load_model(model_id, list(spec.task_options["labels"]), spec.seed, dtype)
        else:
            model, modules = causal_lm.load_model(model_id, dtype), []
    if spec.quantize is not None:
        quantize(model, spec.quantize, skip=(*DEFAULT_SKIP, *(m.rsplit(".", 1)[-1] for m in modules)))
    return model, tokenizer, modules


def build(spec: RunSpec, *, eval_only: bool = False, progress: bool = True) -> Built:
    """Load the base model and the data of ``spec`` and tokenise them (``eval_only``: the held-out side only).

    Raises:
        DataError: the data cannot be used (the message names the file and line).
        OSError: the model cannot be loaded.
        ValueError: settings that do not fit together.
    """
    task = task_module(spec.task)
    options = task.Options(**spec.task_options)
    if spec.model is not None:
        spec.model = resolve_model(spec.model, spec.task)
    if spec.data is not None:
        spec.data = str(Path(spec.data).expanduser().resolve())
    if spec.eval_data is not None:
        spec.eval_data = str(Path(spec.eval_data).expanduser().resolve())
    notes: list[str] = []
    # The data first: a bad file fails before any weights are loaded.
    if task is classify:
        train_rows, held_rows, source = _classify_rows(spec, eval_only)
        if spec.data is None and options.labels is None:
            options.labels = ["rotten", "fresh"]  # the demo's classes: rotten = 0, fresh = 1
        options.labels = classify.label_set(train_rows + held_rows, options, source)
        spec.task_options = dataclasses.asdict(options)
    else:
        train_rows, held_rows, source = _rows(spec, eval_only)
    tokenizer, limit = load_tokenizer(spec, progress)
    if task is causal_lm:
        causal_lm.check_rows(train_rows + held_rows, tokenizer, source)
    max_length = options.max_length
    if limit is not None and max_length > limit:
        notes.append(f"max_length {max_length} is above the model's context ({limit} tokens): using {limit}")
        max_length = limit
    if task is classify:
        train, cut_train = classify.encode(train_rows, tokenizer, options.labels, options, max_length)
        held, cut_held = classify.encode(held_rows, tokenizer, options.labels, options, max_length)
        dropped = 0
        collate: Callable[[list[Any]], Any] = classify.Collator(tokenizer)

        def evaluate(m: nn.Module, data: list[Any] | None = None, show: bool = progress) -> dict[str, float]:
            return classify.evaluate(m, held if data is None else data, collate, options.eval_batch_size, show)
    else:
        train, stats_train = causal_lm.encode(train_rows, tokenizer, max_length, source)
        held, stats_held = causal_lm.encode(held_rows, tokenizer, max_length, source)
        cut_train, cut_held, dropped = (
            stats_train.truncated,
            stats_held.truncated,
            stats_train.dropped + stats_held.dropped,
        )
        if options.packing:
            train = causal_lm.pack(train, max_length)
            notes.append(f"packing: {len(train)} training blocks of up to {max_length} tokens")
        collate = causal_lm.Collator(tokenizer)

        def evaluate(m: nn.Module, data: list[Any] | None = None, show: bool = progress) -> dict[str, float]:
            return causal_lm.evaluate(m, held if data is None else data, tokenizer, options, show)

    for count, side in ((cut_train, "training"), (cut_held, "held-out")):
        if count:
            notes.append(f"{count} {side} examples were longer than {max_length} tokens and were truncated")
    if dropped:
        notes.append(f"{dropped} examples had no trained token left after truncation and were left out")
    if not eval_only and not train:
        raise DataError(f"{source}: no training examples left (after the held-out split and truncation)")
    spec.task_options = dataclasses.asdict(options)
    model, tokenizer, extra_saved = load_base(spec, progress, tokenizer)
    if extra_saved:
        notes.append(f"new head {', '.join(extra_saved)} for labels {options.labels}, drawn from seed {spec.seed}")
    config = adapter_config(spec, model, extra_saved)
    sha = file_sha256(spec.data) if spec.data is not None else None
    return Built(spec, model, tokenizer, train, held, collate, evaluate, config, notes, sha, model_digest(model))


def _classify_rows(spec: RunSpec, eval_only: bool) -> tuple[list[Row], list[Row], str]:
    if spec.data is not None:
        return _rows(spec, eval_only)
    from peftkit.assets import rotten_tomatoes

    split = rotten_tomatoes(seed=spec.seed, max_train=spec.max_train_samples, max_held_out=spec.max_eval_samples)
    names = {0: "rotten", 1: "fresh"}

    def rows(examples: list[tuple[str, int]]) -> list[Row]:
        return [Row({"text": t, "label": names[y]}, i + 1) for i, (t, y) in enumerate(examples)]

    return ([] if eval_only else rows(split.train)), rows(split.held_out), "Rotten Tomatoes (built in)"


def adapter_config(spec: RunSpec, model: nn.Module, extra_saved: list[str]) -> AdapterConfig:
    """The method's config from ``spec.method_options``, with the defaults a run adds: the attention
    projections as targets (:data:`DEFAULT_TARGETS`), :data:`METHOD_DEFAULTS`, the new head in
    ``modules_to_save`` and the run's seed.
    ``spec.method_options`` is replaced by the complete config (what the run records)."""
    config_class = get_method(spec.method).config_class
    options = dict(spec.method_options)
    names = {f.name for f in dataclasses.fields(config_class)}
    if "targets" not in options:
        options["targets"] = default_targets(model)
    for key, value in METHOD_DEFAULTS.items():
        if key in names and key not in options:
            options[key] = value
    if extra_saved and "modules_to_save" in names:
        options["modules_to_save"] = sorted(set(options.get("modules_to_save") or []) | set(extra_saved))
    if "seed" in names and options.get("seed") is None:
        options["seed"] = spec.seed
    config = config_class(**options)
    spec.method_options = config.to_dict()
    return config


def model_digest(model: nn.Module, values: int = 64) -> str:
    """SHA-256 over every parameter's name, shape, dtype and first ``values`` values: cheap (a few values per
    tensor) and enough to tell another checkpoint of the same architecture (a retrained or updated model) from
    the one a run was trained on, which the adapter's fingerprint (names and shapes only) cannot."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            head = p.detach().reshape(-1)[:values].to("cpu", torch.float32)
            digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}:".encode())
            digest.update(head.numpy().tobytes())
    return digest.hexdigest()


def default_targets(model: nn.Module) -> list[str] | str:
    """The first group of :data:`DEFAULT_TARGETS` whose names all end some module path, else ``"all-linear"``."""
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for group in DEFAULT_TARGETS:
        if all(name in leaves for name in group):
            return list(group)
    return "all-linear"
