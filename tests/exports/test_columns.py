r"""Chosen export columns as pure code: parsing the paths, label columns, and the three writers.

The API and pipeline side is in ``test_export_columns.py``.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exports.columns import (
    LABEL_PREFIX,
    MAX_COLUMNS,
    InvalidColumn,
    is_label_column,
    label_column,
    parse_columns,
    split_cli_list,
    split_path,
)
from exports.formats import CsvColumns, ExportRow, _escape_key, csv_columns_of, make_writer
from repositories.domain import Format
from tests.exports.test_formats import REAL_FILES, REALDATA

TS = "2026-11-29T14:05:04.651170Z"
FIXED = ["job_id", "status", "created_at"]
DOC = (
    b'{"big": 18446744073709551615, "f": 1.50, "tiny": 0.1, "neg": -3, "e": 1E+2,'
    b' "metrics": {"ms": 12, "cpu": 0.25}, "a.b": "=cmd()", "c\\\\d": {"x.y": true}, "none": null,'
    b' "arr": [1, 2.50, "s"], "empty": {}, "obj": {"k": 1.0, "l": [0.10]}}'
)
"""A stored result: big integers, trailing zeros, keys holding '.' and '\\', arrays, objects."""
PRETTY = b'{\n  "name": "build",\n  "n": 18446744073709551615,\n  "s": {\n    "v": 2.50\n  }\n}'
"""A result as MariaDB returns it: with newlines and indentation."""


def row(result: bytes | str, job_id: str = "job-1", labels: dict[str, str] | None = None) -> ExportRow:
    data = result.encode() if isinstance(result, str) else result
    return ExportRow(job_id, "succeeded", TS, data, labels or {})


def export(fmt: Format, chunks: Sequence[Sequence[ExportRow]], columns: Sequence[str], *, single: bool) -> bytes:
    writer = make_writer(fmt, single=single, columns=parse_columns(columns))
    parts = [writer.begin(), *(writer.encode(chunk) for chunk in chunks), writer.end()]
    return b"".join(parts)


def parse_csv(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))


@pytest.fixture(autouse=True, scope="module")
def _large_csv_fields() -> Iterator[None]:
    old = csv.field_size_limit(sys.maxsize)
    yield
    csv.field_size_limit(old)


# --- the rules of columns ------------------------------------------------------------------------


def test_paths_split_into_unescaped_keys() -> None:
    assert split_path("metrics.duration_ms") == ("metrics", "duration_ms")
    assert split_path("a\\.b.c") == ("a.b", "c")
    assert split_path("c\\\\d") == ("c\\d",)
    assert split_path("x\\\\.y") == ("x\\", "y")
    assert split_path("\\\\\\.") == ("\\.",)
    assert split_path(" spaced key .é") == (" spaced key ", "é")


@pytest.mark.parametrize(
    ("column", "rule"),
    [
        ("", "empty key"),
        (".a", "empty key"),
        ("a.", "empty key"),
        ("a..b", "empty key"),
        ("a\\", "lone '\\'"),
        ("a\\b", "'\\b' is not an escape"),
        ("a\\\\\\", "lone '\\'"),
        (".".join(["k"] * 65), "65 keys; at most 64"),
        ("x" * 1025, "1025 characters long; at most 1024"),
        ("\\labels.", "label key"),
        ("\\labels.Branch", "label key"),
        ("\\labels.1x", "label key"),
        ("\\labels." + "a" * 64, "label key"),
        ("\\label.x", "'\\l' is not an escape"),
    ],
)
def test_invalid_columns_are_named_with_the_rule(column: str, rule: str) -> None:
    with pytest.raises(InvalidColumn) as caught:
        parse_columns(["fine", column])
    shown = column if len(column) <= 100 else column[:100] + "..."
    assert caught.value.column == shown
    assert str(caught.value).startswith(f"column {shown!r}: ")
    assert rule in str(caught.value)


def test_limits_of_the_list() -> None:
    assert len(parse_columns([f"c{i}" for i in range(MAX_COLUMNS)]).columns) == MAX_COLUMNS
    with pytest.raises(InvalidColumn, match="1001 columns given; at most 1000"):
        parse_columns([f"c{i}" for i in range(MAX_COLUMNS + 1)])
    with pytest.raises(InvalidColumn, match="give 1 to 1000 columns"):
        parse_columns([])
    with pytest.raises(InvalidColumn, match=r"column 'a\.b': is given twice"):
        parse_columns(["a.b", "c", "a.b"])
    long_ones = [f"{i:04d}" + "x" * 1000 for i in range(100)]
    with pytest.raises(InvalidColumn, match="100400 characters over all columns; at most 100000"):
        parse_columns(long_ones)
    assert len(parse_columns(long_ones[:99]).columns) == 99
    assert parse_columns(["\\labels.ci.pipeline_1/x-y", "\\labels.b"]).label_keys == ("ci.pipeline_1/x-y", "b")


# Keys as JSON allows them, weighted towards the characters the notation escapes.
ALPHABET = st.sampled_from(["\\", ".", "l", "a", "b", "e", "\u00e9", " "]) | st.characters(exclude_categories=["Cs"])
KEYS = st.text(alphabet=ALPHABET, max_size=8)


@given(st.lists(KEYS.filter(bool), min_size=1, max_size=6))
@settings(max_examples=500, deadline=None)
def test_every_escaped_path_reads_back_and_is_never_a_label_column(keys: list[str]) -> None:
    path = ".".join(_escape_key(key) for key in keys)
    assert split_path(path) == tuple(keys)
    assert not is_label_column(path)
    (parsed,) = parse_columns([path]).paths
    assert parsed == tuple(keys)


@given(st.recursive(st.dictionaries(KEYS, st.integers()), lambda inner: st.dictionaries(KEYS, inner), max_leaves=12))
@settings(max_examples=300, deadline=None)
def test_no_discovered_csv_header_is_a_label_column(document: dict[str, Any]) -> None:
    # The discovered headers include empty keys (which cannot be chosen): still never a label column.
    for header in csv_columns_of([row(json.dumps(document))]):
        assert not header.startswith(LABEL_PREFIX)


def test_label_column_names() -> None:
    assert label_column("branch") == "\\labels.branch"
    assert is_label_column("\\labels.branch")
    # The result path of {"labels": {"branch": ...}} and of {"\\labels": {"branch": ...}} differ from it.
    assert ".".join(map(_escape_key, ["labels", "branch"])) == "labels.branch"
    assert ".".join(map(_escape_key, ["\\labels", "branch"])) == "\\\\labels.branch"


def test_cli_list_splits_at_unescaped_commas() -> None:
    assert split_cli_list("a.b,c") == ["a.b", "c"]
    assert split_cli_list("a\\,b,c\\.d,e\\\\,f") == ["a,b", "c\\.d", "e\\\\", "f"]
    assert split_cli_list("\\labels.branch") == ["\\labels.branch"]
    assert split_cli_list("a,,b") == ["a", "", "b"]


# --- csv -----------------------------------------------------------------------------------------


def test_csv_header_is_exactly_the_columns_in_order_and_missing_cells_are_empty() -> None:
    columns = ["metrics.ms", "nope", "big", "a\\.b", "c\\\\d.x\\.y", "metrics.cpu", "metrics.nope.deeper"]
    header, first, second = parse_csv(
        export("csv", [[row(DOC, "j-1")], [row('{"metrics": {"ms": 5}}', "j-2")]], columns, single=False)
    )
    assert header == FIXED + columns
    assert first == ["j-1", "succeeded", TS, "12", "", BIG, "'=cmd()", "true", "0.25", ""]
    assert second == ["j-2", "succeeded", TS, "5", "", "", "", "", "", ""]


BIG = "18446744073709551615"


def test_csv_cells_follow_the_flattened_rules() -> None:
    columns = ["f", "tiny", "neg", "e", "none", "arr", "empty", "obj", "obj.k", "obj.l"]
    header, record = parse_csv(export("csv", [[row(DOC)]], columns, single=True))
    assert header == FIXED + columns
    e = "1E+2"  # the stored text, as the flattened CSV writes it
    assert record[3:] == ["1.50", "0.1", "-3", e, "", '[1,2.50,"s"]', "{}", '{"k":1.0,"l":[0.10]}', "1.0", "[0.10]"]


def test_csv_root_column_names_a_result_that_is_not_an_object() -> None:
    rows = [row("[1, 2.50]", "a"), row('"=x"', "b"), row("{}", "c"), row('{"result": 7}', "d"), row("null", "e")]
    _header, *records = parse_csv(export("csv", [rows], ["result", "x"], single=False))
    assert [r[3:] for r in records] == [["[1,2.50]", ""], ["'=x", ""], ["{}", ""], ["7", ""], ["", ""]]


def test_csv_neutralises_chosen_header_names() -> None:
    header, _record = parse_csv(export("csv", [[row('{"=a": 1}')]], ["=a", "-b"], single=True))
    assert header == [*FIXED, "'=a", "'-b"]


def test_csv_label_columns_read_the_row_labels() -> None:
    rows = [
        row('{"n": 1}', "a", {"branch": "main", "tool": "=evil"}),
        row('{"n": 2}', "b", {"tool": "pytest"}),
        row('{"n": 3}', "c"),
    ]
    columns = ["\\labels.tool", "n", "\\labels.branch"]
    header, *records = parse_csv(export("csv", [rows], columns, single=False))
    assert header == FIXED + columns
    assert [r[3:] for r in records] == [["'=evil", "1", "main"], ["pytest", "2", ""], ["", "3", ""]]


def test_csv_with_only_label_columns_never_reads_the_result() -> None:
    not_json = row(b"{not json", "a", {"branch": "dev"})
    _header, record = parse_csv(export("csv", [[not_json]], ["\\labels.branch"], single=True))
    assert record[3:] == ["dev"]


def test_chosen_csv_agrees_with_the_flattened_csv() -> None:
    rows = [row(DOC, "a"), row(PRETTY, "b"), row('{"metrics": {"ms": -1}, "x": "+1"}', "c")]
    collector = CsvColumns()
    collector.add(rows)
    discovered = collector.columns()
    flat = parse_csv(make_writer("csv", single=False, csv_columns=discovered).encode(rows))
    chosen = parse_csv(export("csv", [rows], list(reversed(discovered)), single=False))
    assert chosen[0] == FIXED + list(reversed(discovered))
    for flat_record, chosen_record in zip(flat, chosen[1:], strict=True):
        assert chosen_record[:3] == flat_record[:3]
        assert chosen_record[3:] == list(reversed(flat_record[3:]))


# --- json and ndjson -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "ndjson"])
def test_projection_keeps_the_document_shape_and_the_stored_text(fmt: Format) -> None:
    columns = ["metrics.cpu", "big", "f", "tiny", "a\\.b", "c\\\\d.x\\.y", "obj", "none", "missing", "metrics.x.y"]
    out = export(fmt, [[row(DOC)]], columns, single=True)
    assert out.count(b"\n") == 1
    item = json.loads(out)
    assert list(item) == ["job_id", "status", "created_at", "result"]
    # Document order, nested like the document; absent paths absent; null present.
    expected = (
        b'{"big":18446744073709551615,"f":1.50,"tiny":0.1,"metrics":{"cpu":0.25},"a.b":"=cmd()",'
        b'"c\\\\d":{"x.y":true},"none":null,"obj":{"k": 1.0, "l": [0.10]}}'
    )
    if fmt == "ndjson":
        expected = msgspec.json.format(expected, indent=-1)
    assert b'"result":' + expected + b"}" in out
    assert item["result"] == json.loads(expected)


def test_projection_of_a_pretty_result() -> None:
    json_out = export("json", [[row(PRETTY)]], ["n", "s.v"], single=True)
    assert b'"result":{"n":18446744073709551615,"s":{"v":2.50}}' in json_out
    nd_out = export("ndjson", [[row(PRETTY)]], ["s"], single=True)
    assert nd_out.endswith(b'"result":{"s":{"v":2.50}}}\n')
    assert nd_out.count(b"\n") == 1


def test_projection_of_results_without_the_paths_is_an_empty_object() -> None:
    rows = [row("[1, 2]", "a"), row("3.50", "b"), row("{}", "c"), row('{"other": 1}', "d"), row('{"a": 5}', "e")]
    out = json.loads(export("json", [rows[:2], [], rows[2:]], ["a.b", "result"], single=False))
    assert [item["result"] for item in out] == [{}, {}, {}, {}, {}]
    assert [item["job_id"] for item in out] == ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize("fmt", ["json", "ndjson"])
def test_label_columns_go_to_the_labels_member_only(fmt: Format) -> None:
    rows = [row('{"n": 1.50}', "a", {"branch": "main", "tool": "x"}), row('{"n": 2}', "b")]
    out = export(fmt, [rows], ["\\labels.branch", "n", "\\labels.nope"], single=False)
    items = json.loads(out) if fmt == "json" else [json.loads(line) for line in out.splitlines()]
    assert [list(item) for item in items] == [["job_id", "status", "created_at", "labels", "result"]] * 2
    assert [item["labels"] for item in items] == [{"branch": "main"}, {}]
    assert [item["result"] for item in items] == [{"n": 1.5}, {"n": 2}]
    assert b'"result":{"n":1.50}' in out


def test_json_range_with_columns_is_one_array_across_chunks() -> None:
    chunks = [[row('{"a": 1}', "x")], [], [row('{"a": 2}', "y"), row('{"b": 3}', "z")]]
    out = export("json", chunks, ["a"], single=False)
    assert out.endswith(b"]\n")
    assert [item["result"] for item in json.loads(out)] == [{"a": 1}, {"a": 2}, {}]
    assert export("json", [], ["a"], single=False) == b"[]\n"
    assert export("ndjson", [], ["a"], single=False) == b""
    assert parse_csv(export("csv", [], ["a", "b"], single=False)) == [[*FIXED, "a", "b"]]


@pytest.mark.parametrize("fmt", ["json", "ndjson", "csv"])
def test_single_export_with_columns_takes_exactly_one_row(fmt: Format) -> None:
    writer = make_writer(fmt, single=True, columns=parse_columns(["a"]))
    with pytest.raises(ValueError, match="got 2 rows"):
        writer.encode([row("{}"), row("{}")])
    empty = make_writer(fmt, single=True, columns=parse_columns(["a"]))
    empty.begin()
    with pytest.raises(ValueError, match="ended without its row"):
        empty.end()


# --- real documents ------------------------------------------------------------------------------


@pytest.mark.skipif(not REAL_FILES, reason=f"no real data at {REALDATA}")
@pytest.mark.parametrize("path", REAL_FILES, ids=lambda p: p.name)
def test_real_document_with_all_its_columns_chosen(path: Path) -> None:
    raw = path.read_bytes()
    document = json.loads(raw)
    exported = [row(raw, "real-1")]
    columns = [c for c in csv_columns_of(exported) if c != "result" or isinstance(document, dict)]
    if not isinstance(document, dict) or not document:
        columns = ["result"]
    flat_header, flat_record = parse_csv(make_writer("csv", single=True).encode(exported))
    cells = dict(zip(flat_header[3:], flat_record[3:], strict=True))
    projected: dict[str, Any] = {}
    for start in range(0, len(columns), MAX_COLUMNS):  # lighthouse has 2,324 columns
        batch = columns[start : start + MAX_COLUMNS]
        # csv: the same cells as the flattened CSV, in the order chosen.
        chosen = list(reversed(batch))
        header, record = parse_csv(export("csv", [exported], chosen, single=True))
        assert header[3:] == [("'" + c if c[:1] in "=+-@\t\r\n" else c) for c in chosen]
        assert record[3:] == [cells[name] for name in header[3:]]
        merge(projected, json.loads(export("json", [exported], batch, single=True))["result"])
    # json: every leaf chosen gives the document back, where it is an object without empty keys.
    if isinstance(document, dict) and document and '""' not in raw.decode():
        assert projected == document


def merge(into: dict[str, Any], part: dict[str, Any]) -> None:
    for key, value in part.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value
