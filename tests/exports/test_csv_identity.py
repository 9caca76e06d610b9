"""CSV bytes: the writer against the reference (the plain flatten-and-``csv.writer`` one it replaced) and
against Python's :mod:`csv` module directly, on generated documents, all real documents and long cells.
"""

from __future__ import annotations

import csv
import io
import json
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exports import formats
from exports.columns import parse_columns
from exports.formats import CsvColumns, CsvFlattener, CsvWriter, ExportRow, make_writer
from exports.pipeline import CsvSpool, _encode_spooled
from tests.conftest import REALDATA
from tests.exports.csv_reference import lines, reference_csv

TS = "2026-11-29T14:05:04.651170Z"
REAL_FILES = sorted(p for p in REALDATA.glob("*/*.json") if p.name != "govulncheck-json-stream.json")


def writer_csv(chunks: list[list[ExportRow]], max_columns: int = formats.DEFAULT_MAX_COLUMNS) -> bytes:
    """A CSV range export the way the pipeline runs it (pass 1 over the results, pass 2 writing)."""
    collector = CsvColumns(max_columns)
    for chunk in chunks:
        collector.add_results([row.result for row in chunk])
    writer = make_writer("csv", single=False, csv_columns=collector.columns())
    return writer.begin() + b"".join(writer.encode(chunk) for chunk in chunks) + writer.end()


def spooled_csv(chunks: list[list[ExportRow]], max_columns: int = formats.DEFAULT_MAX_COLUMNS) -> bytes:
    """A full CSV range export the way the pipeline runs it: pass 1 flattens into a spool, pass 2 writes."""
    spool = CsvSpool(CsvFlattener(max_columns), None)
    try:
        for chunk in chunks:
            # As the stream gives them: b"<job_id> <status> <created_at>" and the JSON text as str.
            spool.add([(f"{r.job_id} {r.status} {r.created_at}".encode(), r.result.decode()) for r in chunk])
        spool.rewind()
        writer = CsvWriter(single=False, columns=spool.flattener.columns())
        parts = [writer.begin()]
        positions = spool.flattener.positions()
        while (encoded := _encode_spooled(writer, spool, positions)) is not None:
            parts.append(encoded[1])
        parts.append(writer.end())
        return b"".join(parts)
    finally:
        spool.close()


def rewritten(data: bytes) -> bytes:
    """``data`` read by :mod:`csv` and written again by it: equal to ``data`` iff it is csv's own quoting."""
    records = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    return lines(records)


@pytest.fixture(autouse=True, scope="module")
def _large_csv_fields() -> Iterator[None]:
    old = csv.field_size_limit(2**31 - 1)
    yield
    csv.field_size_limit(old)


# --- generated documents ---------------------------------------------------------------------------

KEY_CHARS = string.ascii_letters[:6] + ".\\=+-@\t\r\n ,\"'é"
TEXT_CHARS = st.characters(codec="utf-8") | st.sampled_from(list("\",\r\n=+-@\t'x "))
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(TEXT_CHARS, max_size=12)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(KEY_CHARS, max_size=4), inner, max_size=4),
    max_leaves=12,
)
DOCUMENTS = VALUES | st.dictionaries(st.text(KEY_CHARS, max_size=4), VALUES, max_size=5)


def as_rows(documents: list[Any], texts: list[bool]) -> list[ExportRow]:
    rows = []
    for i, (document, pretty) in enumerate(zip(documents, texts, strict=True)):
        text = json.dumps(document, indent=2 if pretty else None, ensure_ascii=not pretty)
        rows.append(
            ExportRow(f"job-{i}" if i % 3 else f"-job{i}", "succeeded" if i % 2 else "=failed", TS, text.encode())
        )
    return rows


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(DOCUMENTS, st.booleans()), min_size=1, max_size=8), st.integers(1, 4))
def test_generated_documents_give_the_reference_bytes(documents: list[tuple[Any, bool]], chunk: int) -> None:
    rows = as_rows([d for d, _ in documents], [p for _, p in documents])
    chunks = [rows[i : i + chunk] for i in range(0, len(rows), chunk)]
    out = writer_csv(chunks)
    assert out == reference_csv(chunks)
    assert rewritten(out) == out
    assert spooled_csv(chunks) == out


@settings(max_examples=100, deadline=None)
@given(DOCUMENTS)
def test_single_job_export_gives_the_reference_bytes(document: Any) -> None:
    (row,) = as_rows([document], [False])
    writer = make_writer("csv", single=True)
    out = writer.begin() + writer.encode([row]) + writer.end()
    assert out == reference_csv([[row]])


def test_repeated_given_column_gets_the_cell_at_each_position() -> None:
    row = ExportRow("j", "succeeded", TS, b'{"a": "x", "b": 2}')
    writer = make_writer("csv", single=False, csv_columns=["a", "b", "a"])
    out = writer.begin() + writer.encode([row])
    assert out == reference_csv([[row]], ["a", "b", "a"])
    assert out.splitlines()[1] == f"j,succeeded,{TS},x,2,x".encode()


# --- real documents ----------------------------------------------------------------------------------


@pytest.mark.skipif(not REAL_FILES, reason=f"no real data at {REALDATA}")
def test_all_real_documents_in_one_range_give_the_reference_bytes() -> None:
    rows = [ExportRow(f"real-{i}", "succeeded", TS, path.read_bytes()) for i, path in enumerate(REAL_FILES)]
    chunks = [rows[i : i + 4] for i in range(0, len(rows), 4)]
    out = writer_csv(chunks)
    assert out == reference_csv(chunks)
    assert rewritten(out) == out
    assert spooled_csv(chunks) == out


def test_spooled_columns_are_bounded() -> None:
    rows = [ExportRow("j", "succeeded", TS, b'{"a": 1, "b": {"c": 2}}'), ExportRow("k", "failed", TS, b'{"d": 3}')]
    assert spooled_csv([rows], max_columns=3) == reference_csv([rows])
    with pytest.raises(formats.CsvTooWide):
        spooled_csv([rows], max_columns=2)


@pytest.mark.skipif(not REAL_FILES, reason=f"no real data at {REALDATA}")
@pytest.mark.parametrize("path", REAL_FILES, ids=lambda p: p.parent.name + "/" + p.name)
def test_each_real_document_single_and_chosen_columns(path: Path) -> None:
    row = ExportRow("real-1", "succeeded", TS, path.read_bytes())
    single = make_writer("csv", single=True)
    out = single.begin() + single.encode([row]) + single.end()
    assert out == reference_csv([[row]])
    # Chosen columns: every tenth leaf column of the full export; each cell must be the full export's.
    header, record = list(csv.reader(io.StringIO(out.decode("utf-8"), newline="")))
    picked = [i for i in range(3, len(header)) if i % 10 == 3 and not header[i].startswith("'")]
    if not picked:
        pytest.skip("no column to choose")
    columns = [header[i] for i in picked]
    chosen = make_writer("csv", single=False, columns=parse_columns(columns))
    out = chosen.begin() + chosen.encode([row]) + chosen.end()
    assert out == lines([[*header[:3], *columns], [*record[:3], *(record[i] for i in picked)]])


# --- long cells ------------------------------------------------------------------------------------


def long_text(size: int, seed: int) -> str:
    """``size`` characters with quotes, commas, line breaks, non-ASCII and emoji around the slice edges."""
    base = "abc" * (size // 3)
    specials = ['"', ",", "\r\n", "é", "😀", '""']
    edges = [formats.PIECE_CHARS * k + d for k in range(1, size // formats.PIECE_CHARS + 1) for d in (-1, 0, 1)]
    text = list(base)
    for n, at in enumerate(edges[seed % 2 :: 2]):
        if at < len(text):
            text[at] = specials[(n + seed) % len(specials)]
    return "".join(text)


@pytest.mark.parametrize(
    "record",
    [
        ["j", "succeeded", TS, long_text(3 * formats.PIECE_CHARS + 7, 0)],
        ["j", "succeeded", TS, long_text(2 * formats.PIECE_CHARS + 1, 1), "", 5, "x,y"],
        [long_text(formats.PIECE_CHARS + 2, 1), long_text(formats.PIECE_CHARS + 3, 0), ""],
        ["j", "", TS, "a" * (formats.PIECE_CHARS + 5), ""],  # needs no quotes at all
        ["j", "s", TS, "a" * (formats.PIECE_CHARS + 5) + '"'],  # only the last slice needs them
        ["j", *['q",' * (formats.PIECE_CHARS // 8)] * 9, "z"],  # many medium fields
    ],
    ids=["one-long", "long-then-small", "two-long", "no-quotes", "quote-at-end", "many-medium"],
)
def test_long_records_are_csv_bytes(record: list[Any]) -> None:
    weight = sum(len(f) for f in record if isinstance(f, str))
    small = ["k", "s", TS, "a,b"]
    records = [small, record, small]
    assert formats._csv_bytes(records, [10, weight, 10]) == lines(records)


def test_a_fifteen_mb_cell_is_quoted_in_bounded_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    text = long_text(15 * 10**6, 0)
    document = json.dumps({"log": text, "n": 1}).encode()
    rows = [ExportRow("j-1", "succeeded", TS, b'{"n": 2}'), ExportRow("j-2", "failed", TS, document)]
    sizes: list[int] = []
    original = formats._csv_text

    def counting(records: Any) -> str:
        sizes.append(sum(len(f) for r in records for f in r if isinstance(f, str)))
        return original(records)

    monkeypatch.setattr(formats, "_csv_text", counting)
    out = writer_csv([rows])
    spooled = spooled_csv([rows])
    monkeypatch.undo()
    assert out == reference_csv([rows])
    assert spooled == out
    assert len(sizes) > 15
    assert max(sizes) <= formats.PIECE_CHARS + 100


def test_chosen_columns_with_a_long_cell() -> None:
    text = long_text(2 * formats.PIECE_CHARS + 11, 1)
    row = ExportRow("j-1", "succeeded", TS, json.dumps({"log": "=" + text, "n": 1.50}).encode())
    writer = make_writer("csv", single=False, columns=parse_columns(["n", "log"]))
    out = writer.begin() + writer.encode([row]) + writer.end()
    assert out == lines([["job_id", "status", "created_at", "n", "log"], ["j-1", "succeeded", TS, "1.5", "'=" + text]])
