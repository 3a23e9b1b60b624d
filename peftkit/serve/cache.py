"""``AdapterCache``: adapters paged from disk into CPU memory, least recently used first out.

Adapters are *registered* by name (a folder written by ``AdaptedModel.save``); their tensors are read only when
a request needs them, in a background thread (``get_async``), so requests for adapters already in memory keep
flowing while another one loads. Residency is bounded by bytes: after each load the least recently used
entries that nobody holds (``pin``) are dropped until the total fits ``max_bytes``. This is the CPU tier of the
two-tier scheme of S-LoRA / vLLM (``max_cpu_loras``); the engine keeps the second tier (adapters injected in
the model) itself.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from torch import Tensor

from peftkit.core.errors import AdapterExistsError, AdapterNameError, AdapterNotFoundError, PeftkitError
from peftkit.core.io import CONFIG_FILE, WEIGHTS_FILE, read_meta, read_tensors

from .errors import AdapterLoadError, AdapterTooLargeError, check_adapter_name
from .folders import adapter_folder, discover, inside

__all__ = ["AdapterCache", "AdapterLoadError", "AdapterTooLargeError", "CachedAdapter"]


@dataclass
class CachedAdapter:
    """An adapter's saved config (``adapter.json``) and tensors, held in CPU memory.

    Attributes:
        name: the registered name.
        path: the folder it was read from.
        meta: the parsed ``adapter.json`` (method, config, base fingerprint, ...).
        tensors: ``{module path.tensor name: tensor}`` exactly as saved.
        nbytes: total bytes of ``tensors``.
        source: how messages name the folder: its path relative to the cache's root (never the server's
            absolute path).
    """

    name: str
    path: Path
    meta: dict[str, Any]
    tensors: dict[str, Tensor]
    nbytes: int
    source: str = ""
    pins: int = field(default=0, repr=False)


class AdapterCache:
    """Registered adapters (name → folder) and an LRU of loaded ones bounded by ``max_bytes``.

    Args:
        max_bytes: byte budget for resident adapter tensors. Pinned adapters are never evicted, so the total
            may exceed the budget while more than it is pinned; it falls back under it as pins are released.
        root: if given, every registered folder must lie inside it (checked after resolving symlinks).
        validate: called with the parsed ``adapter.json`` in the loader thread before the tensors are read;
            raise a :class:`~peftkit.errors.PeftkitError` to reject an incompatible adapter (the engine checks
            the base-model fingerprint here).
        max_workers: loader threads.
    """

    def __init__(
        self,
        max_bytes: int,
        *,
        root: str | Path | None = None,
        validate: Callable[[dict[str, Any]], None] | None = None,
        max_workers: int = 2,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.root = Path(root).resolve() if root is not None else None
        self.validate = validate
        self._paths: dict[str, Path] = {}
        self._lru: OrderedDict[str, CachedAdapter] = OrderedDict()  # oldest first
        self._loading: dict[str, Future[CachedAdapter]] = {}
        # Bumped whenever a name's folder or resident copy changes: a load that started before keeps its result
        # to itself (it read the previous version) instead of putting it in the LRU.
        self._generation: dict[str, int] = {}
        self._checked: dict[str, tuple[Any, str | None]] = {}  # name -> (file stats, problem), see problem()
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="peftkit-adapter-load")
        self.stats = {"hits": 0, "misses": 0, "evictions": 0, "load_errors": 0}

    # ------------------------------------------------------------------------------------------ registration
    def folder(self, path: str | Path) -> Path:
        """``path`` resolved (symlinks too), a relative one against the root, and a training run folder taken to
        the adapter it keeps (``RUN/adapter``); ``AdapterNameError`` if it lies outside the root. The message
        quotes ``path`` only if it is relative (as a client gave it): it never names the server's own folders."""
        found = inside(self.root, path)
        run = adapter_folder(found)
        return found if run == found else inside(self.root, run)  # (RUN/adapter may be a link leading out)

    def register(self, name: str, path: str | Path, *, replace: bool = True) -> None:
        """Register adapter ``name`` at folder ``path`` (relative paths are relative to the root; nothing is read
        yet). Re-registering a name with a new path drops the resident copy; with ``replace=False`` a registered
        name raises :class:`~peftkit.errors.AdapterExistsError` instead."""
        check_adapter_name(name)
        folder = self.folder(path)
        with self._lock:
            if not replace and name in self._paths:
                raise AdapterExistsError(f"an adapter named {name!r} is already registered")
            if self._paths.get(name) not in (None, folder):
                self._changed(name)
            self._paths[name] = folder

    def register_dir(self, root: str | Path) -> list[str]:
        """Register every adapter that folder ``root`` holds: its adapter sub-folders (name = folder), a training
        run folder or a parent folder of runs (name = run), a save of several adapters (their names); see
        :mod:`peftkit.serve.folders`. An adapter that cannot be registered (a symlink that leads outside the
        cache's root, an invalid name) is skipped with a warning: one bad entry must not keep a server from
        starting. Returns the names registered."""
        found = []
        for name, folder in discover(root):
            try:
                self.register(name, folder)
            except AdapterNameError as exc:
                warnings.warn(f"skipping adapter folder {self.shown(folder)!r}: {exc}", stacklevel=2)
                continue
            found.append(name)
        return found

    def unregister(self, name: str) -> None:
        """Forget ``name`` and drop its resident copy (holders of a :class:`CachedAdapter` keep theirs)."""
        with self._lock:
            self._require(name)
            del self._paths[name]
            self._changed(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._paths)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._paths

    def path_of(self, name: str) -> Path:
        with self._lock:
            self._require(name)
            return self._paths[name]

    def shown(self, folder: Path) -> str:
        """How messages name ``folder``: relative to the root (``"."`` for the root itself), else its last
        component, so no error sent to a client reveals the server's filesystem layout."""
        if self.root is not None and folder.is_relative_to(self.root):
            return folder.relative_to(self.root).as_posix() or "."
        return folder.name

    # ----------------------------------------------------------------------------------------------- loading
    def get_async(self, name: str) -> Future[CachedAdapter]:
        """A future of the loaded adapter: already done on a hit; otherwise the load runs in a loader thread
        (concurrent requests for the same adapter share one load). The future raises
        :class:`AdapterLoadError` if the adapter is corrupt or incompatible."""
        with self._lock:
            self._require(name)
            entry = self._lru.get(name)
            if entry is not None:
                self._lru.move_to_end(name)
                self.stats["hits"] += 1
                done: Future[CachedAdapter] = Future()
                done.set_result(entry)
                return done
            pending = self._loading.get(name)
            return pending if pending is not None else self._start_load(name)

    def _start_load(self, name: str) -> Future[CachedAdapter]:
        self.stats["misses"] += 1
        future = self._pool.submit(self._load, name, self._paths[name], self._generation.get(name, 0))
        self._loading[name] = future
        return future

    def prefetch(self, name: str) -> None:
        """Start loading ``name`` in a loader thread unless it is resident or loading already (not counted as
        a lookup: a later :meth:`get_async` counts the hit)."""
        with self._lock:
            self._require(name)
            if name not in self._lru and name not in self._loading:
                self._start_load(name)

    def get(self, name: str, timeout: float | None = None) -> CachedAdapter:
        """The loaded adapter (blocking)."""
        return self.get_async(name).result(timeout)

    def read(self, name: str, path: str | Path) -> CachedAdapter:
        """Read the adapter in folder ``path`` (relative paths: relative to the root) as ``name``, checked with
        ``validate``, without registering it or touching the resident ones (see :meth:`put`).

        Raises:
            AdapterLoadError: unreadable, corrupt or incompatible (the message names the folder relative to the
                root, never by its absolute path).
            AdapterNameError: an invalid name, or a folder outside the root.
        """
        check_adapter_name(name)
        return self._read(name, self.folder(path))

    def _read(self, name: str, path: Path) -> CachedAdapter:
        try:
            meta = read_meta(path)
            if self.validate is not None:
                self.validate(meta)
            tensors = read_tensors(path, meta)  # checked against the checksum in the meta just validated
        except PeftkitError as exc:
            raise AdapterLoadError(name, self._redact(str(exc), path)) from exc
        except OSError as exc:
            raise AdapterLoadError(name, self._redact(f"{path}: {exc}", path)) from exc
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if nbytes > self.max_bytes:
            raise AdapterTooLargeError(name, f"{nbytes} bytes exceed the cache budget of {self.max_bytes}")
        return CachedAdapter(name, path, meta, tensors, nbytes, source=self.shown(path))

    def _load(self, name: str, path: Path, generation: int) -> CachedAdapter:
        try:
            entry = self._read(name, path)
        except BaseException:
            with self._lock:
                if self._generation.get(name, 0) == generation:
                    self._loading.pop(name, None)
                self.stats["load_errors"] += 1
            raise
        with self._lock:
            if self._generation.get(name, 0) == generation:  # not unregistered / re-pointed / replaced meanwhile
                self._loading.pop(name, None)
                if name in self._paths:
                    self._lru[name] = entry
                    self._lru.move_to_end(name)
                    self._evict()
        return entry

    def put(self, name: str, entry: CachedAdapter, *, replace: bool = False) -> None:
        """Register ``name`` at ``entry``'s folder with ``entry`` resident, in one step (a :meth:`get` after it
        returns ``entry``; loads of the previous version still in flight are disowned). ``replace=False``: a
        registered name raises :class:`~peftkit.errors.AdapterExistsError`."""
        check_adapter_name(name)
        with self._lock:
            if not replace and name in self._paths:
                raise AdapterExistsError(f"an adapter named {name!r} is already registered")
            self._changed(name)
            self._paths[name] = entry.path
            self._lru[name] = entry
            self._evict()

    def problem(self, name: str) -> str | None:
        """Why adapter ``name`` cannot be loaded, or ``None`` if it looks loadable: resident, or its
        ``adapter.json`` passes :func:`~peftkit.core.io.read_meta` and ``validate`` (format, method, config, base
        model, rank) and its tensor file's header is complete. Reads two small parts of its files, once per
        version of them (the answer is kept until their size or modification time changes). The tensor data
        itself (its checksum) is checked when the adapter is loaded."""
        with self._lock:
            self._require(name)
            if name in self._lru:
                return None
            folder = self._paths[name]
        files = [folder / CONFIG_FILE, folder / WEIGHTS_FILE]
        try:
            stats: Any = [(f.stat().st_mtime_ns, f.stat().st_size) for f in files]
        except OSError:
            stats = None
        key = (folder, stats)
        cached = self._checked.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        problem = None
        try:
            meta = read_meta(folder)
            if self.validate is not None:
                self.validate(meta)
            with safe_open(str(files[1]), framework="pt"):
                pass
        except PeftkitError as exc:
            problem = self._redact(str(exc), folder)
        except (OSError, SafetensorError) as exc:
            problem = self._redact(f"{files[1]}: {exc}", folder)
        self._checked[name] = (key, problem)
        return problem

    def _redact(self, message: str, folder: Path) -> str:
        """``message`` with ``folder`` (and the root) named relative to the root: clients see no server paths."""
        message = message.replace(str(folder), self.shown(folder))
        if self.root is not None:
            message = message.replace(str(self.root), ".")
        return message

    # ------------------------------------------------------------------------------------------ pins, eviction
    def pin(self, name: str) -> None:
        """Keep a resident adapter from eviction until :meth:`unpin` (pins count)."""
        with self._lock:
            entry = self._lru.get(name)
            if entry is None:
                raise AdapterNotFoundError(name, self._lru)
            entry.pins += 1
            self._lru.move_to_end(name)

    def unpin(self, name: str) -> None:
        with self._lock:
            entry = self._lru.get(name)
            if entry is not None and entry.pins > 0:
                entry.pins -= 1
                self._evict()

    @contextmanager
    def using(self, name: str, timeout: float | None = None) -> Iterator[CachedAdapter]:
        """``with cache.using(name) as adapter:`` loads (blocking) and pins for the block."""
        while True:
            entry = self.get(name, timeout)
            with self._lock:
                if self._lru.get(name) is entry:
                    entry.pins += 1
                    break
        try:
            yield entry
        finally:
            self.unpin(name)

    def _evict(self) -> None:
        total = sum(e.nbytes for e in self._lru.values())
        for name in list(self._lru):
            if total <= self.max_bytes:
                break
            entry = self._lru[name]
            if entry.pins == 0:
                del self._lru[name]
                total -= entry.nbytes
                self.stats["evictions"] += 1

    def _changed(self, name: str) -> None:
        """``name``'s folder or version changes: drop its resident copy and disown its load in flight."""
        self._lru.pop(name, None)
        self._loading.pop(name, None)
        self._checked.pop(name, None)
        self._generation[name] = self._generation.get(name, 0) + 1

    def _require(self, name: str) -> None:
        if name not in self._paths:
            raise AdapterNotFoundError(name, self._paths)

    # ------------------------------------------------------------------------------------------------ report
    def resident(self) -> list[str]:
        """Names in memory, least recently used first."""
        with self._lock:
            return list(self._lru)

    @property
    def resident_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._lru.values())

    def close(self) -> None:
        """Stop the loader threads (waits for loads in flight)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
