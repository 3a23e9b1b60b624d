"""Where served adapters are found on disk, and what they are called.

``peftkit serve --adapters FOLDER`` (:meth:`AdapterCache.register_dir`) accepts, and mixes freely:

- a folder of adapter folders, each saved by ``model.save`` (``FOLDER/<name>/adapter.json``): the name is the
  sub-folder's;
- a training run folder written by ``peftkit train`` (its final adapter in ``RUN/adapter/``, next to
  ``checkpoints/`` and ``run.json``; see :mod:`peftkit.train.run`): the adapter is named after the run folder (a
  run without its final adapter, interrupted or still training, is not served: its checkpoints are not looked
  into);
- a parent folder of runs (``FOLDER/<run>/adapter/``): each run's adapter is named after its run;
- a folder saved by ``model.save`` with several adapters (the index ``adapters.json`` and one sub-folder per
  adapter): the adapters keep their names. Such a save inside a run (``RUN/adapter/adapters.json``) or inside the
  parent folder (``FOLDER/<save>/adapters.json``) names each adapter ``<run or save>-<adapter>``, so adapters of
  different runs do not collide.

Only the adapters an index lists are served (a sub-folder left over from an earlier save is not). Hidden folders
(leftovers of interrupted saves, editor and VCS folders) are passed over. Decision: ``FOLDER`` itself counts as a
run folder only if ``FOLDER/adapter`` holds an adapter and no other sub-folder does, so a folder of adapters that
happens to hold one named ``adapter`` keeps serving all of them under their own names.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from peftkit.core.errors import AdapterFileError, AdapterNameError
from peftkit.core.io import CONFIG_FILE, INDEX_FILE, read_index

__all__ = ["RUN_ADAPTER_DIR", "adapter_folder", "discover", "inside"]

RUN_ADAPTER_DIR = "adapter"  # where a training run folder keeps its final adapter (peftkit.train.run.ADAPTER_DIR)


def inside(root: Path | None, path: str | Path) -> Path:
    """``path`` resolved (symlinks too), a relative one against ``root``; :class:`AdapterNameError` if it lies
    outside ``root``. The message quotes ``path`` only if it is relative (as a client gave it): it never names
    the server's own folders."""
    given = Path(path)
    folder = (root / given if root is not None and not given.is_absolute() else given).resolve()
    if root is not None and not folder.is_relative_to(root):
        what = "the adapter folder" if given.is_absolute() else f"adapter folder {str(path)!r}"
        raise AdapterNameError(f"{what} lies outside the adapters folder")
    return folder


def adapter_folder(folder: Path) -> Path:
    """The adapter folder that ``folder`` stands for: ``folder/adapter`` for a training run folder that keeps a
    single adapter there, else ``folder`` itself (whose reading then reports what is wrong with it)."""
    run = folder / RUN_ADAPTER_DIR
    if not (folder / CONFIG_FILE).is_file() and (run / CONFIG_FILE).is_file():
        return run
    return folder


def discover(root: str | Path) -> list[tuple[str, Path]]:
    """``(name, adapter folder)`` of every adapter ``root`` holds, in the layouts the module docstring lists, in
    name order of the folders. A name found twice keeps its first folder (a warning names the other); names are
    not checked here (the cache does that when it registers them)."""
    root = Path(root)
    subs = [s for s in sorted(root.iterdir()) if s.is_dir() and not s.name.startswith(".")]
    if (root / CONFIG_FILE).is_file() or (root / INDEX_FILE).is_file():  # one saved adapter, or one save of several
        found = _saved(root, root.resolve().name, prefix=False)
    elif _holds_adapters(root / RUN_ADAPTER_DIR) and not any(
        s.name != RUN_ADAPTER_DIR and (s / CONFIG_FILE).is_file() for s in subs
    ):  # a run folder
        found = _saved(root / RUN_ADAPTER_DIR, root.resolve().name, prefix=True)
    else:  # a folder of adapters, saves and runs
        found = []
        for sub in subs:
            if _holds_adapters(sub):
                found += _saved(sub, sub.name, prefix=True)
            elif _holds_adapters(sub / RUN_ADAPTER_DIR):
                found += _saved(sub / RUN_ADAPTER_DIR, sub.name, prefix=True)
    unique: dict[str, Path] = {}
    for name, folder in found:
        if name in unique:
            warnings.warn(f"skipping adapter folder {_shown(root, folder)!r}: the name {name!r} is taken", stacklevel=3)
            continue
        unique[name] = folder
    return list(unique.items())


def _holds_adapters(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() or (folder / INDEX_FILE).is_file()


def _saved(folder: Path, name: str, *, prefix: bool) -> list[tuple[str, Path]]:
    """The adapters saved in ``folder``: itself as ``name``, or those its index lists (as ``<name>-<adapter>``
    with ``prefix``). An unreadable index is skipped with a warning: one bad entry must not stop a server."""
    if (folder / CONFIG_FILE).is_file():
        return [(name, folder)]
    try:
        listed = read_index(folder)["adapters"]
    except AdapterFileError as exc:
        warnings.warn(f"skipping adapter folder {folder.name!r}: {exc}", stacklevel=4)
        return []
    return [(f"{name}-{a}" if prefix else a, folder / a) for a in listed]


def _shown(root: Path, folder: Path) -> str:
    return folder.relative_to(root).as_posix() if folder.is_relative_to(root) else folder.name
