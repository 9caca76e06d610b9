"""Export format writers: JSON, NDJSON and CSV, as pure code (no database)."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from exports.formats import FORMULA_STARTS, CsvColumns, ExportRow, csv_columns_of, make_writer
from repositories.domain import Format

TS = "2026-11-29T14:05:04.651170Z"
HEADER = ["job_id", "status", "created_at"]
BIG = "18446744073709551615"
PRETTY = b'{\n  "name": "build",\n  "n": 18446744073709551615,\n  "steps": [\n    1,\n    2.50\n  ],\n  "s": "a\\nb"\n}'
"""A result as MariaDB returns it: the text as sent, with newlines and indentation."""

REALDATA = Path(os.environ.get("JOBRESULTS_REALDATA") or Path(__file__).resolve().parents[3] / "shared" / "realdata")
REAL_FILES = sorted(p for p in REALDATA.glob("*/*.json") if p.name != "govulncheck-json-stream.json")


def row(result: bytes | str, job_id: str = "job-1", status: str = "succeeded", created_at: str = TS) -> ExportRow:
    return ExportRow(job_id, status, created_at, result.encode() if isinstance(result, str) else result)


def export(
    fmt: Format, chunks: Sequence[Sequence[ExportRow]], *, single: bool, csv_columns: Sequence[str] | None = None
) -> bytes:
    writer = make_writer(fmt, single=single, csv_columns=csv_columns)
    parts = [writer.begin()]
    parts.extend(writer.encode(chunk) for chunk in chunks)
    parts.append(writer.end())
    return b"".join(parts)


def csv_range(chunks: Sequence[Sequence[ExportRow]]) -> bytes:
    """A CSV range export the way the pipeline runs it: pass 1 collects the columns, pass 2 writes."""
    columns = CsvColumns()
    for chunk in chunks:
        columns.add(chunk)
    return export("csv", chunks, single=False, csv_columns=columns.columns())


def parse_csv(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))


def csv_single(result: bytes | str) -> dict[str, str]:
    """Header -> cell of a single-job CSV export (fails on a repeated header name)."""
    header, *records = parse_csv(export("csv", [[row(result)]], single=True))
    assert len(records) == 1
    assert len(set(header)) == len(header)
    return dict(zip(header, records[0], strict=True))


@pytest.fixture(autouse=True, scope="module")
def _large_csv_fields() -> Iterator[None]:
    # Arrays in real documents make cells larger than the reader's default limit of 128 KiB.
    old = csv.field_size_limit(sys.maxsize)
    yield
    csv.field_size_limit(old)


# --- make_writer -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "media_type", "extension"),
    [
        ("json", "application/json", "json"),
        ("ndjson", "application/x-ndjson", "ndjson"),
        ("csv", "text/csv; charset=utf-8", "csv"),
    ],
)
def test_media_type_and_extension(fmt: Format, media_type: str, extension: str) -> None:
    writer = make_writer(fmt, single=True)
    assert writer.media_type == media_type
    assert writer.extension == extension


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown export format 'xml'"):
        make_writer("xml", single=True)  # type: ignore[arg-type]


def test_csv_range_needs_columns() -> None:
    with pytest.raises(ValueError, match="csv_columns"):
        make_writer("csv", single=False)


@pytest.mark.parametrize("fmt", ["json", "ndjson", "csv"])
def test_single_export_takes_exactly_one_row(fmt: Format) -> None:
    writer = make_writer(fmt, single=True)
    writer.begin()
    writer.encode([row("1")])
    with pytest.raises(ValueError, match="single-job export"):
        writer.encode([row("2")])
    empty = make_writer(fmt, single=True)
    empty.begin()
    empty.encode([])
    with pytest.raises(ValueError, match="single-job export"):
        empty.end()


# --- json ----------------------------------------------------------------------------------------


def test_json_single_is_one_object_in_key_order() -> None:
    out = export("json", [[row(b'{"a": 1}', job_id="j-1", status="failed")]], single=True)
    assert out.endswith(b"}\n")
    parsed = json.loads(out)
    assert list(parsed) == ["job_id", "status", "created_at", "result", "labels"]
    assert parsed == {"job_id": "j-1", "status": "failed", "created_at": TS, "result": {"a": 1}, "labels": {}}


def test_json_range_is_one_array_across_chunks() -> None:
    chunks = [[row("1", "a"), row('"x"', "b")], [], [row("null", "c")], [row("[true]", "d"), row("{}", "e")]]
    out = export("json", chunks, single=False)
    assert out.startswith(b"[")
    assert out.endswith(b"]\n")
    parsed = json.loads(out)
    assert [item["job_id"] for item in parsed] == ["a", "b", "c", "d", "e"]
    assert [item["result"] for item in parsed] == [1, "x", None, [True], {}]
    assert all(list(item) == ["job_id", "status", "created_at", "result", "labels"] for item in parsed)


def test_json_empty_range_is_empty_array() -> None:
    assert export("json", [], single=False) == b"[]\n"
    assert export("json", [[], []], single=False) == b"[]\n"


def test_json_keeps_the_stored_text() -> None:
    out = export("json", [[row(PRETTY)]], single=False)
    assert PRETTY in out
    assert json.loads(out)[0]["result"] == json.loads(PRETTY)


# --- ndjson --------------------------------------------------------------------------------------


def test_ndjson_one_line_per_row_across_chunks() -> None:
    chunks = [[row(PRETTY, "a"), row("1", "b")], [], [row(' "x\\ny" ', "c")]]
    out = export("ndjson", chunks, single=False)
    lines = out.split(b"\n")
    assert lines[-1] == b""
    assert len(lines) == 4
    assert b"\r" not in out
    parsed = [json.loads(line) for line in lines[:-1]]
    assert [item["job_id"] for item in parsed] == ["a", "b", "c"]
    assert [item["result"] for item in parsed] == [json.loads(PRETTY), 1, "x\ny"]
    assert all(list(item) == ["job_id", "status", "created_at", "result", "labels"] for item in parsed)


def test_ndjson_minifies_pretty_result_without_touching_numbers() -> None:
    out = export("ndjson", [[row(PRETTY)]], single=True)
    assert out == (
        b'{"job_id":"job-1","status":"succeeded","created_at":"' + TS.encode() + b'",'
        b'"result":{"name":"build","n":18446744073709551615,"steps":[1,2.50],"s":"a\\nb"},"labels":{}}\n'
    )


@pytest.mark.parametrize("fmt", ["json", "ndjson"])
def test_labels_are_a_member_of_each_row(fmt: Format) -> None:
    labels = {"branch": "main", "quote": 'a"b\\c', "colon": "x:y"}
    labelled = ExportRow("job-1", "failed", TS, b"1", labels)
    out = export(fmt, [[labelled, row("2", "job-2")]], single=False)
    parsed = json.loads(out) if fmt == "json" else [json.loads(line) for line in out.splitlines()]
    assert [item["labels"] for item in parsed] == [labels, {}]


def test_ndjson_empty_range_is_empty() -> None:
    assert export("ndjson", [[]], single=False) == b""


# --- big integers --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "ndjson"])
def test_big_integers_exact_in_json_formats(fmt: Format) -> None:
    result = '{"max": 18446744073709551615, "min": -9223372036854775808, "list": [18446744073709551615]}'
    out = export(fmt, [[row(result)]], single=True)
    assert BIG.encode() in out
    parsed = json.loads(out)["result"]
    assert parsed == {"max": 2**64 - 1, "min": -(2**63), "list": [2**64 - 1]}


def test_numbers_exact_in_csv() -> None:
    cells = csv_single(
        '{"max": 18446744073709551615, "min": -9223372036854775808, "list": [18446744073709551615, 0.1],'
        ' "f": 0.1, "g": 1.50, "e": 1e2, "z": -0.0}'
    )
    assert cells["max"] == BIG
    assert cells["min"] == "-9223372036854775808"
    assert cells["list"] == f"[{BIG},0.1]"
    assert (cells["f"], cells["g"], cells["e"], cells["z"]) == ("0.1", "1.50", "1e2", "-0.0")
    assert csv_single(BIG)["result"] == BIG


# --- csv: layout and flattening ------------------------------------------------------------------


def test_csv_single_header_and_cells() -> None:
    out = export("csv", [[row('{"metrics": {"duration_ms": 12}, "name": "build"}', job_id="j-9")]], single=True)
    assert (
        out == b"job_id,status,created_at,metrics.duration_ms,name\r\nj-9,succeeded," + TS.encode() + b",12,build\r\n"
    )
    assert not out.startswith(b"\xef\xbb\xbf")


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        ('{"a": {"b": {"c": 1}}, "d": 2}', {"a.b.c": "1", "d": "2"}),
        ('{"a": [1, 2], "b": [], "c": [{"x": null}, "s"]}', {"a": "[1,2]", "b": "[]", "c": '[{"x":null},"s"]'}),
        ('{"a": {}, "b": {"c": {}}}', {"a": "{}", "b.c": "{}"}),
        ('{"n": null, "t": true, "f": false, "e": ""}', {"n": "", "t": "true", "f": "false", "e": ""}),
        ('"just text"', {"result": "just text"}),
        ("-42", {"result": "-42"}),
        ("null", {"result": ""}),
        ("true", {"result": "true"}),
        ("[1, [2, 3]]", {"result": "[1,[2,3]]"}),
        ("{}", {"result": "{}"}),
        (
            '{"a.b": 1, "a": {"b": 2}, "c\\\\d": 3, "e.": {"\\\\.": 4}}',
            {"a\\.b": "1", "a.b": "2", "c\\\\d": "3", "e\\..\\\\\\.": "4"},
        ),
        ('{"": 1, "x": {"": 2}}', {"": "1", "x.": "2"}),
        ('{"emoji": "ok \\ud83d\\ude00 \\u00e9"}', {"emoji": "ok \U0001f600 \u00e9"}),
    ],
    ids=[
        "nested",
        "arrays",
        "empty-objects",
        "null-bool-empty-string",
        "root-string",
        "root-number",
        "root-null",
        "root-true",
        "root-array",
        "root-empty-object",
        "keys-with-dots-and-backslashes",
        "empty-keys",
        "non-ascii",
    ],
)
def test_csv_flattening(result: str, expected: dict[str, str]) -> None:
    cells = csv_single(result)
    assert cells == {"job_id": "job-1", "status": "succeeded", "created_at": TS, **expected}
    assert list(cells)[3:] == sorted(expected)


def test_csv_rfc4180_quoting() -> None:
    result = '{"comma": "a,b", "quote": "say \\"hi\\"", "crlf": "one\\r\\ntwo", "lf": "x\\ny", "plain": "p q"}'
    out = export("csv", [[row(result)]], single=True)
    header, record = out.split(b"\r\n", 1)
    assert header == b"job_id,status,created_at,comma,crlf,lf,plain,quote"
    assert record == b"job-1,succeeded," + TS.encode() + b',"a,b","one\r\ntwo","x\ny",p q,"say ""hi"""\r\n'
    cells = csv_single(result)
    assert cells["comma"] == "a,b"
    assert cells["quote"] == 'say "hi"'
    assert cells["crlf"] == "one\r\ntwo"
    assert cells["lf"] == "x\ny"


# --- csv: formula injection ----------------------------------------------------------------------


@pytest.mark.parametrize("start", ["=", "+", "-", "@", "\t", "\r", "\n"], ids=repr)
def test_csv_neutralises_formulas_in_strings_and_keys(start: str) -> None:
    text = start + "1+2"
    document = json.dumps({"v": text, "nested": {"w": text}, "list": [text], start + "key": 1})
    cells = csv_single(document)
    assert cells["v"] == "'" + text
    assert cells["nested.w"] == "'" + text
    assert cells["list"] == json.dumps([text], separators=(",", ":"))  # starts with "[": harmless
    assert cells["'" + start + "key"] == "1"
    assert csv_single(json.dumps(text))["result"] == "'" + text


def test_csv_neutralises_text_cells_of_the_job() -> None:
    out = export("csv", [[row("1", job_id="=cmd", status="@x")]], single=True)
    assert parse_csv(out)[1][:2] == ["'=cmd", "'@x"]


def test_csv_leaves_numbers_and_harmless_strings_alone() -> None:
    cells = csv_single('{"neg": -5, "negf": -0.5, "nege": -1e-3, "s": "-5", "mid": "a=b", "sp": " =x", "q": "\'=x"}')
    assert (cells["neg"], cells["negf"], cells["nege"]) == ("-5", "-0.5", "-1e-3")
    assert cells["s"] == "'-5"
    assert (cells["mid"], cells["sp"], cells["q"]) == ("a=b", " =x", "'=x")
    assert csv_single("-5")["result"] == "-5"


# --- csv: range exports --------------------------------------------------------------------------


def test_csv_columns_union_in_documented_order() -> None:
    chunks = [
        [row('{"z": 1, "b": {"y": 2}}', "j1"), row('"root"', "j2")],
        [row('{"a": 3, "b": {"x": 4}, "B": 5, "\\u00e9": 6}', "j3")],
        [],
        [row('{"res": 7, "result2": {}}', "j4")],
    ]
    columns = CsvColumns()
    for chunk in chunks:
        columns.add(chunk)
    expected = ["B", "a", "b.x", "b.y", "res", "result", "result2", "z", "\u00e9"]
    assert columns.columns() == expected
    assert csv_columns_of([r for chunk in chunks for r in chunk]) == expected

    header, *records = parse_csv(export("csv", chunks, single=False, csv_columns=columns.columns()))
    assert header == HEADER + expected
    assert records == [
        ["j1", "succeeded", TS, "", "", "", "2", "", "", "", "1", ""],
        ["j2", "succeeded", TS, "", "", "", "", "", "root", "", "", ""],
        ["j3", "succeeded", TS, "5", "3", "4", "", "", "", "", "", "6"],
        ["j4", "succeeded", TS, "", "", "", "", "7", "", "{}", "", ""],
    ]


def test_csv_header_keys_neutralised_in_range() -> None:
    out = csv_range([[row('{"=x": 1, "-y": {"z": 2}, "ok": 3}')]])
    assert parse_csv(out)[0] == [*HEADER, "'-y.z", "'=x", "ok"]


def test_csv_columns_with_fixed_prefix_are_accepted() -> None:
    rows = [row('{"a": 1}')]
    with_prefix = export("csv", [rows], single=False, csv_columns=HEADER + csv_columns_of(rows))
    assert with_prefix == csv_range([rows])


def test_csv_empty_range_is_header_only() -> None:
    assert export("csv", [], single=False, csv_columns=[]) == b"job_id,status,created_at\r\n"
    assert csv_range([[]]) == b"job_id,status,created_at\r\n"


def test_csv_single_with_given_columns() -> None:
    out = export("csv", [[row('{"a": 1}')]], single=True, csv_columns=["a", "b"])
    assert parse_csv(out) == [[*HEADER, "a", "b"], ["job-1", "succeeded", TS, "1", ""]]


def test_csv_column_outside_csv_columns_is_a_clear_error() -> None:
    writer = make_writer("csv", single=False, csv_columns=["a"])
    writer.begin()
    with pytest.raises(ValueError, match=r"job 'j-2' has result columns not in csv_columns: \['b'\]"):
        writer.encode([row('{"a": 1}', "j-1"), row('{"a": 1, "b": 2}', "j-2")])


# --- real documents ------------------------------------------------------------------------------


@pytest.mark.skipif(not REAL_FILES, reason=f"no real data at {REALDATA}")
@pytest.mark.parametrize("path", REAL_FILES, ids=lambda p: p.name)
def test_real_documents_export_in_every_format(path: Path) -> None:
    raw = path.read_bytes()
    expected = json.loads(raw)
    exported = [row(raw, job_id="real-1")]

    as_json = json.loads(export("json", [exported], single=True))
    assert as_json["result"] == expected

    as_ndjson = export("ndjson", [exported], single=True)
    assert as_ndjson.count(b"\n") == 1
    assert as_ndjson.endswith(b"\n")
    assert json.loads(as_ndjson)["result"] == expected

    header, *records = parse_csv(export("csv", [exported], single=True))
    assert header[:3] == HEADER
    assert len(records) == 1
    assert len(records[0]) == len(header)
    assert records[0][:3] == ["real-1", "succeeded", TS]
    assert header[3:] == ["'" + name if name[:1] in FORMULA_STARTS else name for name in csv_columns_of(exported)]
