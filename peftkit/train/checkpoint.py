"""Full-state training checkpoints, without pickle: what :meth:`Trainer.fit` needs to continue exactly.

A checkpoint is a folder ``step-<n>``::

    adapter/               the adapters (``AdaptedModel.save``: adapter.json + adapter.safetensors)
    params.safetensors     instead of adapter/ for a model that is not an AdaptedModel: its trainable parameters
    trainer.safetensors    tensors: optimizer moments and steps, torch / CUDA RNG states, the data generator's
                           state and this epoch's data order
    trainer.json           everything else: step, epoch, position in the epoch, the schedule's length, the
                           optimizer's param groups, Python / NumPy RNG states, the divergence rule's progress,
                           the train settings; written last

It is written into a hidden temporary folder and renamed into place (``os.rename`` of a folder is atomic on
POSIX), so a ``step-<n>`` folder is always complete; a killed writer leaves only a hidden folder, removed by
the next write. An older ``step-<n>`` of the same step is replaced the same way.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from peftkit.core import io
from peftkit.core.errors import PeftkitError
from peftkit.core.model import AdaptedModel
from peftkit.core.state import check_fingerprint
from peftkit.core.version import __version__
from peftkit.train.errors import CheckpointError

FORMAT = "peftkit-checkpoint"
FORMAT_VERSION = 1
STATE_FILE = "trainer.json"
TENSORS_FILE = "trainer.safetensors"
ADAPTER_DIR = "adapter"
PARAMS_FILE = "params.safetensors"
_NAME = re.compile(r"step-(\d+)")


# ------------------------------------------------------------------------------------------ folders on disk
def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint after optimizer step ``step``."""
    return f"step-{step}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the complete checkpoints in ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _NAME.fullmatch(entry.name)
        if match and (entry / STATE_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint folder (holds ``trainer.json``)."""
    return (Path(path) / STATE_FILE).is_file()


def write_checkpoint(root: str | Path, step: int, write: Any) -> Path:
    """Create ``root/step-<step>`` atomically: ``write(folder)`` fills a hidden temporary folder, which is then
    renamed into place (replacing an older checkpoint of the same step). Returns the final folder."""
    root = Path(root)
    io.prepare_folder(root)
    remove_dead_temporaries(root)
    final = root / checkpoint_name(step)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = root / f".{final.name}.tmp-{tag}"
    tmp.mkdir()
    old = None
    try:
        write(tmp)
        if final.exists():
            old = root / f".{final.name}.old-{tag}"
            os.rename(final, old)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not final.exists():
            os.rename(old, final)
        raise
    io.fsync_dir(root)  # the rename is durable (the core's folder-format helper)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def prune(root: str | Path, keep: int | None) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints in ``root`` (``None``: keep all); returns those deleted."""
    if keep is None:
        return []
    removed = [path for _, path in list_checkpoints(root)[:-keep]]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def remove_dead_temporaries(root: Path, kinds: tuple[str, ...] = ("tmp", "old")) -> None:
    """Hidden folders ``.step-<n>.<kind>-<pid>-<tag>`` of checkpoint writers that died (their pid is gone, or is
    this process: an earlier write of its own failed) before renaming them into place. Kinds: ``tmp`` and ``old``
    of :func:`write_checkpoint`, ``staging`` of the multi-process writer (which cleans its own kind)."""
    pattern = re.compile(rf"\.(?:{'|'.join(kinds)})-(\d+)-")
    for entry in root.glob(".step-*"):
        pid = pattern.search(entry.name)
        if entry.is_dir() and pid and io.stale_writer(int(pid.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


# ------------------------------------------------------------------------------------------ state to files
def write_state(folder: Path, state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """``trainer.safetensors`` then ``trainer.json`` (the file that marks a checkpoint complete) into ``folder``."""
    state = {"format": FORMAT, "format_version": FORMAT_VERSION, "peftkit_version": __version__, **state}
    io.write_files(folder, [(TENSORS_FILE, io.safetensors_bytes(tensors))])
    io.write_files(folder, [(STATE_FILE, json.dumps(state, indent=1).encode())])


def read_state(folder: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(trainer.json, trainer.safetensors)`` of a checkpoint folder.

    Raises:
        CheckpointError: the folder is not a checkpoint, or its files are unreadable or of another format.
    """
    folder = Path(folder)
    if not is_checkpoint(folder):
        raise CheckpointError(f"{folder} is not a checkpoint folder (no {STATE_FILE})")
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        tensors = load_file(str(folder / TENSORS_FILE))
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {folder} cannot be read: {exc}") from None
    if state.get("format") != FORMAT or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {folder} has format {state.get('format')!r} version {state.get('format_version')!r}; "
            f"this peftkit reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    return state, tensors


# -------------------------------------------------------------------------------------------- RNG states
def rng_state() -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The states of Python's ``random``, NumPy's global RNG, torch's CPU RNG and every initialised CUDA
    device's RNG, as ``(JSON values, tensors)``."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    values = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return values, tensors


def set_rng_state(values: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss = values["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = values["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((int(k.rsplit(".", 1)[1]), t) for k, t in tensors.items() if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t for _, t in cuda])


# --------------------------------------------------------------------------------------------- optimizer
_NESTED = "/"  # separates a nested optimizer state's key from its entry's in the tensor names


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """An optimizer's ``state_dict`` as ``(JSON values, tensors)``: tensors keyed ``optimizer.<param
    index>.<name>`` (AdamW's ``exp_avg``, ``exp_avg_sq``, ``step``), the param groups and any non-tensor state
    as JSON."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    other: dict[str, dict[str, Any]] = {}
    for index, entries in sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            elif isinstance(value, dict):  # one level of nesting: bitsandbytes' 8-bit quantisation state
                for sub, item in value.items():
                    if isinstance(item, Tensor):
                        tensors[f"optimizer.{index}.{key}{_NESTED}{sub}"] = item
                    else:
                        other.setdefault(str(index), {}).setdefault(key, {})[sub] = item
                other.setdefault(str(index), {}).setdefault(key, {})
            else:
                other.setdefault(str(index), {})[key] = value
    # safetensors refuses tensors that share memory (bitsandbytes gives every parameter the same quantisation
    # maps): the repeats are written as copies.
    seen: set[int] = set()
    for name, value in tensors.items():
        ptr = value.untyped_storage().data_ptr() if value.numel() else -1
        if ptr in seen:
            tensors[name] = value.clone()
        elif ptr != -1:
            seen.add(ptr)
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return {"param_groups": groups, "state": other}, tensors


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, values: dict[str, Any], tensors: dict[str, Tensor], source: str
) -> None:
    """Load what :func:`optimizer_state` wrote, after checking it fits ``optimizer``'s parameters.

    Raises:
        CheckpointError: other param groups, or moments whose shapes differ from the parameters'.
    """
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
        for g in values["param_groups"]
    ]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    if [len(g["params"]) for g in groups] != sizes:
        raise CheckpointError(
            f"{source}: the optimizer state holds param groups of {[len(g['params']) for g in groups]} tensors, "
            f"the model being trained has {sizes}: it is not the model this checkpoint was written for"
        )
    # torch's AdamW (and its subclasses) keeps moments shaped like the parameters; other optimizers keep their
    # own shapes (GaLore's projected moments, LoRA-Pro's full-size ones, 8-bit blocks), checked by their groups.
    param_shaped = isinstance(optimizer, torch.optim.AdamW)
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            param = params[int(index)]
            if param_shaped and value.dim() > 0 and value.shape != param.shape:
                raise CheckpointError(
                    f"{source}: optimizer state {name} of tensor {index} has shape {tuple(value.shape)}, the "
                    f"parameter has {tuple(param.shape)}"
                )
            if _NESTED in name:
                outer, inner = name.split(_NESTED, 1)
                state.setdefault(int(index), {}).setdefault(outer, {})[inner] = value
            else:
                state.setdefault(int(index), {})[name] = value
    for index, entries in values["state"].items():
        slot = state.setdefault(int(index), {})
        for key, value in entries.items():
            if isinstance(value, dict):
                slot.setdefault(key, {}).update(value)
            else:
                slot[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ------------------------------------------------------------------------------------------ model weights
def save_model(model: nn.Module, folder: Path) -> None:
    """The trained weights: an :class:`AdaptedModel`'s adapters with ``model.save`` (``adapter/``), any other
    model's trainable parameters by name (``params.safetensors``)."""
    if isinstance(model, AdaptedModel):
        model.save(folder / ADAPTER_DIR)
        return
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    io.write_files(folder, [(PARAMS_FILE, io.safetensors_bytes(params))])


def load_model(model: nn.Module, folder: Path) -> None:
    """Overwrite ``model``'s trained weights with those :func:`save_model` wrote in checkpoint ``folder``.

    Raises:
        CheckpointError: the checkpoint holds other adapters, tensors of other names or shapes, or was written
            for another base model (its fingerprint differs).
    """
    try:
        if isinstance(model, AdaptedModel):
            adapter = folder / ADAPTER_DIR
            if (adapter / io.INDEX_FILE).is_file() and not (adapter / io.CONFIG_FILE).is_file():
                for name in io.read_index(adapter)["adapters"]:
                    _assign_adapter(model, adapter / name)
            else:
                _assign_adapter(model, adapter)
            return
        saved = load_file(str(folder / PARAMS_FILE))
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if sorted(saved) != sorted(params):
            raise CheckpointError(f"{folder}: the checkpoint's parameters differ from the model's trainable ones")
        with torch.no_grad():
            for name, p in params.items():
                if saved[name].shape != p.shape:
                    raise CheckpointError(
                        f"{folder}: {name} has shape {tuple(saved[name].shape)}, not {tuple(p.shape)}"
                    )
                p.copy_(saved[name])
    except CheckpointError:
        raise
    except (PeftkitError, OSError) as exc:
        raise CheckpointError(f"checkpoint {folder} does not fit the model: {exc}") from None


def _assign_adapter(model: AdaptedModel, path: Path) -> None:
    meta = io.read_meta(path)
    name = meta["name"]
    if name not in model.configs:
        raise CheckpointError(f"{path} holds adapter {name!r}, which the model being trained does not have")
    check_fingerprint(model.model, meta["base_fingerprint"])
    model.assign_tensors(name, io.read_tensors(path, meta), source=str(path))
