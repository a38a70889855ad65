"""Read raw records from preference files, each tagged with where it came from (`file:line`).

Supported: JSON arrays (`.json`), JSON Lines (`.jsonl`, `.json` with one object per line), any of those
gzipped (`.gz`), Parquet, CSV, and folders written by `datasets.Dataset.save_to_disk`; and records given in
memory (`InMemory`: a list of dicts or a `datasets.Dataset`, from the Python API), tagged `NAME:row N`.
"""

from __future__ import annotations

import csv
import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpokit.errors import DataError


@dataclass(frozen=True)
class RawRecord:
    where: str
    """`path:line N` (text formats) or `path:row N` (Parquet, CSV data rows, saved datasets)."""
    value: Any
    """The decoded record; normally a dict, anything else is reported by the format layer."""


@dataclass(frozen=True)
class InMemory:
    """Records given in memory, named in messages as `name:row N`."""

    name: str
    records: list


def in_memory(value, name: str) -> InMemory:
    """A list of records, a `datasets.Dataset` or an InMemory as InMemory; every record must be a JSON value
    (the run saves it), else DataError naming the row and the field."""
    if isinstance(value, InMemory):
        return value
    if hasattr(value, "to_list") and hasattr(value, "column_names"):  # datasets.Dataset
        records = value.to_list()
    elif isinstance(value, (list, tuple)):
        records = list(value)
    else:
        raise DataError(
            name, f"expected a file path, a list of records or a datasets.Dataset, got {type(value).__name__}"
        )
    for i, record in enumerate(records):
        _check_json(f"{name}:row {i}", record)
    return InMemory(name, records)


def _check_json(where: str, record) -> None:
    try:
        json.dumps(record, allow_nan=False)
    except (TypeError, ValueError) as err:
        bad = [k for k, v in record.items() if not _is_json(v)] if isinstance(record, dict) else []
        raise DataError(
            where,
            f"not a JSON value ({err}); give plain str/int/float/bool/None, lists and dicts (e.g. float(x) "
            "for a numpy number)",
            bad[0] if bad else None,
        ) from None


def _is_json(value) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def read_records(path: str | Path | InMemory) -> Iterator[RawRecord | DataError]:
    """Yield every record of a file (or of records in memory) in order; undecodable records are yielded as
    DataError (not raised).

    File-level problems (missing file, unknown extension, unreadable compression) raise DataError.
    """
    if isinstance(path, InMemory):
        yield from (RawRecord(f"{path.name}:row {i}", r) for i, r in enumerate(path.records))
        return
    path = Path(path)
    if not path.exists():
        raise DataError(str(path), "no such file")
    if path.is_dir():
        yield from _read_saved_dataset(path)
        return
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    kind = suffixes[-1] if suffixes else ""
    if kind in (".json", ".jsonl"):
        yield from _read_json(path)
    elif kind == ".parquet":
        yield from _read_parquet(path)
    elif kind == ".csv":
        yield from _read_csv(path)
    else:
        raise DataError(
            str(path),
            "unknown file type; use .json, .jsonl, .parquet, .csv (optionally .gz) or a saved dataset",
        )


def _open_text(path: Path):
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    return opener(path, "rt", encoding="utf-8", newline="")


def _read_text(path: Path) -> str:
    try:
        with _open_text(path) as fh:
            return fh.read()
    except UnicodeDecodeError as err:
        raise DataError(
            str(path), f"not valid UTF-8 (byte offset {err.start}); re-encode the file as UTF-8"
        ) from err
    except (OSError, EOFError, zlib.error) as err:  # zlib.error: a corrupted .gz stream (not an OSError)
        raise DataError(str(path), f"cannot read file: {err}") from err


def _read_json(path: Path) -> Iterator[RawRecord | DataError]:
    text = _read_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from _read_json_array(path, text)
    else:
        yield from _read_json_lines(path, text)


def _read_json_lines(path: Path, text: str) -> Iterator[RawRecord | DataError]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:line {lineno}"
        try:
            yield RawRecord(where, json.loads(line))
        except json.JSONDecodeError as err:
            yield DataError(where, f"malformed JSON ({err.msg} at column {err.colno})")


def _read_json_array(path: Path, text: str) -> Iterator[RawRecord | DataError]:
    """Decode a top-level JSON array element by element so each record knows its starting line."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        pos = _skip_ws(text, pos)
        if pos >= len(text):
            yield DataError(str(path), "JSON array is not closed (missing ']')")
            return
        if text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        where = f"{path}:line {line}"
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            # Inside an array there is no safe place to resume, so one error ends the file.
            yield DataError(f"{path}:line {err.lineno}", f"malformed JSON ({err.msg} at column {err.colno})")
            return
        yield RawRecord(where, value)
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos < len(text) and text[pos] != "]":
            yield DataError(
                f"{path}:line {text.count(chr(10), 0, pos) + 1}", "expected ',' or ']' between records"
            )
            return


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _read_csv(path: Path) -> Iterator[RawRecord | DataError]:
    text = _read_text(path)
    reader = csv.DictReader(text.splitlines())
    for row in reader:
        # csv line_num counts physical lines (quoted newlines included): the record's last line.
        yield RawRecord(f"{path}:line {reader.line_num}", dict(row))


def _read_parquet(path: Path) -> Iterator[RawRecord | DataError]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(str(path), f"cannot read Parquet: {err}") from err
    for i, row in enumerate(table.to_pylist()):
        yield RawRecord(f"{path}:row {i}", row)


def _read_saved_dataset(path: Path) -> Iterator[RawRecord | DataError]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises FileNotFoundError/ValueError variants
        raise DataError(str(path), f"not a dataset saved with save_to_disk: {err}") from err
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(str(path), f"DatasetDict without a 'train' split (splits: {list(ds)})")
        ds = ds["train"]
    for i, row in enumerate(ds):
        yield RawRecord(f"{path}:row {i}", row)
