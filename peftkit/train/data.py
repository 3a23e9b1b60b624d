"""Reading a task's data file: JSONL or CSV rows, checked line by line, and a seeded train / held-out split.

Every problem is a :class:`~peftkit.train.errors.DataError` whose message names the file and, where one line
is at fault, its line number (1-based, as an editor shows it): a malformed JSON line, a line that is not a JSON
object, an empty file, a missing column (listing the columns found).
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.train.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
CSV_SUFFIXES = (".csv", ".tsv")


@dataclass(frozen=True)
class Row:
    """One example as read: its fields and the line of the file it came from (for error messages)."""

    fields: dict[str, Any]
    line: int


def read_rows(path: str | Path) -> list[Row]:
    """The rows of a ``.jsonl`` / ``.ndjson`` file (one JSON object per line; blank lines skipped) or a
    ``.csv`` / ``.tsv`` file (a header line, then one row per line).

    Raises:
        DataError: the file is missing, has another suffix, is empty, or a line is malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist" if not path.exists() else f"data file {path} is a folder")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        rows = _read_jsonl(path)
    elif suffix in CSV_SUFFIXES:
        rows = _read_csv(path, delimiter="\t" if suffix == ".tsv" else ",")
    else:
        raise DataError(
            f"data file {path}: unknown format {suffix or '(no suffix)'!r}; use one of "
            f"{', '.join(JSONL_SUFFIXES + CSV_SUFFIXES)}"
        )
    if not rows:
        raise DataError(f"data file {path} is empty: it holds no rows")
    return rows


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(value, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object, found {type(value).__name__}")
        rows.append(Row(value, number))
    return rows


def _read_csv(path: Path, delimiter: str) -> list[Row]:
    reader = csv.DictReader((line for _, line in _lines(path)), delimiter=delimiter)
    header = reader.fieldnames
    if header is None:
        return []
    rows = []
    for record in reader:
        if None in record:  # more cells than header names
            raise DataError(
                f"{path}, line {reader.line_num}: {len(header) + len(record[None])} cells but the header names "
                f"{len(header)} columns ({', '.join(header)})"
            )
        rows.append(Row(dict(record), reader.line_num))
    if not rows:
        raise DataError(f"data file {path} has a header ({', '.join(header)}) but no rows")
    return rows


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 file (a leading byte-order mark dropped), decoded line by line so
    that a decoding error names its line."""
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}, line {number}: not UTF-8 text ({exc.reason})") from None


def require_columns(row: Row, columns: Sequence[str], path: str | Path, hint: str = "") -> None:
    """Raise a :class:`DataError` naming the missing ``columns`` of ``row`` and the columns it has."""
    missing = [c for c in columns if c not in row.fields]
    if missing:
        found = ", ".join(row.fields) or "none"
        names = ", ".join(repr(c) for c in missing)
        raise DataError(
            f"{path}, line {row.line}: missing column{'s' if len(missing) > 1 else ''} {names} (found: {found})"
            + (f"; {hint}" if hint else "")
        )


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (recorded in a run, so evaluating it later notices a changed data file)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def split_rows(rows: Sequence[Any], eval_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """``(train, held_out)``: the rows shuffled with ``random.Random(seed)`` and the first
    ``round(eval_fraction * n)`` held out (at least one when ``eval_fraction > 0`` and there are two rows or
    more; none when ``eval_fraction`` is 0). Each side keeps the shuffled order."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must lie in [0, 1), got {eval_fraction}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = round(eval_fraction * len(rows))
    if eval_fraction > 0 and len(rows) >= 2:
        n_eval = min(max(n_eval, 1), len(rows) - 1)
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]
