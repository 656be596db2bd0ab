"""Files of instruction records, read one record at a time with where it came from (for error messages):

    .jsonl     JSON Lines: one JSON object per line (blank lines skipped)              "FILE:LINE"
    .json      a JSON array of objects (or one object), or JSON Lines under a .json
               name (what datasets' Dataset.to_json writes)                            "FILE: record N"
    .parquet   a table whose rows are the records (datasets' to_parquet, the Hub's
               parquet exports; list-of-struct columns such as "messages" included;
               other columns are not read; needs pyarrow)                              "FILE: row N"
    .arrow     the same, as Arrow IPC (the shards datasets' save_to_disk writes,
               data-00000-of-0000N.arrow: a folder of them is a dataset)               "FILE: row N"

The records themselves (TRL's formats) are instructions.py's business.
"""
from __future__ import annotations

import json
from typing import Iterator, Tuple

from .config import ConfigError

RECORD_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
# what a --data folder is searched for: not .json, which folders hold for other reasons (a dataset's
# dataset_info.json, a model's config.json); a .json file of records is named on its own
FOLDER_RECORD_SUFFIXES = (".jsonl", ".parquet", ".arrow")


def is_record_file(path: str) -> bool:
    return path.lower().endswith(RECORD_SUFFIXES)


def read_records(path: str) -> Iterator[Tuple[str, object]]:
    """(where, record) for each record of the file, in order; a file that cannot be read as its suffix says
    is an error naming the file and, where there is one, the line."""
    suffix = path.lower().rsplit(".", 1)[-1]
    if suffix == "parquet":
        yield from _parquet(path)
    elif suffix == "arrow":
        yield from _arrow(path)
    elif suffix == "json":
        yield from _json(path)
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


def _json(path: str) -> Iterator[Tuple[str, object]]:
    """A .json file: JSON Lines when its first line is a JSON value of its own and more follows (streamed, as
    a .jsonl is: datasets' to_json writes these, gigabytes of them), else one JSON value: an array of records
    or a single record, however it is laid out."""
    with open(path, "rb") as f:
        first = f.readline()
        more = bool(f.read(4096).strip())
    try:
        json.loads(first.decode("utf-8-sig"))
        lines = more
    except (UnicodeDecodeError, json.JSONDecodeError):
        lines = False
    if lines:
        yield from _json_lines(path)
        return
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
        if not text.strip():
            raise ConfigError(f"{path} is empty")
        value = json.loads(text)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
    if isinstance(value, dict):
        yield f"{path}: record 1", value
        return
    if not isinstance(value, list):
        raise ConfigError(f"{path}: a .json file must hold an array of records, a record, or one record per line; "
                          f"it holds a {type(value).__name__}")
    for number, record in enumerate(value, 1):
        yield f"{path}: record {number}", record


RECORD_KEYS = ("text", "prompt", "completion", "messages", "tools")   # the columns a record can use (instructions.py)


def _without_nulls(value):
    """A table row's value with the None fields of its structs left out (a message's unused "tool_calls")."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _parquet(path: str) -> Iterator[Tuple[str, object]]:
    pq = _pyarrow(path, "parquet").parquet
    try:
        reader = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
        raise ConfigError(f"{path}: not a readable parquet file ({e})") from e
    columns = _columns(path, reader.schema_arrow.names)
    yield from _rows(path, "parquet", reader.iter_batches(batch_size=1024, columns=columns))


def _arrow(path: str) -> Iterator[Tuple[str, object]]:
    """An Arrow IPC stream (what datasets writes) or file, memory-mapped: a batch at a time."""
    pa = _pyarrow(path, "arrow")
    try:
        source = pa.memory_map(path)
        try:
            stream = pa.ipc.open_stream(source)
            batches, schema = iter(stream), stream.schema
        except pa.ArrowInvalid:
            source.seek(0)
            file = pa.ipc.open_file(source)
            batches, schema = (file.get_batch(i) for i in range(file.num_record_batches)), file.schema
    except Exception as e:  # ArrowInvalid, OSError, ...
        raise ConfigError(f"{path}: not a readable Arrow file ({e})") from e
    columns = _columns(path, schema.names)
    yield from _rows(path, "Arrow", (batch.select(columns) for batch in batches))


def _pyarrow(path: str, kind: str):
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"{path}: reading .{kind} files needs pyarrow (pip install pyarrow)") from e
    return pyarrow


def _columns(path: str, names) -> list:
    """The columns a record can use: a table's other columns (images, ids) are never read."""
    columns = [c for c in names if c in RECORD_KEYS]
    if not columns:
        raise ConfigError(f"{path}: no column of {RECORD_KEYS} (the columns are {list(names)})")
    return columns


def _rows(path: str, kind: str, batches) -> Iterator[Tuple[str, object]]:
    """The rows of record batches, 1,024 at a time (a file may hold one batch of millions), as records; a file
    damaged past its header (truncated) is an error naming it."""
    number = 0
    batches = iter(batches)
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:  # OSError, ArrowInvalid: a damaged or truncated file
            raise ConfigError(f"{path}: not a readable {kind} file after row {number} ({e})") from e
        if batch is None:
            return
        for start in range(0, batch.num_rows, 1024):
            for record in batch.slice(start, 1024).to_pylist():
                number += 1
                # a column a row does not use (a table of "text" and "messages" rows) reads as None: not a key
                yield f"{path}: row {number}", _without_nulls(record)
