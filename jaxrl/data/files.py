"""Reading prompt files: jsonl, json (jsonl or one array), parquet, and directories written by
``datasets.Dataset.save_to_disk`` (``state.json`` + Arrow stream shards).

``read_rows(path, required_columns)`` yields ``(line_number, row, BadRow | None)``: a jsonl
line that is not UTF-8 or not JSON is a counted bad row naming the file and line, never an
abort. A missing file, an unknown format or a columnar file without a required column is a
start-up error naming it.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from jaxrl.data.presets import BadRow

FORMATS = ".jsonl, .json, .parquet or a datasets save_to_disk directory"


def file_format(path: str) -> str | None:
    """"jsonl" | "json" | "parquet" | "arrow_dir" (save_to_disk) | None (unsupported)."""
    if os.path.isdir(path):
        return "arrow_dir" if os.path.isfile(os.path.join(path, "state.json")) else None
    lowered = path.lower()
    if lowered.endswith(".jsonl"):
        return "jsonl"
    if lowered.endswith(".json"):
        return "json"
    if lowered.endswith(".parquet"):
        return "parquet"
    return None


def resolve_files(files: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expands glob patterns and checks every file exists; the error names the missing path."""
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    resolved: list[str] = []
    for entry in files:
        entry = os.fspath(entry)
        if any(char in entry for char in "*?["):
            matches = sorted(glob.glob(entry))
            if not matches:
                raise FileNotFoundError(f"prompt file pattern matched nothing: {entry}")
            resolved.extend(matches)
        elif not os.path.exists(entry):
            raise FileNotFoundError(f"prompt file not found: {entry}")
        else:
            resolved.append(entry)
    if not resolved:
        raise ValueError("no prompt files given")
    for path in resolved:
        if file_format(path) is None:
            raise ValueError(f"unsupported prompt file (expected {FORMATS}): {path}")
    return resolved


def _arrow_dir_table(path: str) -> pa.Table:
    with open(os.path.join(path, "state.json"), encoding="utf-8") as handle:
        state = json.load(handle)
    shards = [entry["filename"] for entry in state.get("_data_files", [])]
    if not shards:
        raise ValueError(f"{path}/state.json lists no data files")
    tables = []
    for name in shards:
        with pa.memory_map(os.path.join(path, name)) as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    return pa.concat_tables(tables)


def _columnar_rows(path: str, table: pa.Table, required_columns: Sequence[Sequence[str]]
                   ) -> Iterator[tuple[int, Any, None]]:
    missing = [" or ".join(group) for group in required_columns
               if not any(column in table.column_names for column in group)]
    if missing:
        raise KeyError(f"{path}: no column(s) {missing}; columns are {table.column_names}")
    for batch in table.to_batches(max_chunksize=1024):  # rows stream out a batch at a time
        for index, row in enumerate(batch.to_pylist()):
            yield index + 1, row, None


def _json_lines(path: str) -> Iterator[tuple[int, Any, BadRow | None]]:
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield line_number, None, BadRow("undecodable_bytes", f"not UTF-8 (byte {error.start})")
                continue
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line), None
            except json.JSONDecodeError as error:
                yield line_number, None, BadRow("invalid_json", f"invalid JSON ({error.msg} at column {error.colno})")


def _starts_with_array(path: str) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip()
    return head.startswith(b"[")


def read_rows(path: str, required_columns: Sequence[Sequence[str]]) -> Iterator[tuple[int, Any, BadRow | None]]:
    """Yields ``(line_number, row, bad)`` for every row of one file (``bad`` set when the
    line itself cannot be read; row numbers count from 1). ``required_columns``: groups of
    top-level columns a columnar file must have one of each (KeyError naming the file)."""
    kind = file_format(path)
    if kind == "parquet":
        yield from _columnar_rows(path, pq.read_table(path), required_columns)
    elif kind == "arrow_dir":
        yield from _columnar_rows(path, _arrow_dir_table(path), required_columns)
    elif kind == "json" and _starts_with_array(path):
        try:
            with open(path, encoding="utf-8") as handle:
                rows = json.load(handle)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: not a readable JSON array ({error})") from None
        for index, row in enumerate(rows):
            yield index + 1, row, None
    else:
        yield from _json_lines(path)
