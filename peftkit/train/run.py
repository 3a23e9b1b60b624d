"""Run folders: ``peftkit train`` / ``--resume`` / ``eval`` as Python functions.

A run folder is self-contained::

    RUN/run.json                 the settings (base model path or Hub id, task, data file and its SHA-256, the
                                 held-out split, seeds, method config, train settings), then the final metrics
    RUN/metrics.jsonl            one JSON object per logged step: step, epoch, loss, lr, grad_norm and the
                                 evaluation metrics when computed
    RUN/checkpoints/step-N/      full checkpoints (adapter/, optimizer and RNG states, data position) plus a
                                 copy of run.json: ``peftkit eval`` and ``--resume`` take one directly
    RUN/adapter/                 the final adapter (adapter.json + adapter.safetensors)

From Python, with the command line's options as keyword arguments::

    from peftkit.train.run import train, resume, evaluate
    result = train("runs/rt", model="path/or/hub-id", data="train.jsonl", task="causal-lm", method="lora",
                   r=8, alpha=16, targets="q_proj,v_proj", max_steps=60, overrides={"task.max_length": 256})
    result.model, result.tokenizer, result.metrics      # the adapted model, ready to evaluate or generate
    resume("runs/rt")                                    # after an interruption: continues exactly
    evaluate("runs/rt/checkpoints/step-40")              # the held-out metrics of that checkpoint
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftkit.core import io
from peftkit.core.model import AdaptedModel, adapt, load
from peftkit.core.version import __version__
from peftkit.train import checkpoint as ckpt
from peftkit.train import distributed as parallel
from peftkit.train.build import Built, build, labelled_tokens, load_base, make_spec
from peftkit.train.errors import CheckpointError
from peftkit.train.settings import RunSpec, parse_assignments, read_config_file
from peftkit.train.trainer import Trainer, TrainResult

RUN_FILE = "run.json"
RUN_FORMAT = "peftkit-run"
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
LEGACY_FILE = "task.json"  # run folders of peftkit before run.json (SentenceClassifier head)

# Named options of ``train`` and the setting each one sets.
NAMED = {
    "model": "model", "data": "data", "task": "task", "method": "method", "seed": "seed",
    "max_train_samples": "max_train_samples", "max_eval_samples": "max_eval_samples",
    "r": "method.r", "alpha": "method.alpha", "targets": "method.targets", "max_length": "task.max_length",
    "lr": "train.lr", "epochs": "train.epochs", "batch_size": "train.batch_size",
    "weight_decay": "train.weight_decay", "warmup_ratio": "train.warmup_ratio", "max_steps": "train.max_steps",
    "eval_every": "train.eval_every", "save_every": "train.save_every", "log_every": "train.log_every",
    "optim": "train.optim", "quantize": "quantize", "nproc": "nproc", "fsdp": "fsdp",
}  # fmt: skip


@dataclass
class RunResult:
    """What :func:`train` / :func:`resume` return: the run folder, the trained model (an :class:`AdaptedModel`)
    and its tokenizer, the final held-out metrics, the trainer's result, the settings, the number of held-out
    examples and the notes logged about the data (truncation ...)."""

    output_dir: Path
    model: AdaptedModel
    tokenizer: Any
    metrics: dict[str, float]
    train_result: TrainResult
    spec: RunSpec
    num_eval: int = 0
    notes: list[str] = field(default_factory=list)


def settings_from(
    *, config: str | Path | None = None, overrides: Mapping[str, Any] | Sequence[str] | None = None, **named: Any
) -> RunSpec:
    """The :class:`RunSpec` of ``train``'s arguments: config file, then named options, then ``overrides``."""
    unknown = sorted(set(named) - set(NAMED))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; options: {sorted(NAMED)}")
    from_file = read_config_file(config) if config is not None else {}
    from_options = {NAMED[k]: v for k, v in named.items() if v is not None}
    from_set = (
        (parse_assignments(overrides) if not isinstance(overrides, Mapping) else dict(overrides)) if overrides else {}
    )
    return make_spec(from_file, from_options, from_set)


def train(
    output_dir: str | Path,
    *,
    config: str | Path | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> RunResult:
    """Train a new run into ``output_dir`` (``peftkit train``). ``options`` are the command line's named options
    (``model``, ``data``, ``task``, ``method``, ``r``, ``alpha``, ``targets``, ``lr``, ``epochs``, ``batch_size``,
    ``max_length``, ``max_steps``, ``eval_every``, ``save_every``, ``log_every``, ``seed``, ``optim`` ...),
    ``config`` is ``--config`` and ``overrides`` is ``--set`` (``{"key": value}`` or ``["key=value"]``).

    Raises:
        CheckpointError: ``output_dir`` holds a run already (resume it, or choose another folder).
        DataError, ValueError, OSError: bad data, settings or model (one-line messages).
        TrainingInterrupted: SIGINT / SIGTERM; the checkpoint it names resumes with :func:`resume`.
    """
    spec = settings_from(config=config, overrides=overrides, **options)
    _check_processes(spec)
    out = Path(output_dir)
    if (out / RUN_FILE).is_file() or ckpt.list_checkpoints(out / CHECKPOINTS_DIR):
        raise CheckpointError(
            f"{out} holds a run already: continue it with --resume {out}, or pick another --output-dir"
        )
    log, progress = _rank_output(log or _print, progress)
    built = build(spec, progress=progress)
    model = adapt(built.model, built.adapter_config)
    return _fit(out, built, model, None, progress, log)


def resume(path: str | Path, *, model: str | None = None, progress: bool = True,
           log: Callable[[str], None] | None = None) -> RunResult:  # fmt: skip
    """Continue a run from its newest checkpoint (``path`` = the run folder) or from a given checkpoint
    (``path`` = ``RUN/checkpoints/step-N``; newer checkpoints of the abandoned continuation are removed).
    ``model`` may only repeat the run's base model.

    Raises:
        CheckpointError: no checkpoint, another base model, or data that changed since the run started.
    """
    path = Path(path)
    log, progress = _rank_output(log or _print, progress)
    if ckpt.is_checkpoint(path):
        folder, run_dir = path, path.parent.parent
    else:
        run_dir = path
        found = ckpt.list_checkpoints(path / CHECKPOINTS_DIR)
        if not found:
            _read_spec(path)  # a folder that is not a run says so first
            raise CheckpointError(f"{path} has no checkpoint to resume from ({path / CHECKPOINTS_DIR} holds none)")
        folder = found[-1][1]
    spec = _read_spec(folder)
    _check_processes(spec)
    if model is not None and spec.model not in (model, str(Path(model).expanduser().resolve())):
        raise CheckpointError(
            f"{run_dir} was trained on {spec.model or 'the packaged all-MiniLM-L6-v2'}, not {model}: resuming on "
            "another base model would not "
            "continue the run (drop --model)"
        )
    built = build(spec, progress=progress)
    record = _load_record(folder)
    if record.get("data_sha256") is not None and built.data_sha256 != record["data_sha256"]:
        raise CheckpointError(
            f"{spec.data} changed since the run started (its SHA-256 differs): cannot continue exactly"
        )
    _check_digest(record, built, run_dir, "resuming would not continue the run")
    step = int(ckpt.read_state(folder)[0]["step"])
    for later, stale in ckpt.list_checkpoints(run_dir / CHECKPOINTS_DIR) if parallel.env_rank() == 0 else []:
        if later > step:
            shutil.rmtree(stale)
            log(f"removed {stale}: resuming from step {step} replaces what followed it")
    adapted = adapt(built.model, built.adapter_config)
    log(f"resuming {run_dir} from {folder.name}")
    return _fit(run_dir, built, adapted, folder, progress, log)


def _check_processes(spec: RunSpec) -> None:
    """Under torchrun the run has its world size; outside it, one process (``peftkit train --nproc`` starts
    torchrun)."""
    if parallel.under_torchrun():
        spec.nproc = parallel.env_world_size()
    elif spec.nproc != 1:
        raise parallel.DistributedError(
            f"nproc={spec.nproc}: this process was not started by torchrun; run 'peftkit train --nproc "
            f"{spec.nproc} ...' (which starts it) or 'torchrun --nproc-per-node {spec.nproc} -m peftkit.cli train ...'"
        )
    if spec.fsdp and spec.nproc < 2:
        parallel.check_launch(spec.nproc, True, spec.device)  # the error naming the fix


def _rank_output(log: Callable[[str], None], progress: bool) -> tuple[Callable[[str], None], bool]:
    """Rank 0 logs and shows progress; the other processes of a torchrun group stay quiet."""
    if parallel.env_rank() == 0:
        return log, progress
    return (lambda message: None), False


def _fit(out: Path, built: Built, model: AdaptedModel, resume_from: Path | None, progress: bool,
         log: Callable[[str], None]) -> RunResult:  # fmt: skip
    with parallel.session(built.spec.fsdp, built.spec.device) as group:
        return _fit_in(out, built, model, resume_from, progress, log, group)


def _fit_in(out: Path, built: Built, model: AdaptedModel, resume_from: Path | None, progress: bool,
            log: Callable[[str], None], group: parallel.Distributed) -> RunResult:  # fmt: skip
    spec = built.spec
    device = spec.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if group.active:
        device = str(group.device)
    model.to(device)
    for note in built.notes:
        log(note)
    log(f"{spec.method}: {model.trainable_parameters()}; "
        f"{len(built.train)} training / {len(built.held_out)} held-out examples")  # fmt: skip
    config = spec.train_config(
        output_dir=out / CHECKPOINTS_DIR, metrics_file=out / METRICS_FILE, device=device, progress=progress
    )
    record = _record(built)
    trainer = Trainer(
        model, config, built.train, collate_fn=built.collate,
        eval_fn=(lambda m: built.evaluate(m)) if built.held_out else None, log=log, distributed=group,
        loss_weight=labelled_tokens if spec.task == "causal-lm" else None,
    )  # fmt: skip
    optimizer = type(trainer.optimizer)
    record["optimizer"] = f"{optimizer.__module__}.{optimizer.__qualname__}"  # what train.optim resolved to
    if group.is_main:
        _write_run(out, record)
    trainer.checkpoint_files[RUN_FILE] = _run_bytes(record)
    result = trainer.fit(resume_from=resume_from)
    parallel.save_adapter(trainer.train_model, out / ADAPTER_DIR, group, lambda m, folder: m.save(folder))
    metrics = {k: v for k, v in result.metrics.items() if k not in ("epoch", "seconds", "train_loss")}
    if not result.epochs and resume_from is not None:  # resumed at the very end: nothing left to train
        metrics = dict(_load_record(resume_from).get("metrics") or {})
    final = {**record, "status": "complete", "step": trainer.global_step, "metrics": metrics}
    if group.is_main:
        _write_run(out, final)
        if result.checkpoints:  # the last checkpoint is the final state: let it carry the final metrics too
            io.write_files(result.checkpoints[-1], [(RUN_FILE, _run_bytes(final))])
    group.barrier()  # the run folder is complete before any process returns
    return RunResult(out, model, built.tokenizer, metrics, result, spec, len(built.held_out), built.notes)


def _record(built: Built) -> dict[str, Any]:
    spec = built.spec
    return {
        "format": RUN_FORMAT,
        "format_version": 1,
        "peftkit_version": __version__,
        "status": "running",
        **spec.to_dict(),
        "data_sha256": built.data_sha256,
        "model_digest": built.model_digest,
        "num_train": len(built.train),
        "num_eval": len(built.held_out),
    }


def _check_digest(record: dict[str, Any], built: Built, run_dir: Path, consequence: str) -> None:
    """Refuse a base model whose weights differ from those the run was trained on (same path or id, other
    weights: a retrained folder, an updated Hub repo), which the adapter's shape fingerprint cannot see."""
    if record.get("model_digest") and record["model_digest"] != built.model_digest:
        raise CheckpointError(
            f"the base model {built.spec.model or 'all-MiniLM-L6-v2 (packaged)'} is not the one {run_dir} was "
            f"trained on (its weights differ): {consequence}"
        )


def _run_bytes(record: dict[str, Any]) -> bytes:
    return json.dumps(record, indent=2).encode()


def _write_run(out: Path, record: dict[str, Any]) -> None:
    io.write_files(out, [(RUN_FILE, _run_bytes(record))])


def _load_record(folder: Path) -> dict[str, Any]:
    """run.json of a run or checkpoint folder."""
    file = folder / RUN_FILE
    if not file.is_file():
        if (folder / LEGACY_FILE).is_file():
            raise CheckpointError(
                f"{folder} was trained by an earlier peftkit (its own SentenceClassifier head, task.json), which "
                "this version no longer rebuilds: train it again with 'peftkit train'"
            )
        raise CheckpointError(
            f"{folder} is neither a run folder nor a checkpoint (no {RUN_FILE}; 'peftkit train' writes one)"
        )
    try:
        record = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file} is not valid JSON ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
        raise CheckpointError(f"{file} does not hold the settings of a peftkit run")
    return record


def _read_spec(folder: Path) -> RunSpec:
    """The settings of the run or checkpoint in ``folder``."""
    record = _load_record(folder)
    names = set(RunSpec.__dataclass_fields__)
    return RunSpec.from_dict({k: v for k, v in record.items() if k in names})


def recorded_processes(path: str | Path) -> tuple[int, bool]:
    """``(nproc, fsdp)`` a run (or one of its checkpoints) was trained with: ``--resume`` starts as many
    processes. A folder that is not a run gives ``(1, False)`` (resuming it reports the problem)."""
    path = Path(path)
    try:
        record = _load_record(path if (path / RUN_FILE).is_file() else path.parent.parent)
    except CheckpointError:
        return 1, False
    return int(record.get("nproc") or 1), bool(record.get("fsdp"))


def locate(path: str | Path) -> tuple[Path, Path]:
    """``(folder holding run.json, adapter folder)`` of a run folder, a checkpoint folder or an adapter folder
    inside either. A run without its final adapter yet (interrupted) gives its newest checkpoint's."""
    path = Path(path)
    if (path / io.CONFIG_FILE).is_file() or (path / io.INDEX_FILE).is_file():
        return path.parent, path
    record_dir = path
    _load_record(record_dir)
    adapter = path / ADAPTER_DIR
    if not adapter.is_dir() and not ckpt.is_checkpoint(path):
        found = ckpt.list_checkpoints(path / CHECKPOINTS_DIR)
        if not found:
            raise CheckpointError(f"{path} has neither a final adapter nor a checkpoint (was it interrupted at once?)")
        record_dir = adapter = found[-1][1]
        adapter = adapter / ADAPTER_DIR
    return record_dir, adapter


def load_trained(path: str | Path, model: str | None = None) -> tuple[AdaptedModel, Any, RunSpec]:
    """``(adapted model, tokenizer, settings)`` of a run, checkpoint or adapter folder (see :func:`locate`),
    on the run's base model or on ``model``."""
    record_dir, adapter = locate(path)
    spec = _read_spec(record_dir)
    if model is not None:
        spec.model = model
    base, tokenizer, _ = load_base(spec)
    return load(base, adapter), tokenizer, spec


def evaluate(
    path: str | Path,
    *,
    model: str | None = None,
    data: str | Path | None = None,
    max_eval_samples: int | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> tuple[dict[str, float], int]:
    """``(metrics, number of examples)`` of a run, checkpoint or adapter folder on the run's held-out data
    (the same split, seeds and settings as in training, so the numbers match the run's), or on all of ``data``.

    Raises:
        CheckpointError: the run's data file changed since training (pass ``data`` to evaluate on it anyway).
    """
    record_dir, adapter = locate(path)
    record = _load_record(record_dir)
    spec = _read_spec(record_dir)
    if model is not None:
        spec.model = model
    if data is not None:
        spec.eval_data = str(data)
        spec.max_eval_samples = None
    if max_eval_samples is not None:
        spec.max_eval_samples = max_eval_samples
    if batch_size is not None:
        spec.task_options["eval_batch_size"] = batch_size
    built = build(spec, eval_only=True, progress=progress)
    if data is None and record.get("data_sha256") and spec.eval_data is None:
        if built.data_sha256 != record["data_sha256"]:
            raise CheckpointError(
                f"{spec.data} changed since the run was trained (its SHA-256 differs), so its held-out split would "
                "differ: pass --data to evaluate on the whole of a file"
            )
    if model is None:
        _check_digest(record, built, record_dir, "its numbers would differ (pass --model to evaluate on it anyway)")
    adapted = load(built.model, adapter)
    adapted.to(spec.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return built.evaluate(adapted), len(built.held_out)


def _print(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
