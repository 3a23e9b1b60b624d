"""Saving and loading adapters: ``adapter.json`` + ``adapter.safetensors``, never pickle.

A save writes only its own files into the target folder and leaves every other file there alone (as
``save_pretrained`` does); a path that is a file, or a read-only folder, is refused. Each file is replaced
atomically (written to a temporary file beside it, fsynced, then ``os.replace``), and the pair stays
loadable at every instant: ``adapter.json`` records the SHA-256 of the tensor file, and while a save swaps the
tensor file in, the previous one is kept (hard-linked) as ``.adapter.safetensors.<checksum prefix>`` until the
new ``adapter.json`` is in place; loading picks the tensor file whose checksum ``adapter.json`` names. The
checksum also catches corrupted tensor data (a flipped bit) with a clear error instead of NaN outputs.
Leftovers of killed saves are removed by the next save into the same folder.

Several adapters are saved as one sub-folder each (``<path>/<name>/``) plus an index ``adapters.json`` (their
order and which are active), which :func:`load` reads back.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes
from torch import Tensor, nn

from .errors import (
    AdapterFileError,
    BaseModelMismatch,
    FormatVersionError,
    InvalidConfigError,
    SavePathError,
)
from .protocol import Adapter, skip_init
from .registry import get_method

FORMAT = "peftkit-adapter"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter.json"
WEIGHTS_FILE = "adapter.safetensors"
CHECKSUM_FIELD = "weights_sha256"
INDEX_FILE = "adapters.json"
INDEX_FORMAT = "peftkit-adapters"
# Files up to this size are read into memory in one go; larger ones are memory-mapped.
_READ_WHOLE_BYTES = 256 * 2**20
_HASH_CHUNK = 16 * 2**20


def fingerprint(model: Any, name: str) -> dict[str, dict[str, Any]]:
    """Names, kinds and shapes of the modules one adapter adapts (what a compatible base must have)."""
    return {path: model._layer(path).base.describe() for path in model.layer_paths[name]}


# ---------------------------------------------------------------------------------------------- writing files
def safetensors_bytes(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """``tensors`` serialised in the safetensors format (contiguous CPU copies; never pickle)."""
    return save_bytes({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, metadata=metadata)


def prepare_folder(folder: str | Path) -> Path:
    """Create ``folder`` (and its parents) if needed, with the user's umask.

    Raises:
        SavePathError: ``folder`` is a file, or an existing read-only folder (its write bits are off: refused
            even where the process could write anyway, as root can).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SavePathError(f"cannot save into {str(folder)!r}: it is a file, not a folder")
    if folder.is_dir() and not (folder.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)):
        raise SavePathError(f"cannot save into {str(folder)!r}: the folder is read-only")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise SavePathError(f"cannot save into {str(folder)!r}: a parent of it is a file") from None
    return folder


def write_files(folder: str | Path, files: Sequence[tuple[str, bytes]], *, keep: dict[str, str] | None = None) -> Path:
    """Write ``files`` (``(name, content)``) into ``folder``, each replacing its old version atomically, in the
    given order; every other file in ``folder`` is left as it is.

    All contents are first written to temporary files beside their targets and fsynced, so a failure while
    writing leaves the old files untouched. ``keep`` maps a file name to a name under which its current version
    is hard-linked before it is replaced (unless that name exists already), so readers can still find it until
    the caller removes it. Leftover temporary files of killed writers are removed first.

    Raises:
        SavePathError: ``folder`` is a file or read-only, or a file about to be replaced is read-only.
    """
    folder = prepare_folder(folder)
    _remove_leftovers(folder, [name for name, _ in files])
    for name, _ in files:
        old = folder / name
        if old.is_dir():
            raise SavePathError(f"cannot write {str(old)!r}: a folder of that name is in the way")
        if old.exists() and not (old.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)):
            raise SavePathError(f"cannot replace {str(old)!r}: the file is read-only")
    written: list[tuple[Path, Path]] = []
    try:
        for name, content in files:
            tmp = folder / f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
            # os.open with 0o666: the user's umask decides the permissions, as for any other writer
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            written.append((tmp, folder / name))
            with os.fdopen(fd, "wb") as fh:
                fh.write(content)
                fh.flush()
                os.fsync(fh.fileno())
        for tmp, final in written:
            backup = (keep or {}).get(final.name)
            if backup is not None and final.exists() and not (folder / backup).exists():
                os.link(final, folder / backup)
            os.replace(tmp, final)
    except BaseException:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(folder)
    return folder


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_leftovers(folder: Path, names: Iterable[str]) -> None:
    """Temporary files of writers that died (their pid is gone) before renaming them into place."""
    for name in names:
        for tmp in folder.glob(f".{name}.tmp-*"):
            pid = tmp.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
            if not (pid.isdigit() and _alive(int(pid))):
                tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process writes one save at a time per folder: its own leftovers are stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_legacy_leftovers(folder: Path) -> None:
    # Saves before per-file writes swapped whole folders through hidden siblings; once a new save is in place
    # those are superseded.
    for pattern in (f".{folder.name}.tmp-*", f".{folder.name}.old-*"):
        for leftover in folder.parent.glob(pattern):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- saving
def _backup_name(checksum: str) -> str:
    return f".{WEIGHTS_FILE}.{checksum[:16]}"


def _remove_backups(folder: Path) -> None:
    """Kept previous tensor files: once a new ``adapter.json`` is in place, none is named by it."""
    for backup in folder.glob(f".{WEIGHTS_FILE}.*"):
        if ".tmp-" not in backup.name:  # (a temporary file of a writer still running)
            backup.unlink(missing_ok=True)


def _sha256_file(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _committed_checksum(folder: Path) -> str | None:
    """The checksum ``adapter.json`` in ``folder`` records for the committed tensor file; a save written before
    checksums existed gets one now (its ``adapter.json`` rewritten atomically), so the tensor file can be
    kept while the new one is swapped in. ``None`` when there is no readable save."""
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not (folder / WEIGHTS_FILE).is_file():
        return None
    checksum = meta.get(CHECKSUM_FIELD)
    if not isinstance(checksum, str):
        meta[CHECKSUM_FIELD] = checksum = _sha256_file(folder / WEIGHTS_FILE)
        write_files(folder, [(CONFIG_FILE, json.dumps(meta, indent=2).encode())])
    return checksum


def save_adapter(model: Any, path: str | Path, name: str) -> Path:
    """Save adapter ``name`` of an ``AdaptedModel`` into folder ``path`` (see the module docstring)."""
    from peftkit import __version__

    model._require(name)
    config = model.configs[name]
    tensors = model.adapter_state_dict(name)
    method = type(config).method
    weights = safetensors_bytes(tensors, {"format": FORMAT, "method": method})
    checksum = hashlib.sha256(weights).hexdigest()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "peftkit_version": __version__,
        "name": name,
        "method": method,
        "config": config.to_dict(),
        "base_fingerprint": fingerprint(model, name),
        "num_tensors": len(tensors),
        "num_elements": sum(t.numel() for t in tensors.values()),
        CHECKSUM_FIELD: checksum,
    }
    folder = prepare_folder(path)
    committed = _committed_checksum(folder)
    keep = {WEIGHTS_FILE: _backup_name(committed)} if committed else None
    # tensors first, adapter.json last: the new adapter.json is the commit point, and until it is in place the
    # old one finds its tensors in the backup link
    write_files(folder, [(WEIGHTS_FILE, weights), (CONFIG_FILE, json.dumps(meta, indent=2).encode())], keep=keep)
    _remove_backups(folder)
    _remove_legacy_leftovers(folder)
    return folder


def save_adapters(model: Any, path: str | Path, names: str | Sequence[str] | None = None) -> Path:
    """Save adapters of an ``AdaptedModel`` into folder ``path``: ``names`` (default: every adapter it holds).

    One adapter is written into ``path`` itself; several go into ``path/<name>/`` each, with an index
    ``adapters.json`` (order, active adapters) that :func:`load` reads. Files of other programs in ``path`` are
    left alone; peftkit's own files of an earlier save there are replaced.
    """
    if names is None:
        names = model.adapter_names
        if not names:
            raise model.no_adapters_error()
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        model._require(name)
    if len(set(names)) != len(names):
        raise InvalidConfigError(f"names lists an adapter twice: {names}")
    folder = prepare_folder(path)
    if len(names) == 1:
        save_adapter(model, folder, names[0])
        (folder / INDEX_FILE).unlink(missing_ok=True)  # an earlier save of several adapters: superseded
        return folder
    for name in names:
        save_adapter(model, folder / name, name)
    active = [n for n in model.active_adapters if n in names]
    index = {"format": INDEX_FORMAT, "format_version": 1, "adapters": names, "active": active}
    write_files(folder, [(INDEX_FILE, json.dumps(index, indent=2).encode())])  # the commit point
    for stale in (CONFIG_FILE, WEIGHTS_FILE):  # an earlier save of one adapter into this folder: superseded
        (folder / stale).unlink(missing_ok=True)
    _remove_backups(folder)
    return folder


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


def read_tensors(path: str | Path, meta: dict[str, Any] | None = None) -> dict[str, Tensor]:
    """The tensors of the saved adapter in folder ``path``, checked against the checksum its ``adapter.json``
    (``meta``, read from ``path`` when not given) records. While a save is swapping files, the tensor file that
    checksum names is the kept previous one (see the module docstring).

    Raises:
        AdapterFileError: the tensor file is missing, truncated, or its content differs from the checksum.
    """
    folder = Path(path)
    meta = read_meta(folder) if meta is None else meta
    file = folder / WEIGHTS_FILE
    if not file.is_file():
        raise AdapterFileError(f"{path}: {WEIGHTS_FILE} is missing")
    checksum = meta.get(CHECKSUM_FIELD)
    # Adapter-sized files are read in one go and deserialised from memory: ~2.5x faster than load_file's
    # per-tensor mmap slicing (the tensors are copied into the adapter's parameters right after).
    try:
        whole = file.stat().st_size <= _READ_WHOLE_BYTES
        data = file.read_bytes() if whole else None
        if checksum is not None:
            found = hashlib.sha256(data).hexdigest() if data is not None else _sha256_file(file)
            if found != checksum:
                file = _kept_previous(folder, checksum, file)
                data = file.read_bytes() if whole else None
        return load_bytes(data) if data is not None else load_file(str(file))
    except AdapterFileError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(f"{file} is truncated or corrupted: {exc}") from None


def _kept_previous(folder: Path, checksum: str, file: Path) -> Path:
    """The kept previous tensor file that ``checksum`` names, or an error saying the tensor file is corrupted."""
    kept = folder / _backup_name(checksum)
    if kept.is_file() and _sha256_file(kept) == checksum:
        return kept
    raise AdapterFileError(
        f"{file} is truncated or corrupted: its content does not match the checksum in {CONFIG_FILE} "
        f"({checksum[:16]}...; a changed byte, an incomplete copy, or another file put in its place)"
    )


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
    if (Path(path) / INDEX_FILE).is_file() and not (Path(path) / CONFIG_FILE).is_file():
        names = read_index(path)["adapters"]
        raise AdapterFileError(
            f"{path} holds {len(names)} adapters ({', '.join(names)}): load one with "
            f"load_adapter({os.path.join(str(path), names[0])!r}), or all of them with pk.load(base, {str(path)!r})"
        )
    meta = read_meta(path)
    check_fingerprint(model.model, meta["base_fingerprint"])
    method = get_method(meta["method"])
    try:
        config = method.config_class.from_dict(meta["config"])
    except (TypeError, InvalidConfigError) as exc:
        raise AdapterFileError(f"{path}: the saved config does not fit method {meta['method']!r}: {exc}") from None
    tensors = read_tensors(path, meta)
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


def read_index(path: str | Path) -> dict[str, Any]:
    """Read and check ``adapters.json``, the index of a folder of several saved adapters."""
    file = Path(path) / INDEX_FILE
    try:
        index = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFileError(f"{file} cannot be read: {exc}") from None
    names = index.get("adapters") if isinstance(index, dict) else None
    if index.get("format") != INDEX_FORMAT or not isinstance(names, list) or not names:
        raise AdapterFileError(f"{file} is not a peftkit adapter index (format or adapters field is wrong)")
    if not all(isinstance(n, str) and (Path(path) / n / CONFIG_FILE).is_file() for n in names):
        raise AdapterFileError(f"{file} lists adapters {names}, but not every one has a saved folder beside it")
    if not set(index.get("active", [])) <= set(names):
        raise AdapterFileError(f"{file}: its active adapters {index.get('active')} are not all in {names}")
    return index


def load(base_model: nn.Module, path: str | Path, name: str | None = None) -> Any:
    """Wrap ``base_model`` and load what :meth:`AdaptedModel.save` wrote at ``path``: one adapter (active, under
    ``name`` if given), or every adapter of a folder of several (in their saved order, the saved active ones
    active; ``name`` is then refused). Returns the ``AdaptedModel``."""
    from .model import AdaptedModel, restore_grad_flags_on_error

    folder = Path(path)
    several = (folder / INDEX_FILE).is_file()
    with restore_grad_flags_on_error(base_model):
        model = base_model if isinstance(base_model, AdaptedModel) else AdaptedModel(base_model)
        if not several:
            model.load_adapter(folder, name=name, activate=True)
            return model
        if name is not None:
            raise InvalidConfigError(f"{path} holds several adapters, each loaded under its saved name: drop name=")
        index = read_index(folder)
        loaded: list[str] = []
        try:
            for saved in index["adapters"]:
                loaded.append(model.load_adapter(folder / saved, activate=False))
        except BaseException:
            for done in loaded:
                model.delete_adapter(done)
            raise
        if index.get("active"):
            model.set_adapter(index["active"])
    return model
