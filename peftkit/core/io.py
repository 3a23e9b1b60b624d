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
order and which are active).

This module is the folder format only (files, checksums, atomic writes); what goes into the files and how they
reach an adapted model is :mod:`peftkit.core.persist`.
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

from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes
from torch import Tensor

from .errors import (
    AdapterFileError,
    FormatVersionError,
    SavePathError,
)

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
    fsync_dir(folder)
    return folder


def fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable (fsync the folder itself)."""
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
            if not pid.isdigit() or stale_writer(int(pid)):
                tmp.unlink(missing_ok=True)


def stale_writer(pid: int) -> bool:
    """Whether temporary files written by process ``pid`` are leftovers: that process is gone, or it is this
    one (which writes one save at a time per folder, so its own temporary files are from a failed write)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


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


def write_adapter(folder: str | Path, meta: dict[str, Any], tensors: dict[str, Tensor]) -> Path:
    """Write one saved adapter into ``folder``: ``adapter.safetensors`` (``tensors``) and ``adapter.json``
    (``meta`` plus the tensor file's checksum), see the module docstring. Returns the folder."""
    weights = safetensors_bytes(tensors, {"format": FORMAT, "method": str(meta.get("method"))})
    meta = {**meta, CHECKSUM_FIELD: hashlib.sha256(weights).hexdigest()}
    folder = prepare_folder(folder)
    committed = _committed_checksum(folder)
    keep = {WEIGHTS_FILE: _backup_name(committed)} if committed else None
    # tensors first, adapter.json last: the new adapter.json is the commit point, and until it is in place the
    # old one finds its tensors in the backup link
    write_files(folder, [(WEIGHTS_FILE, weights), (CONFIG_FILE, json.dumps(meta, indent=2).encode())], keep=keep)
    _remove_backups(folder)
    _remove_legacy_leftovers(folder)
    (folder / INDEX_FILE).unlink(missing_ok=True)  # an earlier save of several adapters here: superseded
    return folder


def write_index(folder: str | Path, names: Sequence[str], active: Sequence[str]) -> Path:
    """Commit a folder of several adapters (each already written to ``folder/<name>/``): the index
    ``adapters.json`` (their order and the active ones). A single adapter saved into ``folder`` itself before
    is superseded and removed."""
    folder = Path(folder)
    index = {"format": INDEX_FORMAT, "format_version": 1, "adapters": list(names), "active": list(active)}
    write_files(folder, [(INDEX_FILE, json.dumps(index, indent=2).encode())])  # the commit point
    for stale in (CONFIG_FILE, WEIGHTS_FILE):
        (folder / stale).unlink(missing_ok=True)
    _remove_backups(folder)
    return folder


def read_json(file: Path, missing: str) -> dict[str, Any]:
    """The JSON object in ``file``.

    Raises:
        AdapterFileError: ``missing`` when the file does not exist; or it is not valid JSON, or not an object.
    """
    if not file.is_file():
        raise AdapterFileError(missing)
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFileError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{file} does not hold a JSON object")
    return data


def read_meta(path: str | Path) -> dict[str, Any]:
    """Read and check ``adapter.json`` of a saved adapter."""
    file = Path(path) / CONFIG_FILE
    meta = read_json(file, f"{path} is not a saved peftkit adapter: {CONFIG_FILE} is missing")
    if meta.get("format") != FORMAT:
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


def read_index(path: str | Path) -> dict[str, Any]:
    """Read and check ``adapters.json``, the index of a folder of several saved adapters."""
    file = Path(path) / INDEX_FILE
    index = read_json(file, f"{path} holds no adapter index ({INDEX_FILE})")
    names = index.get("adapters")
    if index.get("format") != INDEX_FORMAT or not isinstance(names, list) or not names:
        raise AdapterFileError(f"{file} is not a peftkit adapter index (format or adapters field is wrong)")
    if not all(isinstance(n, str) and (Path(path) / n / CONFIG_FILE).is_file() for n in names):
        raise AdapterFileError(f"{file} lists adapters {names}, but not every one has a saved folder beside it")
    if not set(index.get("active", [])) <= set(names):
        raise AdapterFileError(f"{file}: its active adapters {index.get('active')} are not all in {names}")
    return index
