r"""Format writers for job result exports: JSON, NDJSON (newline-delimited JSON) and CSV.

The export pipeline asks :func:`make_writer` for a writer and streams
``begin() + encode(chunk) + encode(chunk) + ... + end()``; every call returns UTF-8 bytes. A writer is
pure code (no I/O) and holds the little state a stream needs, so use one writer per export.

Every format writes, per job, the fields ``job_id``, ``status``, ``created_at`` and ``result``, in
that order; json and ndjson then add ``labels``, the job's labels as an object (``{}`` when none).

``json`` (``application/json``)
    A single-job export is one object; a range export is one array of such objects, written
    ``[`` + objects separated by ``,`` + ``]`` (``[]`` for an empty range). The output ends with
    ``\n``. ``result`` is the stored JSON text embedded as it is (``msgspec.Raw``): never decoded,
    so numbers keep every digit, and on MariaDB it may span several lines; it is not validated.

``ndjson`` (``application/x-ndjson``, https://github.com/ndjson/ndjson-spec)
    One object per line, each line ending in ``\n`` and holding no other line break: ``result`` is
    minified with ``msgspec.json.format(indent=-1)``, which removes whitespace between tokens and
    leaves numbers and strings untouched. A single-job export is one line.

``csv`` (``text/csv; charset=utf-8``, RFC 4180)
    Written by Python's :mod:`csv` module (``excel`` dialect): fields separated by ``,``, quoted
    with ``"`` only when they hold ``,``, ``"``, CR or LF (inner ``"`` doubled), records ending in
    CRLF; UTF-8 without a byte order mark. A record of a large row is handed to :mod:`csv` in pieces
    of at most :data:`PIECE_CHARS` characters (:func:`_csv_bytes`); the bytes are the same.
    Header: ``job_id``, ``status``, ``created_at``, then the
    result columns sorted by code point (:class:`CsvColumns`). A result column is the path of a
    value in the result:

    * an object member gives a dot path: ``{"metrics": {"duration_ms": 5}}`` -> ``metrics.duration_ms``;
      inside a key, ``\`` is written ``\\`` and ``.`` is written ``\.``, so ``{"a.b": 1}`` gives
      ``a\.b`` and paths stay unambiguous;
    * an array is not exploded: its compact JSON text is one cell (``[1,"x"]``), re-encoded by
      msgspec, so its numbers keep their stored text but string escapes may be written differently;
    * an empty object is one cell holding ``{}`` at its path;
    * a result that is not a non-empty object (a string, number, ``true``, ``false``, ``null``, an
      array or ``{}``) is one column named ``result``.

    Cells: ``null`` -> empty cell; ``true``/``false`` -> ``true``/``false``; a number -> its JSON
    text as stored, digit for digit (``18446744073709551615``, ``0.1``, ``1.50``, ``-3``; on MySQL
    the stored text is MySQL's own rendering, e.g. ``1e2`` is stored as ``100.0``); a string -> its
    text. A job lacking a column has an empty cell there, so an empty cell means null or absent.

    Formula injection (OWASP "CSV Injection", https://owasp.org/www-community/attacks/CSV_Injection):
    a text cell (a JSON string, ``job_id``, ``status``) or a header starting with ``=``, ``+``,
    ``-``, ``@``, tab, CR or LF gets a ``'`` in front, so spreadsheets show it as text. Numbers are
    never changed (``-5`` the number stays ``-5``; ``"-5"`` the string becomes ``'-5``). This is
    lossy: the strings ``=1`` and ``'=1`` both come out as ``'=1``.

Chosen columns (``columns`` of an export, :mod:`exports.columns`): :class:`ChosenCsvWriter` writes
the three fixed columns and exactly the chosen ones, with no discovery pass; :class:`ProjectedWriter`
writes json or ndjson whose ``result`` holds only the chosen paths (:func:`project_result`) and, when
label columns are chosen, a ``labels`` member.

Decisions on what the rules leave open:

* ``single=True`` writers take exactly one row over the whole stream; a second row, or none by
  ``end()``, raises ``ValueError`` (a pipeline bug).
* CSV header names can repeat: a result key named ``job_id``, ``status`` or ``created_at`` gives a
  second column of that name, and a root scalar shares the column ``result`` with a top-level key
  ``result`` of other jobs in the range. Readers that map columns by name should use positions.
* A CSV range export with no rows is the header line alone.
* ``CsvColumns.columns()`` lists the result columns only (the internal paths, before the header's
  formula neutralisation); ``make_writer`` also accepts the list with the three fixed columns in
  front and drops them.
* Integers in a CSV cell are written in full; CPython refuses to convert integers longer than
  4300 digits to text (``ValueError``), far beyond the 64-bit integers MySQL stores exactly.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import msgspec

from exports.columns import ColumnSelection, PathNode, raw_members
from repositories.domain import FORMATS, Format

"""Export formats accepted by :func:`make_writer`."""
FIXED_COLUMNS: tuple[str, str, str] = ("job_id", "status", "created_at")
"""The first three CSV columns, in this order, before the result columns."""
ROOT_COLUMN = "result"
"""CSV column of a result that is not a non-empty object."""
FORMULA_STARTS = frozenset("=+-@\t\r\n")
"""First characters that make spreadsheets read a text cell as a formula (OWASP CSV Injection)."""
DEFAULT_MAX_COLUMNS = 10_000
"""Result columns a CSV export may have unless the caller says otherwise (``JOBRESULTS_CSV_MAX_COLUMNS``)."""


class CsvTooWide(Exception):
    """A CSV export would have more result columns than allowed; ``str()`` is safe to show clients."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the CSV would have more than {limit} result columns; export json or ndjson instead, or a narrower range"
        )
        self.limit = limit


class ExportRow(msgspec.Struct, frozen=True):
    """One job result to export.

    Attributes:
        job_id: the job id.
        status: ``succeeded``, ``failed`` or ``cancelled``.
        created_at: RFC 3339 UTC, already formatted, e.g. ``2026-11-29T14:05:04.651170Z``.
        result: the stored JSON text as the database returned it (any JSON value; MariaDB may
            return it pretty-printed over several lines).
        labels: the job's labels, key -> value (empty when it has none).
    """

    job_id: str
    status: str
    created_at: str
    result: bytes
    labels: dict[str, str] = msgspec.field(default_factory=dict)


class FormatWriter(Protocol):
    """Turns a stream of :class:`ExportRow` chunks into the bytes of one export file."""

    media_type: str
    """``Content-Type`` of the export."""
    extension: str
    """File name extension, without the dot."""

    def begin(self) -> bytes:
        """Bytes before the first row."""
        ...

    def encode(self, rows: Sequence[ExportRow]) -> bytes:
        """Bytes of one chunk of rows, in order; called once per chunk."""
        ...

    def end(self) -> bytes:
        """Bytes after the last row."""
        ...


class _Item(msgspec.Struct, gc=False):
    """Wire form of one job in JSON and NDJSON; field order is the key order."""

    job_id: str
    status: str
    created_at: str
    result: msgspec.Raw
    labels: dict[str, str]


def _decoder() -> msgspec.json.Decoder[Any]:
    # float_hook keeps each non-integer number as its JSON text (msgspec.Raw); integers of any
    # size decode to int, so no number goes through a float.
    return msgspec.json.Decoder(float_hook=msgspec.Raw)


def _neutralise(text: str) -> str:
    """``text`` with ``'`` in front if it starts like a spreadsheet formula."""
    if text and text[0] in FORMULA_STARTS:
        return "'" + text
    return text


def _escape_key(key: str) -> str:
    return key.replace("\\", "\\\\").replace(".", "\\.")


class _SingleGuard:
    """Counts rows of a ``single=True`` export: exactly one over the whole stream."""

    def __init__(self, single: bool) -> None:
        self._single = single
        self._rows = 0

    def take(self, count: int) -> None:
        self._rows += count
        if self._single and self._rows > 1:
            raise ValueError(f"single-job export got {self._rows} rows; expected exactly one")

    def finish(self) -> None:
        if self._single and self._rows != 1:
            raise ValueError("single-job export ended without its row")


class JsonWriter:
    """``json``: one object (single) or one array of objects streamed across chunks (range)."""

    media_type = "application/json"
    extension = "json"

    def __init__(self, *, single: bool) -> None:
        self._single = single
        self._guard = _SingleGuard(single)
        self._encoder = msgspec.json.Encoder()
        self._written = False

    def begin(self) -> bytes:
        """``[`` for a range export, nothing for a single job."""
        return b"" if self._single else b"["

    def encode(self, rows: Sequence[ExportRow]) -> bytes:
        """The chunk's objects, with the ``,`` that separates them from earlier chunks.

        Raises:
            ValueError: a single-job export got more than one row.
        """
        if not rows:
            return b""
        self._guard.take(len(rows))
        items = [_Item(row.job_id, row.status, row.created_at, msgspec.Raw(row.result), row.labels) for row in rows]
        if self._single:
            return self._encoder.encode(items[0])
        array = self._encoder.encode(items)  # b"[a,b,...]"
        if self._written:
            return b"," + array[1:-1]
        self._written = True
        return array[1:-1]

    def end(self) -> bytes:
        r"""``]\n`` for a range export, ``\n`` for a single job.

        Raises:
            ValueError: a single-job export got no row.
        """
        self._guard.finish()
        return b"\n" if self._single else b"]\n"


class NdjsonWriter:
    """``ndjson``: one minified object per line."""

    media_type = "application/x-ndjson"
    extension = "ndjson"

    def __init__(self, *, single: bool) -> None:
        self._guard = _SingleGuard(single)
        self._encoder = msgspec.json.Encoder()

    def begin(self) -> bytes:
        """Nothing."""
        return b""

    def encode(self, rows: Sequence[ExportRow]) -> bytes:
        r"""One ``\n``-terminated line per row.

        Raises:
            ValueError: a single-job export got more than one row.
            msgspec.DecodeError: a stored result is not JSON.
        """
        self._guard.take(len(rows))
        minify = msgspec.json.format
        return self._encoder.encode_lines(
            [
                _Item(row.job_id, row.status, row.created_at, msgspec.Raw(minify(row.result, indent=-1)), row.labels)
                for row in rows
            ]
        )

    def end(self) -> bytes:
        """Nothing.

        Raises:
            ValueError: a single-job export got no row.
        """
        self._guard.finish()
        return b""


def _path_entry(parent: str | None, key: str) -> list[Any]:
    """A new node of a path tree: ``[path, mark, children]`` for ``key`` under the path ``parent``."""
    if "." in key or "\\" in key:
        key = _escape_key(key)
    return [key if parent is None else parent + "." + key, None, {}]


def _collect(obj: dict[str, Any], node: dict[str, list[Any]], parent: str | None, seen: set[str]) -> None:
    """Add the result columns of a non-empty object to ``seen``; ``node`` caches each key's path.

    A node's mark is True once its path was added, so a path seen before costs one dict lookup.
    """
    for key, value in obj.items():
        entry = node.get(key)
        if entry is None:
            entry = node[key] = _path_entry(parent, key)
        if type(value) is dict and value:
            _collect(value, entry[2], entry[0], seen)
        elif entry[1] is None:
            entry[1] = True
            seen.add(entry[0])


class CsvColumns:
    """Pass 1 of a CSV range export: collects the union of result columns over all rows.

    ``max_columns`` bounds the union: one document with 100,000 keys would otherwise turn a small
    stored result into a CSV file of 100,000 mostly empty columns per row.
    """

    def __init__(self, max_columns: int = DEFAULT_MAX_COLUMNS) -> None:
        self._decoder = _decoder()
        self._seen: set[str] = set()
        self._tree: dict[str, list[Any]] = {}
        self._max_columns = max_columns

    def add(self, rows: Sequence[ExportRow]) -> None:
        """Add the result columns of ``rows``.

        Raises:
            msgspec.DecodeError: a stored result is not JSON.
            CsvTooWide: the columns seen so far pass ``max_columns``.
        """
        self.add_results([row.result for row in rows])

    def add_results(self, results: Iterable[bytes | str]) -> None:
        """Add the result columns of stored results (JSON text, as bytes or str).

        Raises:
            msgspec.DecodeError: a stored result is not JSON.
            CsvTooWide: the columns seen so far pass ``max_columns``.
        """
        decode = self._decoder.decode
        seen, tree = self._seen, self._tree
        for result in results:
            # A long str is decoded several times faster as bytes (15 MB: 7 against 30 ms or more,
            # in one call holding the GIL); the encode is a copy for ASCII text.
            value = decode(result.encode("utf-8") if type(result) is str and len(result) > 65536 else result)
            if type(value) is dict and value:
                _collect(value, tree, None, seen)
            else:
                seen.add(ROOT_COLUMN)
            if len(seen) > self._max_columns:
                raise CsvTooWide(self._max_columns)

    def columns(self) -> list[str]:
        """The result columns seen so far, sorted by code point (the fixed three not included)."""
        return sorted(self._seen)


def csv_columns_of(rows: Sequence[ExportRow]) -> list[str]:
    """The result columns of ``rows`` in CSV order: :class:`CsvColumns` over ``rows``."""
    collector = CsvColumns()
    collector.add(rows)
    return collector.columns()


LARGE_ROW_BYTES = 1 << 20
"""A row whose stored result has at least this many bytes is quoted in pieces (:func:`_csv_bytes`)."""
PIECE_CHARS = 1 << 18
"""Most characters the :mod:`csv` module quotes in one call for a large row, and most bytes of stored
results whose rows are quoted in one ``writerows`` call: each call holds the GIL for a bounded time."""


def _csv_text(records: Sequence[Sequence[Any]]) -> str:
    """``records`` as RFC 4180 text by :mod:`csv` (``excel`` dialect), each ending in CRLF."""
    buffer = io.StringIO()
    csv.writer(buffer).writerows(records)
    return buffer.getvalue()


def _csv_fields(fields: list[Any]) -> str:
    """Several consecutive fields of one record as :mod:`csv` writes them within the record."""
    if len(fields) == 1 and fields[0] == "":
        return ""  # csv writes a record of one empty field as '""'; inside a record it is empty
    return _csv_text([fields])[:-2]


def _csv_large_field(text: str, out: list[bytes]) -> None:
    """Append the UTF-8 bytes of one long field, as :mod:`csv` writes it, to ``out`` in pieces.

    The :mod:`csv` module quotes a field when any of its characters needs it and doubles each ``"``
    in it, character by character, so quoting the field's slices one by one gives the same text:
    the field is quoted if a slice was, and each slice contributes its text without the quotes.
    Between slices the GIL is offered to other threads (``time.sleep(0)``).
    """
    pieces: list[str] = []
    quoted = False
    for start in range(0, len(text), PIECE_CHARS):
        piece = _csv_text([[text[start : start + PIECE_CHARS]]])[:-2]
        if piece[:1] == '"':
            quoted = True
            piece = piece[1:-1]
        pieces.append(piece)
        time.sleep(0)
    if quoted:
        out.append(b'"')
    for piece in pieces:
        out.append(piece.encode("utf-8"))
        time.sleep(0)
    if quoted:
        out.append(b'"')


def _csv_large_record(record: Sequence[Any], out: list[bytes]) -> None:
    """Append one record with long fields to ``out``, in pieces of at most :data:`PIECE_CHARS`."""
    group: list[Any] = []
    size = 0
    first = True

    def flush() -> None:
        nonlocal first, size
        if not first:
            out.append(b",")
        out.append(_csv_fields(group).encode("utf-8"))
        first = False
        group.clear()
        size = 0
        time.sleep(0)

    for field in record:
        length = len(field) if type(field) is str else 0
        if length > PIECE_CHARS:
            if group:
                flush()
            if not first:
                out.append(b",")
            _csv_large_field(field, out)
            first = False
            continue
        if group and size + length > PIECE_CHARS:
            flush()
        group.append(field)
        size += length
    if group:
        flush()
    out.append(b"\r\n")


def _csv_bytes(records: Sequence[Sequence[Any]], weights: Sequence[int]) -> bytes:
    """UTF-8 bytes of ``records`` as the :mod:`csv` module (``excel`` dialect) writes them.

    ``weights[i]`` bounds the characters of ``records[i]`` (the length of its stored result). Rows
    are quoted by ``writerows`` in batches of at most :data:`PIECE_CHARS` of weight; a row weighing
    :data:`LARGE_ROW_BYTES` or more is quoted field by field and long fields slice by slice
    (:func:`_csv_large_record`), so no single call holds the GIL for long (a 15 MB cell took about
    140 ms in one ``writerows``) and the bytes are those of one ``writerows`` call.
    """
    out: list[bytes] = []
    start = 0
    batch = 0
    for i, weight in enumerate(weights):
        if weight >= LARGE_ROW_BYTES:
            if start < i:
                out.append(_csv_text(records[start:i]).encode("utf-8"))
            _csv_large_record(records[i], out)
            start, batch = i + 1, 0
            continue
        batch += weight
        if batch >= PIECE_CHARS:
            out.append(_csv_text(records[start : i + 1]).encode("utf-8"))
            start, batch = i + 1, 0
    if start < len(records):
        out.append(_csv_text(records[start:]).encode("utf-8"))
    return out[0] if len(out) == 1 else b"".join(out)


def _fill(
    obj: dict[str, Any],
    node: dict[str, list[Any]],
    parent: str | None,
    record: list[Any],
    index: dict[str, int],
) -> None:
    """Put the cells of a non-empty object into ``record`` at their columns' positions.

    ``node`` caches each key's ``[path, position, children]`` (position None: not a column, which
    makes the assignment raise ``TypeError``). Integers stay ``int``: :mod:`csv` writes ``str(n)``.
    """
    for key, value in obj.items():
        entry = node.get(key)
        if entry is None:
            entry = node[key] = _path_entry(parent, key)
            entry[1] = index.get(entry[0])
        kind = type(value)
        # The common kinds inline, in order of frequency; the rest as in _cell.
        if kind is str:
            record[entry[1]] = "'" + value if value and value[0] in FORMULA_STARTS else value
        elif kind is dict:
            if value:
                _fill(value, entry[2], entry[0], record, index)
            else:
                record[entry[1]] = "{}"
        elif kind is int:
            record[entry[1]] = value
        else:
            record[entry[1]] = _cell(value, _ENCODE)


def _flat(
    obj: dict[str, Any],
    node: dict[str, list[Any]],
    parent: str | None,
    ids: list[int],
    cells: list[Any],
    paths: list[str],
) -> None:
    """Append the column ids and cells of a non-empty object, in document order.

    ``node`` caches each key's ``[path, column id or None, children]``; a new leaf path gets the next id
    (its index in ``paths``). Integers become their text here (the spool's msgpack holds 64 bits at most).
    """
    for key, value in obj.items():
        entry = node.get(key)
        if entry is None:
            entry = node[key] = _path_entry(parent, key)
        kind = type(value)
        if kind is dict and value:
            _flat(value, entry[2], entry[0], ids, cells, paths)
            continue
        column = entry[1]
        if column is None:
            column = entry[1] = len(paths)
            paths.append(entry[0])
        ids.append(column)
        if kind is str:
            cells.append("'" + value if value and value[0] in FORMULA_STARTS else value)
        elif kind is int:
            cells.append(str(value))
        elif kind is dict:
            cells.append("{}")
        else:
            cells.append(_cell(value, _ENCODE))


class CsvFlattener:
    """Pass 1 of a full CSV range export that keeps each row's cells for pass 2.

    :meth:`flatten` gives a row's column ids and cell texts (ids number the columns in the order they
    were first seen); after the last row, :meth:`columns` gives the header's result columns and
    :meth:`positions` each id's place in a record, for :meth:`CsvWriter.encode_flat`. Cells follow
    the module's rules exactly as :class:`CsvWriter` writes them. ``max_columns`` as in :class:`CsvColumns`.
    """

    def __init__(self, max_columns: int = DEFAULT_MAX_COLUMNS) -> None:
        self._decode = _decoder().decode
        self._tree: dict[str, list[Any]] = {}
        self._paths: list[str] = []
        self._max_columns = max_columns

    def flatten(self, result: bytes | str) -> tuple[list[int], list[Any]]:
        """``(column ids, cells)`` of one stored result (JSON text).

        Raises:
            msgspec.DecodeError: the result is not JSON.
            CsvTooWide: the columns seen so far pass ``max_columns``.
        """
        value = self._decode(result.encode("utf-8") if type(result) is str and len(result) > 65536 else result)
        ids: list[int] = []
        cells: list[Any] = []
        if type(value) is dict and value:
            _flat(value, self._tree, None, ids, cells, self._paths)
        else:
            # The root's column is the top-level key "result"'s column too.
            entry = self._tree.get(ROOT_COLUMN)
            if entry is None:
                entry = self._tree[ROOT_COLUMN] = _path_entry(None, ROOT_COLUMN)
            if entry[1] is None:
                entry[1] = len(self._paths)
                self._paths.append(ROOT_COLUMN)
            ids.append(entry[1])
            cells.append(_cell(value, _ENCODE))
        if len(self._paths) > self._max_columns:
            raise CsvTooWide(self._max_columns)
        return ids, cells

    def columns(self) -> list[str]:
        """The result columns seen so far, sorted by code point (the fixed three not included)."""
        return sorted(self._paths)

    def positions(self) -> list[int]:
        """Column id -> position in a record (the three fixed columns first), for :meth:`columns`."""
        rank = {path: position for position, path in enumerate(sorted(self._paths), start=3)}
        return [rank[path] for path in self._paths]


def _paths_of(value: Any) -> set[str]:
    """The result columns of one decoded result."""
    seen: set[str] = set()
    if type(value) is dict and value:
        _collect(value, {}, None, seen)
    else:
        seen.add(ROOT_COLUMN)
    return seen


class CsvWriter:
    """``csv``: RFC 4180 with a header row; see the module docstring for columns and cells."""

    media_type = "text/csv; charset=utf-8"
    extension = "csv"

    def __init__(self, *, single: bool, columns: Sequence[str] | None, max_columns: int = DEFAULT_MAX_COLUMNS) -> None:
        if columns is None and not single:
            raise ValueError("a CSV range export needs csv_columns (collect them first with CsvColumns)")
        self._guard = _SingleGuard(single)
        self._decoder = _decoder()
        self._columns: list[str] | None = None
        self._index: dict[str, int] = {}
        self._copies: list[tuple[int, int]] = []
        self._tree: dict[str, list[Any]] = {}
        self._blank: list[Any] = []
        self._root = 0
        self._max_columns = max_columns
        if columns is not None:
            self._set_columns(columns)

    def _set_columns(self, columns: Sequence[str]) -> None:
        names = list(columns)
        if tuple(names[:3]) == FIXED_COLUMNS:
            # Sorted result columns never start like this (created_at < job_id), so this is the
            # full header list, not result columns.
            names = names[3:]
        self._columns = names
        # Record positions: the three fixed columns first. A repeated name keeps its last position
        # (the rows then leave the others empty).
        self._index = {name: position for position, name in enumerate(names, start=3)}
        # A name given twice gets the same cell at each of its positions.
        self._copies = [
            (self._index[name], position)
            for position, name in enumerate(names, start=3)
            if self._index[name] != position
        ]
        self._tree = {}
        self._blank = [""] * (3 + len(names))
        self._root = self._index.get(ROOT_COLUMN, -1)

    def _header(self) -> list[str]:
        assert self._columns is not None
        return [*FIXED_COLUMNS, *map(_neutralise, self._columns)]

    def begin(self) -> bytes:
        """The header line; for a single job without given columns, it comes with the row instead."""
        if self._columns is None:
            return b""
        return _csv_text([self._header()]).encode("utf-8")

    def encode(self, rows: Sequence[ExportRow]) -> bytes:
        """One CSV record per row.

        Raises:
            ValueError: a result has a column missing from ``csv_columns``, or a single-job export
                got more than one row.
            CsvTooWide: a single-job export's result has more than ``max_columns`` columns.
            msgspec.DecodeError: a stored result is not JSON.
        """
        if not rows:
            return b""
        self._guard.take(len(rows))
        records: list[Sequence[Any]] = []
        weights: list[int] = []
        decode = self._decoder.decode
        if self._columns is None:
            cells = _paths_of(decode(rows[0].result))
            if len(cells) > self._max_columns:
                raise CsvTooWide(self._max_columns)
            self._set_columns(sorted(cells))
            records.append(self._header())
            weights.append(0)
        blank, tree, index, root, copies = self._blank, self._tree, self._index, self._root, self._copies
        for row in rows:
            value = decode(row.result)
            record = blank.copy()
            job_id, status = row.job_id, row.status
            record[0] = "'" + job_id if job_id and job_id[0] in FORMULA_STARTS else job_id
            record[1] = "'" + status if status and status[0] in FORMULA_STARTS else status
            record[2] = row.created_at
            try:
                if type(value) is dict and value:
                    _fill(value, tree, None, record, index)
                elif root >= 0:
                    record[root] = _cell(value, _ENCODE)
                else:
                    raise TypeError(ROOT_COLUMN)
            except TypeError:
                unknown = sorted(_paths_of(value) - index.keys())
                if not unknown:
                    raise
                raise ValueError(f"job {row.job_id!r} has result columns not in csv_columns: {unknown[:5]}") from None
            for source, target in copies:
                record[target] = record[source]
            records.append(record)
            weights.append(len(row.result))
        return _csv_bytes(records, weights)

    def encode_flat(self, rows: Sequence[Sequence[Any]], positions: Sequence[int]) -> bytes:
        """One CSV record per row flattened by :class:`CsvFlattener` (a range export's pass 2).

        ``rows``: ``(job_id, status, created_at, column ids, cells, weight)`` each, ``weight`` the length
        of the stored result; ``positions``: :meth:`CsvFlattener.positions`, for the columns this
        writer was made with (:meth:`CsvFlattener.columns`).
        """
        if not rows:
            return b""
        self._guard.take(len(rows))
        blank = self._blank
        records: list[list[Any]] = []
        weights: list[int] = []
        place = positions.__getitem__
        for job_id, status, created_at, ids, cells, weight in rows:
            record = blank.copy()
            record[0] = "'" + job_id if job_id and job_id[0] in FORMULA_STARTS else job_id
            record[1] = "'" + status if status and status[0] in FORMULA_STARTS else status
            record[2] = created_at
            for position, cell in zip(map(place, ids), cells, strict=True):
                record[position] = cell
            records.append(record)
            weights.append(weight)
        return _csv_bytes(records, weights)

    def end(self) -> bytes:
        """Nothing.

        Raises:
            ValueError: a single-job export got no row.
        """
        self._guard.finish()
        return b""


def _cell(value: Any, encode: Callable[[Any], bytes]) -> str:
    """Cell text of a decoded JSON value other than a non-empty object."""
    kind = type(value)
    if kind is str:
        return _neutralise(value)
    if kind is int:
        return str(value)
    if kind is msgspec.Raw:  # a non-integer number, as its JSON text
        return bytes(value).decode("ascii")
    if value is None:
        return ""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if kind is dict:  # empty
        return "{}"
    return encode(value).decode("utf-8")  # an array, as compact JSON


def make_writer(
    fmt: Format,
    *,
    single: bool,
    csv_columns: Sequence[str] | None = None,
    max_columns: int = DEFAULT_MAX_COLUMNS,
    columns: ColumnSelection | None = None,
) -> FormatWriter:
    """A fresh writer for one export.

    Args:
        fmt: ``json``, ``ndjson`` or ``csv``.
        single: a single-job export (exactly one row) rather than a range.
        csv_columns: CSV only: the result columns, from :meth:`CsvColumns.columns` (required for a
            range; for a single job the row's own columns are used when omitted). Ignored by the
            other formats.
        max_columns: CSV only: the most result columns a single-job export may have (a range's
            columns are bounded by :class:`CsvColumns`).
        columns: the columns the client chose (:func:`exports.columns.parse_columns`); then
            ``csv_columns`` and ``max_columns`` are not used, and no column discovery is needed.

    Raises:
        ValueError: unknown format, or a CSV range export without ``csv_columns`` or ``columns``.
    """
    if columns is not None:
        if fmt == "csv":
            return ChosenCsvWriter(single=single, columns=columns)
        if fmt in ("json", "ndjson"):
            return ProjectedWriter(single=single, columns=columns, lines=fmt == "ndjson")
    if fmt == "json":
        return JsonWriter(single=single)
    if fmt == "ndjson":
        return NdjsonWriter(single=single)
    if fmt == "csv":
        return CsvWriter(single=single, columns=csv_columns, max_columns=max_columns)
    raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")


# --- chosen columns ------------------------------------------------------------------------------


class _Projected(msgspec.Struct, gc=False):
    """Wire form of one job with chosen columns and no label column."""

    job_id: str
    status: str
    created_at: str
    result: msgspec.Raw


class _ProjectedLabelled(msgspec.Struct, gc=False):
    """Wire form of one job with chosen columns, label columns among them."""

    job_id: str
    status: str
    created_at: str
    labels: dict[str, str]
    result: msgspec.Raw


def _project(members: dict[str, msgspec.Raw], tree: dict[str, PathNode]) -> dict[str, Any]:
    """The chosen part of an object, in document order: chosen values as their stored text (``Raw``)."""
    out: dict[str, Any] = {}
    for key, value in members.items():
        node = tree.get(key)
        if node is None:
            continue
        if node.chosen:
            out[key] = value
            continue
        inner = raw_members(value)
        if inner is not None:
            picked = _project(inner, node.children)
            if picked:
                out[key] = picked
    return out


def project_result(raw: bytes, columns: ColumnSelection) -> bytes:
    """The JSON text of ``raw`` reduced to the chosen result paths (``{}`` if none is present).

    Same shape as the document: each chosen value sits at its path inside the objects leading to it,
    with its stored text unchanged (numbers digit for digit, strings as escaped when stored). Objects
    keep the document's member order; their keys are written by msgspec (a key's escapes may change,
    its text does not). A result that is not an object has no paths: ``{}``.

    Raises:
        msgspec.DecodeError: ``raw`` is not JSON.
    """
    if not columns.has_paths:
        return b"{}"
    members = raw_members(raw)
    if members is None:
        return b"{}"
    return _ENCODE(_project(members, columns.tree))


_ENCODE = msgspec.json.Encoder().encode


class ProjectedWriter:
    """``json`` or ``ndjson`` with chosen columns: ``result`` holds only the chosen paths.

    The files are laid out as :class:`JsonWriter` (``lines=False``) and :class:`NdjsonWriter`
    (``lines=True``) lay them out; ``result`` is :func:`project_result`. When label columns are
    chosen, a ``labels`` member (after ``created_at``) holds those of them the job has; without label
    columns there is no ``labels`` member.
    """

    def __init__(self, *, single: bool, columns: ColumnSelection, lines: bool) -> None:
        self._single = single
        self._lines = lines
        self._columns = columns
        self._guard = _SingleGuard(single)
        self._written = False
        self.media_type = NdjsonWriter.media_type if lines else JsonWriter.media_type
        self.extension = NdjsonWriter.extension if lines else JsonWriter.extension

    def begin(self) -> bytes:
        """``[`` for a json range export, else nothing."""
        return b"[" if not (self._single or self._lines) else b""

    def _item(self, row: ExportRow) -> _Projected | _ProjectedLabelled:
        result = project_result(row.result, self._columns)
        if self._lines:
            result = msgspec.json.format(result, indent=-1)
        if not self._columns.label_keys:
            return _Projected(row.job_id, row.status, row.created_at, msgspec.Raw(result))
        labels = {key: row.labels[key] for key in self._columns.label_keys if key in row.labels}
        return _ProjectedLabelled(row.job_id, row.status, row.created_at, labels, msgspec.Raw(result))

    def encode(self, rows: Sequence[ExportRow]) -> bytes:
        """The chunk's objects (json: with the separating ``,``; ndjson: one line each).

        Raises:
            ValueError: a single-job export got more than one row.
            msgspec.DecodeError: a stored result is not JSON.
        """
        if not rows:
            return b""
        self._guard.take(len(rows))
        items = [self._item(row) for row in rows]
        if self._lines:
            return _ENCODER.encode_lines(items)
        if self._single:
            return _ENCODE(items[0])
        array = _ENCODE(items)
        if self._written:
            return b"," + array[1:-1]
        self._written = True
        return array[1:-1]

    def end(self) -> bytes:
        r"""json: ``]\n`` for a range, ``\n`` for a single job; ndjson: nothing.

        Raises:
            ValueError: a single-job export got no row.
        """
        self._guard.finish()
        if self._lines:
            return b""
        return b"\n" if self._single else b"]\n"


_ENCODER = msgspec.json.Encoder()


def _chosen_cell(raw: msgspec.Raw | bytes, decode: Callable[[Any], Any]) -> str:
    """Cell text of a chosen value: as in the flattened CSV, and a non-empty object as compact JSON."""
    value = decode(raw)
    if type(value) is dict and value:
        return _ENCODE(value).decode("utf-8")
    return _cell(value, _ENCODE)


def _chosen_cells(
    members: dict[str, msgspec.Raw],
    tree: dict[str, PathNode],
    prefix: tuple[str, ...],
    out: dict[tuple[str, ...], str],
    decode: Callable[[Any], Any],
) -> None:
    for key, node in tree.items():
        value = members.get(key)
        if value is None:
            continue
        path = (*prefix, key)
        if node.chosen:
            out[path] = _chosen_cell(value, decode)
        if node.children:
            inner = raw_members(value)
            if inner is not None:
                _chosen_cells(inner, node.children, path, out, decode)


class ChosenCsvWriter:
    """``csv`` with chosen columns: the header is the three fixed columns, then exactly ``columns``.

    No discovery pass: each row's cells are looked up by path. A cell follows the rules of the
    flattened CSV (module docstring): a string neutralised, a number as stored, ``null`` empty, an
    array or empty object as compact JSON; a chosen path that holds a non-empty object (which the
    flattened CSV spreads over its leaves) is its compact JSON text too, re-encoded like an array. The
    path ``result`` also names the whole result when that is not a non-empty object, as the flattened
    CSV's ``result`` column does. A path the row lacks, or a label it lacks, is an empty cell. A label
    cell is the label's value, neutralised like any text cell.
    """

    media_type = "text/csv; charset=utf-8"
    extension = "csv"

    def __init__(self, *, single: bool, columns: ColumnSelection) -> None:
        self._guard = _SingleGuard(single)
        self._columns = columns
        self._decode = _decoder().decode
        self._root = (ROOT_COLUMN,)
        self._root_chosen = (ROOT_COLUMN,) in columns.paths

    def begin(self) -> bytes:
        """The header line."""
        return _csv_text([[*FIXED_COLUMNS, *map(_neutralise, self._columns.columns)]]).encode("utf-8")

    def _cells(self, raw: bytes) -> dict[tuple[str, ...], str]:
        out: dict[tuple[str, ...], str] = {}
        members = raw_members(raw)
        if members:
            _chosen_cells(members, self._columns.tree, (), out, self._decode)
        elif self._root_chosen:
            out[self._root] = _chosen_cell(raw, self._decode)
        return out

    def encode(self, rows: Sequence[ExportRow]) -> bytes:
        """One CSV record per row.

        Raises:
            ValueError: a single-job export got more than one row.
            msgspec.DecodeError: a stored result is not JSON.
        """
        if not rows:
            return b""
        self._guard.take(len(rows))
        paths, labels = self._columns.paths, self._columns.labels
        read_result = self._columns.has_paths
        records: list[list[str]] = []
        for row in rows:
            cells = self._cells(row.result) if read_result else {}
            record = [_neutralise(row.job_id), _neutralise(row.status), row.created_at]
            for path, label in zip(paths, labels, strict=True):
                if path is None:
                    record.append(_neutralise(row.labels.get(label, "")) if label is not None else "")
                else:
                    record.append(cells.get(path, ""))
            records.append(record)
        return _csv_bytes(records, [len(row.result) for row in rows])

    def end(self) -> bytes:
        """Nothing.

        Raises:
            ValueError: a single-job export got no row.
        """
        self._guard.finish()
        return b""
