"""The settings of a ``peftkit train`` run (:class:`RunSpec`) and how ``--config FILE`` / ``--set key=value``
reach them.

A setting is named ``key`` or ``section.key``, the sections being ``train`` (the fields of
:class:`~peftkit.train.TrainConfig`), ``task`` (the task's ``Options``), ``method`` (the fields of the method's
config class); the run's own fields (:data:`RUN_FIELDS`: ``model``, ``data``, ``task``, ``method``, ``seed`` ...)
have no section. A bare ``key`` goes to the run field of that name, else to the one section that has it; a key
that several sections have must name its section (``method.seed``). A config file is a JSON or YAML mapping of
such keys, or of sections holding mappings (``{"train": {"lr": 1e-4}, "method": {"r": 16}}``).

Precedence, lowest first: the defaults, the task's training defaults, the config file, the named command-line
options (``--lr`` ...), ``--set`` (``lr`` and ``train.lr`` name the same setting in any of them).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.train.config import TrainConfig, train_fields

SECTIONS = ("train", "task", "method")


@dataclass
class RunSpec:
    """Everything a run folder records, so ``peftkit eval`` / ``--resume`` rebuild the run without flags.

    Attributes:
        task: ``"classify"`` or ``"causal-lm"``.
        model: a model folder or a Hugging Face Hub id (``None``: the packaged all-MiniLM-L6-v2; classify only).
        data: the data file (``None``: the packaged Rotten Tomatoes snippets, split by movie; classify only).
        eval_data: a held-out data file; ``None`` holds out ``eval_fraction`` of ``data``.
        method: the adapter method (``peftkit methods``).
        seed: seeds the split, the data order, the new head and the adapter's initialisation (unless
            ``train.seed`` / ``method.seed`` are set).
        eval_fraction: the share of ``data`` held out for evaluation (without ``eval_data``).
        max_train_samples: use at most this many training examples (built-in data: 3000).
        max_eval_samples: evaluate at most this many held-out examples (built-in data: 1000).
        dtype: the dtype the base model is loaded in.
        quantize: store the base's linear layers quantised (``nf4``, ``fp4``, ``int8``, ``hqq4``; QLoRA-style,
            :mod:`peftkit.quantize`), the output head excepted; ``None``: as loaded.
        device: ``"cpu"``, ``"cuda"`` ... (``None``: CUDA when available).
        nproc: processes training together (``torchrun``; :mod:`peftkit.train.distributed`); ``train.batch_size``
            is per process, so the global batch is ``nproc`` times it. Set from ``WORLD_SIZE`` under torchrun.
        fsdp: shard the model over the processes with FSDP2 (else DDP: each process holds the whole model).
        method_options: fields of the method's config (``r``, ``alpha``, ``targets`` ...).
        train: fields of :class:`~peftkit.train.TrainConfig`.
        task_options: fields of the task's ``Options``.
    """

    task: str = "classify"
    model: str | None = None
    data: str | None = None
    eval_data: str | None = None
    method: str = "lora"
    seed: int = 0
    eval_fraction: float = 0.1
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    dtype: str = "float32"
    quantize: str | None = None
    device: str | None = None
    nproc: int = 1
    fsdp: bool = False
    method_options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSpec:
        """The inverse of :meth:`to_dict` (unknown keys refused)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown run settings {unknown}; known: {sorted(names)}")
        return cls(**data)

    def train_config(self, **runtime: Any) -> TrainConfig:
        """The :class:`TrainConfig` of this run, with the run-time fields (paths, device, display) given."""
        values = dict(self.train)
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return TrainConfig(**values, **runtime)


RUN_FIELDS = tuple(
    f.name for f in dataclasses.fields(RunSpec) if f.name not in ("method_options", "train", "task_options")
)


def parse_value(text: str) -> Any:
    """A ``--set`` value: JSON when it parses (numbers, ``true``, ``null``, lists, objects), else the text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_assignments(items: Iterable[str]) -> dict[str, Any]:
    """``["key=value", ...]`` (``--set``) as a mapping; a malformed item is a ``ValueError`` naming it."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected key=value (for example lr=1e-4 or method.r=16)")
        out[key.strip()] = parse_value(value.strip())
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The flat ``{key: value}`` of a JSON or YAML config file (sections flattened to ``section.key``)."""
    path = Path(path)
    if path.suffix.lower() not in (".json", ".yaml", ".yml"):
        raise ValueError(f"{path}: a config file is .json, .yaml or .yml")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(
                f"{path}: reading YAML needs PyYAML (pip install pyyaml), or write the file as JSON"
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of settings, found {type(data).__name__}")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[str(key)] = value
    return flat


def canonical(values: Mapping[str, Any], fields: Mapping[str, set[str]]) -> dict[str, Any]:
    """``values`` with every key in its full form (``section.key``, or the run field's name), so that sources
    merged later override earlier ones whatever form each used (``lr`` and ``train.lr`` are one setting)."""
    out = {}
    for key, value in values.items():
        section, name = where(key, fields)
        out[f"{section}.{name}" if section else name] = value
    return out


def build_spec(
    values: Mapping[str, Any],
    *,
    task_fields: Iterable[str],
    method_fields: Iterable[str],
    train_defaults: Mapping[str, Any] | None = None,
) -> RunSpec:
    """A :class:`RunSpec` from ``{key: value}`` (keys as in the module docstring), on top of the defaults.

    Raises:
        ValueError: an unknown key (with the closest known ones), an ambiguous one, or a run-time field.
    """
    fields = section_fields(task_fields, method_fields)
    spec = RunSpec(train=dict(train_defaults or {}))
    sections = {"train": spec.train, "task": spec.task_options, "method": spec.method_options}
    for key, value in values.items():
        section, name = where(key, fields)
        if section is None:
            setattr(spec, name, value)
        else:
            if section == "method" and name == "targets" and isinstance(value, str) and "," in value:
                value = [t.strip() for t in value.split(",") if t.strip()]
            sections[section][name] = value
    return spec


def section_fields(task_fields: Iterable[str], method_fields: Iterable[str]) -> dict[str, set[str]]:
    """The names each section takes: TrainConfig's (stored ones), the task's options, the method config's."""
    return {"train": set(train_fields()), "task": set(task_fields), "method": set(method_fields)}


def where(key: str, fields: Mapping[str, set[str]]) -> tuple[str | None, str]:
    """``(section or None for a run field, field name)`` of a setting key."""
    head, dot, tail = key.partition(".")
    if dot and head in fields:
        if tail not in fields[head]:
            raise ValueError(f"unknown setting {key!r}{_suggest(tail, fields[head], head)}")
        return head, tail
    if key in RUN_FIELDS:
        return None, key
    if key in ("output_dir", "metrics_file", "progress"):
        raise ValueError(f"{key!r} is set by the run itself (--output-dir, --progress), not by --set")
    hits = [s for s in SECTIONS if key in fields[s]]
    if len(hits) > 1:
        raise ValueError(f"setting {key!r} is ambiguous: write {' or '.join(f'{s}.{key}' for s in hits)}")
    if not hits:
        known = set(RUN_FIELDS).union(*fields.values())
        raise ValueError(f"unknown setting {key!r}{_suggest(key, known, None)}")
    return hits[0], key


def _suggest(key: str, known: Iterable[str], section: str | None) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=3)
    prefix = f"{section}." if section else ""
    return (
        f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else f"; known: {', '.join(sorted(known))}"
    )
