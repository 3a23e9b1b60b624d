"""peftkit.train.data: JSONL / CSV reading with the failing line named, and the seeded held-out split."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from peftkit.train.data import Row, file_sha256, read_rows, require_columns, split_rows
from peftkit.train.errors import DataError


def test_jsonl_rows_keep_their_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n   \n{"text": "日本 👍"}\n', encoding="utf-8")
    assert read_rows(path) == [Row({"text": "a"}, 1), Row({"text": "日本 👍"}, 4)]


def test_csv_and_tsv(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text('text,label\n"a, quoted",pos\nb,neg\n')
    (tmp_path / "d.tsv").write_text("text\tlabel\na\tpos\n")
    assert read_rows(tmp_path / "d.csv") == [Row({"text": "a, quoted", "label": "pos"}, 2),
                                             Row({"text": "b", "label": "neg"}, 3)]  # fmt: skip
    assert read_rows(tmp_path / "d.tsv") == [Row({"text": "a", "label": "pos"}, 2)]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("d.jsonl", '{"a": 1}\n{"a": 2,}\n', r"d\.jsonl, line 2: not valid JSON \(Expecting property name"),
        ("d.jsonl", '{"a": 1}\n"text"\n', r"d\.jsonl, line 2: expected a JSON object, found str"),
        ("d.jsonl", "\n\n", r"d\.jsonl is empty: it holds no rows"),
        ("d.csv", "", r"d\.csv is empty: it holds no rows"),
        ("d.csv", "text,label\n", r"d\.csv has a header \(text, label\) but no rows"),
        (
            "d.csv",
            "text,label\na,b\nc,d,e\n",
            r"d\.csv, line 3: 3 cells but the header names 2 columns \(text, label\)",
        ),
        ("d.txt", "hello", r"d\.txt: unknown format '\.txt'; use one of \.jsonl, \.ndjson, \.csv, \.tsv"),
    ],
)
def test_bad_files_are_named_with_the_line(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_rows(path)


def test_non_utf8_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(DataError, match=r"line 2: not UTF-8 text"):
        read_rows(path)


def test_missing_and_folder_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_rows(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="is a folder"):
        read_rows(tmp_path)


def test_require_columns_lists_what_was_found() -> None:
    with pytest.raises(DataError, match=r"^f\.csv, line 4: missing column 'label' \(found: text, y\); hint$"):
        require_columns(Row({"text": "a", "y": 1}, 4), ["text", "label"], "f.csv", "hint")


def test_split_is_seeded_disjoint_and_complete() -> None:
    rows = list(range(50))
    train, held = split_rows(rows, 0.1, seed=0)
    assert len(held) == 5 and sorted(train + held) == rows
    assert split_rows(rows, 0.1, seed=0) == (train, held) and split_rows(rows, 0.1, seed=1) != (train, held)
    assert split_rows(rows, 0.0, seed=0)[1] == [] and len(split_rows([1, 2], 0.01, 0)[1]) == 1
    with pytest.raises(ValueError, match="eval_fraction"):
        split_rows(rows, 1.0, 0)


def test_file_sha256(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"x" * 3_000_000)
    assert file_sha256(path) == hashlib.sha256(b"x" * 3_000_000).hexdigest()
