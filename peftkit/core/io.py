"""Saving and loading adapters: ``adapter.json`` + ``adapter.safetensors``, never pickle.

Writes are atomic: files go to a temporary folder beside the target, which then replaces the target in
one rename, so a failed save leaves the previous save intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .errors import AdapterFileError, BaseModelMismatch, FormatVersionError, InvalidConfigError
from .protocol import Adapter, skip_init
from .registry import get_method

FORMAT = "peftkit-adapter"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter.json"
WEIGHTS_FILE = "adapter.safetensors"
# Files up to this size are read into memory in one go; larger ones are memory-mapped.
_READ_WHOLE_BYTES = 256 * 2**20


def fingerprint(model: Any, name: str) -> dict[str, dict[str, Any]]:
    """Names, kinds and shapes of the modules one adapter adapts (what a compatible base must have)."""
    return {path: model._layer(path).base.describe() for path in model.layer_paths[name]}


def atomic_write_dir(target: Path, files: dict[str, bytes | dict[str, Tensor]], metadata: dict[str, str]) -> None:
    """Write ``files`` (name -> JSON bytes or tensors for safetensors) into ``target`` atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for fname, content in files.items():
            if isinstance(content, bytes):
                (tmp / fname).write_bytes(content)
            else:
                save_file(content, str(tmp / fname), metadata=metadata)
            with open(tmp / fname, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_adapter(model: Any, path: str | Path, name: str) -> Path:
    """Save adapter ``name`` of an ``AdaptedModel`` to folder ``path``."""
    from peftkit import __version__

    model._require(name)
    config = model.configs[name]
    tensors = {k: t.detach().contiguous().cpu() for k, t in model.adapter_state_dict(name).items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "peftkit_version": __version__,
        "name": name,
        "method": type(config).method,
        "config": config.to_dict(),
        "base_fingerprint": fingerprint(model, name),
        "num_tensors": len(tensors),
        "num_elements": sum(t.numel() for t in tensors.values()),
    }
    target = Path(path)
    files: dict[str, bytes | dict[str, Tensor]] = {
        CONFIG_FILE: json.dumps(meta, indent=2).encode(),
        WEIGHTS_FILE: tensors,
    }
    atomic_write_dir(target, files, {"format": FORMAT, "method": meta["method"]})
    return target


def read_meta(path: str | Path) -> dict[str, Any]:
    """Read and check ``adapter.json`` of a saved adapter."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise AdapterFileError(f"{path} is not a saved peftkit adapter: {CONFIG_FILE} is missing")
    try:
        meta = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFileError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdapterFileError(f"{file} is not a peftkit adapter config (format field is missing or wrong)")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise FormatVersionError(
            f"{file} has format_version {version!r}; this peftkit reads versions 1..{FORMAT_VERSION}"
            " (upgrade peftkit to read adapters written by a newer version)"
        )
    for key in ("method", "config", "base_fingerprint", "name"):
        if key not in meta:
            raise AdapterFileError(f"{file} lacks the field {key!r}")
    return meta


def read_tensors(path: str | Path) -> dict[str, Tensor]:
    file = Path(path) / WEIGHTS_FILE
    if not file.is_file():
        raise AdapterFileError(f"{path}: {WEIGHTS_FILE} is missing")
    try:
        if file.stat().st_size <= _READ_WHOLE_BYTES:
            # One read + deserialise from memory: ~2.5x faster than load_file's per-tensor mmap slicing for
            # adapter-sized files (the tensors are copied into the adapter's parameters right after).
            return load_bytes(file.read_bytes())
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(f"{file} is truncated or corrupted: {exc}") from None


def _base_module(model: nn.Module, path: str) -> nn.Module | None:
    """The module at ``path`` as the user sees it (an ``AdaptedLayer`` counts as its base module), found by
    walking only that path (not the whole tree, so loading costs O(#adapted modules), not O(model))."""
    from .layer import AdaptedLayer

    module = model
    for part in path.split(".") if path else []:
        if isinstance(module, AdaptedLayer):
            return None  # paths never lead inside a wrapper
        module = module._modules.get(part)  # type: ignore[assignment]
        if module is None:
            return None
    return module.base_layer if isinstance(module, AdaptedLayer) else module


def check_fingerprint(model: nn.Module, expected: dict[str, dict[str, Any]]) -> None:
    """Raise :class:`BaseModelMismatch` naming the first module that differs from the saved fingerprint."""
    from .base import BaseView, layer_kind

    for path, want in expected.items():
        module = _base_module(model, path)
        if module is None:
            raise BaseModelMismatch(
                f"the adapter was saved for a base model with a module {path!r}; this model has none"
            )
        got = BaseView(module).describe() if layer_kind(module) else {"type": type(module).__name__}
        if got != want:
            raise BaseModelMismatch(
                f"module {path!r} differs from the base the adapter was saved for: saved {want}, found {got}"
            )


def load_adapter(model: Any, path: str | Path, name: str | None = None, activate: bool | None = None) -> str:
    """Load a saved adapter into an ``AdaptedModel``; returns the name it was loaded under."""
    meta = read_meta(path)
    check_fingerprint(model.model, meta["base_fingerprint"])
    method = get_method(meta["method"])
    try:
        config = method.config_class.from_dict(meta["config"])
    except (TypeError, InvalidConfigError) as exc:
        raise AdapterFileError(f"{path}: the saved config does not fit method {meta['method']!r}: {exc}") from None
    tensors = read_tensors(path)
    name = name or meta["name"]
    with skip_init():  # every saved tensor is overwritten below: allocate only, skip the init draws
        model.add_adapter(name, config, activate=activate)
    try:
        if sorted(model.layer_paths[name]) != sorted(meta["base_fingerprint"]):
            raise BaseModelMismatch(
                f"on this model the adapter's targets select {len(model.layer_paths[name])} modules, "
                f"but it was saved for {len(meta['base_fingerprint'])}"
            )
        assign_state(model, name, tensors, path)
    except BaseException:
        model.delete_adapter(name)
        raise
    return name


def assign_state(model: Any, name: str, tensors: dict[str, Tensor], path: str | Path) -> None:
    """Copy saved tensors (keyed ``<module path>.<tensor name>``, as :func:`save_adapter` writes them) into the
    modules of adapter ``name``: the one path from saved tensors to adapter modules (loading, serving).

    Each module's :meth:`Adapter.fit_state` sees its saved tensors first (methods whose structure changes while
    training reshape to them); then every tensor ``state_dict`` names must be in ``tensors`` with its shape.

    Raises:
        AdapterFileError: names or shapes do not match the adapter's config (``path`` is named in the message).
    """
    # One pass over the adapter's modules; tensors are copied straight into the parameters and buffers that
    # ``state_dict`` names (what ``save`` wrote), which is ``load_state_dict`` without its per-module overhead.
    modules = model.adapter_modules(name)
    if any(type(a).fit_state is not Adapter.fit_state for a in modules.values()):
        per_module: dict[str, dict[str, Tensor]] = {p: {} for p in modules}
        for key, t in tensors.items():
            module_path, _, local = key.rpartition(".")
            while module_path and module_path not in per_module:  # keys of nested tensors: "A.0" under "x.y"
                module_path, _, head = module_path.rpartition(".")
                local = f"{head}.{local}"
            if module_path:
                per_module[module_path][local] = t
        for module_path, adapter in modules.items():
            adapter.fit_state(per_module[module_path])
    expected = {
        f"{module_path}.{key}": t
        for module_path, adapter in modules.items()
        for key, t in adapter.state_dict(keep_vars=True).items()
    }
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterFileError(
            f"{path}: tensors do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for key, want in expected.items():
        if tensors[key].shape != want.shape:
            raise AdapterFileError(
                f"{path}: tensor {key!r} has shape {tuple(tensors[key].shape)}, the config implies {tuple(want.shape)}"
            )
    with torch.no_grad():
        for key, want in expected.items():
            want.copy_(tensors[key])


def load(base_model: nn.Module, path: str | Path, name: str | None = None) -> Any:
    """Wrap ``base_model`` and load the adapter saved at ``path`` (active); returns the ``AdaptedModel``."""
    from .model import AdaptedModel, restore_grad_flags_on_error

    with restore_grad_flags_on_error(base_model):
        model = base_model if isinstance(base_model, AdaptedModel) else AdaptedModel(base_model)
        model.load_adapter(path, name=name, activate=True)
    return model
