"""Files of instruction records, read one record at a time with where it came from (for error messages):

    .jsonl     JSON Lines: one JSON object per line (blank lines skipped)              "FILE:LINE"
    .json      a JSON array of objects, or JSON Lines under a .json name (what
               datasets' Dataset.to_json writes)                                       "FILE: record N"
    .parquet   a table whose rows are the records (datasets' to_parquet, the Hub's
               parquet exports; list-of-struct columns such as "messages" included;
               needs pyarrow)                                                          "FILE: row N"

The records themselves (TRL's formats) are instructions.py's business.
"""
from __future__ import annotations

import json
from typing import Iterator, Tuple

from .config import ConfigError

RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")


def is_record_file(path: str) -> bool:
    return path.lower().endswith(RECORD_SUFFIXES)


def read_records(path: str) -> Iterator[Tuple[str, object]]:
    """(where, record) for each record of the file, in order; a file that cannot be read as its suffix says
    is an error naming the file and, where there is one, the line."""
    suffix = path.lower().rsplit(".", 1)[-1]
    if suffix == "parquet":
        yield from _parquet(path)
        return
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if suffix == "json" and head.startswith(b"["):
        yield from _json_array(path)
    else:
        yield from _json_lines(path)


def _json_lines(path: str) -> Iterator[Tuple[str, object]]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from e
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not valid JSON ({e.msg})") from e


def _json_array(path: str) -> Iterator[Tuple[str, object]]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            records = json.load(f)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
    if not isinstance(records, list):
        raise ConfigError(f"{path}: a .json file must hold an array of records (or one record per line)")
    for number, record in enumerate(records, 1):
        yield f"{path}: record {number}", record


def _parquet(path: str) -> Iterator[Tuple[str, object]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ConfigError(f"{path}: reading .parquet files needs pyarrow (pip install pyarrow)") from e
    try:
        reader = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
        raise ConfigError(f"{path}: not a readable parquet file ({e})") from e
    number = 0
    for batch in reader.iter_batches(batch_size=1024):   # a row group at a time, not the whole table
        for record in batch.to_pylist():
            number += 1
            # a column a row does not use (a table of "text" and "messages" rows) reads as None: not a key of it
            yield f"{path}: row {number}", {k: v for k, v in record.items() if v is not None}
