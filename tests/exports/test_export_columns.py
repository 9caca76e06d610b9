r"""``columns`` through the API: single-job and range exports, the stored record, 400s, real documents."""

from __future__ import annotations

import csv
import io
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from exports.columns import MAX_COLUMNS
from tests.api.test_realdata import JSON_FILES, STREAMS
from tests.exports.test_api import Client, download, put, stamp
from tests.support.exports import wait_done

csv.field_size_limit(2**31 - 1)
FIXED = ["job_id", "status", "created_at"]
BIG = 18446744073709551615
DOC = {
    "summary": {"failed": 2, "passed": 1.50, "ratio": 0.1},
    "big": BIG,
    "a.b": "=cmd()",
    "c\\d": {"x": -3},
    "tags": ["ci", 2.50],
    "note": None,
}
# Sent as text so that 1.50 and 2.50 reach the server as written (json.dumps would send 1.5).
DOC_TEXT = (
    '{"summary": {"failed": 2, "passed": 1.50, "ratio": 0.1}, "big": 18446744073709551615, "a.b": "=cmd()", '
    '"c\\\\d": {"x": -3}, "tags": ["ci", 2.50], "note": null}'
)
COLUMNS = ["big", "summary.passed", "missing", "a\\.b", "c\\\\d.x", "tags", "summary.ratio", "note", "\\labels.branch"]


def stored(engine: str, text: str) -> str:
    """How the engine gives a number back: MariaDB keeps the text, MySQL stores a double."""
    return text if engine == "mariadb" else {"1.50": "1.5", "2.50": "2.5"}.get(text, text)


async def put_text(client: Client, job_id: str, text: str, status: str = "succeeded") -> dict[str, Any]:
    body = '{"status": "%s", "result": %s}' % (status, text)  # noqa: UP031 - the document goes in as written
    response = await client.put(
        f"/v1/job-results/{job_id}", content=body.encode(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code in (200, 201), response.text
    made: dict[str, Any] = response.json()
    return made


def read(fmt: str, data: bytes) -> list[Any]:
    if fmt == "json":
        parsed = json.loads(data)
        return parsed if isinstance(parsed, list) else [parsed]
    if fmt == "ndjson":
        assert data.endswith(b"\n")
        return [json.loads(line) for line in data.splitlines()]
    return list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))


# --- single-job exports --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "json", "ndjson"])
async def test_single_job_export_with_columns(client: Client, job_id: str, engine: str, fmt: str) -> None:
    await put_text(client, job_id, DOC_TEXT)
    response = await client.post(f"/v1/job-results/{job_id}/exports", json={"format": fmt, "columns": COLUMNS})
    assert response.status_code == 201, response.text
    record = response.json()
    assert record["columns"] == COLUMNS
    assert (await client.get(f"/v1/exports/{record['export_id']}")).json()["columns"] == COLUMNS
    data = await download(client, record)
    passed, tags = stored(engine, "1.50"), '["ci",' + stored(engine, "2.50") + "]"
    if fmt == "csv":
        header, cells = read(fmt, data)
        assert header == FIXED + COLUMNS
        assert cells[:2] == [job_id, "succeeded"]
        assert cells[3:] == [str(BIG), passed, "", "'=cmd()", "-3", tags, "0.1", "", ""]
        return
    (item,) = read(fmt, data)
    assert list(item) == ["job_id", "status", "created_at", "labels", "result"]
    assert item["labels"] == {}
    assert item["result"] == {
        "big": BIG,
        "summary": {"passed": 1.5, "ratio": 0.1},
        "a.b": "=cmd()",
        "c\\d": {"x": -3},
        "tags": ["ci", 2.5],
        "note": None,
    }
    # The numbers as stored, digit for digit.
    for text in (f'"big":{BIG}', f'"passed":{passed}', '"ratio":0.1', '"x":-3'):
        assert text.encode() in data.replace(b": ", b":")


async def test_without_columns_the_record_has_none(client: Client, job_id: str) -> None:
    await put(client, job_id, {"a": 1})
    record = (await client.post(f"/v1/job-results/{job_id}/exports", json={"format": "csv"})).json()
    assert "columns" not in record
    header, _cells = read("csv", await download(client, record))
    assert header == [*FIXED, "a"]


# --- range exports -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "json", "ndjson"])
async def test_range_export_with_columns(worker_client: Client, job_id: str, engine: str, fmt: str) -> None:
    start = datetime.now(UTC)
    made = [
        await put_text(worker_client, f"{job_id}-a", DOC_TEXT),
        await put_text(worker_client, f"{job_id}-b", '{"summary": {"failed": 0}, "big": -1}', "failed"),
        await put_text(worker_client, f"{job_id}-c", "[1, 2]"),
    ]
    window = {"created_from": stamp(start), "created_to": stamp(datetime.now(UTC) + timedelta(microseconds=1))}
    columns = ["summary.failed", "big", "\\labels.branch", "summary.passed"]
    response = await worker_client.post("/v1/exports", json={"format": fmt, "columns": columns, **window})
    assert response.status_code == 202, response.text
    assert response.json()["columns"] == columns
    record = await wait_done(worker_client, response.json()["export_id"])
    assert (record["state"], record["rows_written"], record["columns"]) == ("succeeded", 3, columns)
    rows = read(fmt, await download(worker_client, record))
    if fmt == "csv":
        assert rows[0] == FIXED + columns
        assert [r[0] for r in rows[1:]] == [m["job_id"] for m in made]
        assert [r[3:] for r in rows[1:]] == [
            ["2", str(BIG), "", stored(engine, "1.50")],
            ["0", "-1", "", ""],
            ["", "", "", ""],
        ]
        return
    assert [r["job_id"] for r in rows] == [m["job_id"] for m in made]
    assert [r["result"] for r in rows] == [
        {"summary": {"failed": 2, "passed": 1.5}, "big": BIG},
        {"summary": {"failed": 0}, "big": -1},
        {},
    ]
    assert [r["labels"] for r in rows] == [{}, {}, {}]


BAD = [
    ("", "''"),
    ("a..b", "'a..b'"),
    ("a.", "'a.'"),
    ("x\\", "'x\\\\'"),
    ("x\\y", "'x\\\\y'"),
    ("\\labels.Branch", "'\\\\labels.Branch'"),
    ("k" * 1025, "'" + "k" * 100 + "...'"),
]


@pytest.mark.parametrize(("column", "named"), BAD)
@pytest.mark.parametrize("where", ["job", "range"])
async def test_invalid_columns_are_400_naming_the_column(
    client: Client, job_id: str, where: str, column: str, named: str
) -> None:
    await put(client, job_id, {"a": 1})
    before = (await client.get("/v1/exports", params={"limit": 1})).json()["items"]
    response = await post(client, where, job_id, ["ok.path", column])
    assert response.status_code == 400, response.text
    problem = response.json()
    assert problem["type"].endswith("/invalid-column")
    assert problem["detail"].startswith(f"column {named}: ")
    assert problem["errors"] == [{"name": "columns", "source": "body", "message": problem["detail"]}]
    assert (await client.get("/v1/exports", params={"limit": 1})).json()["items"] == before


@pytest.mark.parametrize("where", ["job", "range"])
async def test_column_list_limits(client: Client, job_id: str, where: str) -> None:
    await put(client, job_id, {"a": 1})
    too_many = await post(client, where, job_id, [f"c{i}" for i in range(MAX_COLUMNS + 1)])
    assert too_many.status_code == 400, too_many.text
    assert "columns" in too_many.json()["detail"]
    assert "1000" in too_many.json()["detail"]
    empty = await post(client, where, job_id, [])
    assert empty.status_code == 400
    assert "columns" in empty.json()["detail"]
    twice = await post(client, where, job_id, ["a", "b", "a"])
    assert twice.status_code == 400
    assert twice.json()["detail"] == "column 'a': is given twice"
    not_text = await post(client, where, job_id, ["a", 5])
    assert not_text.status_code == 400
    most = await post(client, where, job_id, [f"c{i}" for i in range(MAX_COLUMNS)])
    assert most.status_code in (201, 202), most.text
    assert len(most.json()["columns"]) == MAX_COLUMNS


async def post(client: Client, where: str, job_id: str, columns: list[Any]) -> Any:
    if where == "job":
        return await client.post(f"/v1/job-results/{job_id}/exports", json={"format": "csv", "columns": columns})
    body = {
        "format": "csv",
        "created_from": "2000-01-01T00:00:00Z",
        "created_to": "2000-01-02T00:00:00Z",
        "columns": columns,
    }
    return await client.post("/v1/exports", json=body)


# --- real documents ------------------------------------------------------------------------------

REAL = [p for p in JSON_FILES if p.name not in STREAMS]


@pytest.mark.skipif(not REAL, reason="no real data; set JOBRESULTS_REALDATA")
async def test_real_documents_csv_range_with_chosen_columns(worker_client: Client) -> None:
    prefix = f"real-{uuid.uuid4().hex[:8]}"
    start = datetime.now(UTC)
    for index, path in enumerate(REAL):
        content = b'{"status": "succeeded", "result": ' + path.read_bytes() + b"}"
        response = await worker_client.put(
            f"/v1/job-results/{prefix}-{index:02d}", content=content, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 201, response.text
    window = {"created_from": stamp(start), "created_to": stamp(datetime.now(UTC) + timedelta(microseconds=1))}

    async def export(body: dict[str, Any]) -> list[list[str]]:
        queued = await worker_client.post("/v1/exports", json={"format": "csv", **window, **body})
        assert queued.status_code == 202, queued.text
        record = await wait_done(worker_client, queued.json()["export_id"])
        assert record["state"] == "succeeded", record
        rows: list[list[str]] = read("csv", await download(worker_client, record))
        return rows

    everything = await export({})
    discovered = everything[0][3:]
    assert len(discovered) > 1000  # the "3,102 columns" of mixed reports
    # A chosen set across the tools: every 97th column, the escaped lighthouse keys among them, and
    # one no document has; in an order of our own.
    chosen = [c for i, c in enumerate(discovered) if i % 97 == 0 and not c.startswith("'")]
    chosen += [c for c in discovered if "\\." in c][:5]
    chosen = [*reversed(dict.fromkeys(chosen)), "no.such.column"]
    picked = await export({"columns": chosen})
    assert picked[0] == FIXED + chosen
    assert len(picked) == len(everything) == len(REAL) + 1
    # (Read the discovered CSV by position: real results have keys named status or created_at.)
    by_job = {r[0]: (r[:3], dict(zip(discovered, r[3:], strict=True))) for r in everything[1:]}
    for record in picked[1:]:
        fixed, full = by_job[record[0]]
        assert record[:3] == fixed
        assert record[3:] == [full.get(name, "") for name in chosen]
    assert any(cell for record in picked[1:] for cell in record[3:])
