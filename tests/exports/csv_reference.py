"""The CSV writer as it was before rows were quoted in bounded pieces: the reference for byte identity.

A straightforward flattening into a dict of path -> cell text per row, and one ``csv.writer`` call
per chunk. Tests and ``perf/`` compare :class:`exports.formats.CsvWriter` (and ``CsvColumns``) with it.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from exports.formats import FIXED_COLUMNS, FORMULA_STARTS, ROOT_COLUMN, ExportRow, _cell, _escape_key, _neutralise

_ENCODE = msgspec.json.Encoder().encode


def _decoder() -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(float_hook=msgspec.Raw)


def _collect_paths(obj: dict[str, Any], prefix: str, out: set[str]) -> None:
    for key, value in obj.items():
        if "." in key or "\\" in key:
            key = _escape_key(key)
        if type(value) is dict and value:
            _collect_paths(value, prefix + key + ".", out)
        else:
            out.add(prefix + key)


def reference_columns(rows: Sequence[ExportRow]) -> list[str]:
    """The sorted union of the rows' result columns."""
    decode = _decoder().decode
    seen: set[str] = set()
    for row in rows:
        value = decode(row.result)
        if type(value) is dict and value:
            _collect_paths(value, "", seen)
        else:
            seen.add(ROOT_COLUMN)
    return sorted(seen)


def _flatten_object(obj: dict[str, Any], prefix: str, out: dict[str, str], encode: Callable[[Any], bytes]) -> None:
    for key, value in obj.items():
        if "." in key or "\\" in key:
            key = _escape_key(key)
        kind = type(value)
        if kind is str:
            out[prefix + key] = "'" + value if value and value[0] in FORMULA_STARTS else value
        elif kind is dict:
            if value:
                _flatten_object(value, prefix + key + ".", out, encode)
            else:
                out[prefix + key] = "{}"
        elif kind is int:
            out[prefix + key] = str(value)
        else:
            out[prefix + key] = _cell(value, encode)


def flatten(raw: bytes) -> dict[str, str]:
    """Result column -> cell text of one stored result."""
    value = _decoder().decode(raw)
    out: dict[str, str] = {}
    if type(value) is dict and value:
        _flatten_object(value, "", out, _ENCODE)
    else:
        out[ROOT_COLUMN] = _cell(value, _ENCODE)
    return out


def lines(records: list[list[str]]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(records)
    return buffer.getvalue().encode("utf-8")


def reference_records(rows: Sequence[ExportRow], columns: Sequence[str]) -> list[list[str]]:
    records = []
    for row in rows:
        cells = flatten(row.result)
        assert set(cells) <= set(columns), "a row has a column outside columns"
        record = [_neutralise(row.job_id), _neutralise(row.status), row.created_at]
        record.extend([cells.get(column, "") for column in columns])
        records.append(record)
    return records


def reference_csv(chunks: Sequence[Sequence[ExportRow]], columns: Sequence[str] | None = None) -> bytes:
    """A whole CSV range export (header and rows) as the old writer wrote it."""
    if columns is None:
        columns = reference_columns([row for chunk in chunks for row in chunk])
    parts = [lines([[*FIXED_COLUMNS, *map(_neutralise, columns)]])]
    parts.extend(lines(reference_records(chunk, columns)) for chunk in chunks if chunk)
    return b"".join(parts)
