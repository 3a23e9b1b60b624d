"""Paths inside the adapters folder: what a client or a caller names is resolved there and may not leave it."""

from __future__ import annotations

from pathlib import Path

from peftkit.core.errors import AdapterNameError

__all__ = ["inside"]


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
