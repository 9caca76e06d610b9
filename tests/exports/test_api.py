"""Exports through the API: single-job exports, range exports, listing and downloads."""

from __future__ import annotations

import asyncio
import csv
import gzip
import hashlib
import io
import json
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from config.settings import Settings
from service.app import create_app
from tests.conftest import REALDATA, make_token
from tests.support.exports import wait_done

Client = AsyncTestClient[Litestar]
csv.field_size_limit(2**31 - 1)  # cells can hold whole arrays (e.g. SAST findings); the default is 128 KiB
FORMATS = ["json", "ndjson", "csv"]


def stamp(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def put(
    client: Client, job_id: str, result: object, status: str = "succeeded", labels: dict[str, str] | None = None
) -> dict[str, Any]:
    body = {"status": status, "result": result} | ({"labels": labels} if labels is not None else {})
    response = await client.put(f"/v1/job-results/{job_id}", json=body)
    assert response.status_code in (200, 201), response.text
    made: dict[str, Any] = response.json()
    return made


async def download(client: Client, record: dict[str, Any]) -> bytes:
    response = await client.get(record["content_url"])
    assert response.status_code == 200, response.text
    data = response.content
    assert response.headers["etag"] == f'"{record["sha256"]}"'
    assert hashlib.sha256(data).hexdigest() == record["sha256"]
    assert len(data) == record["bytes"]
    assert response.headers["content-disposition"].startswith("attachment;")
    return gzip.decompress(data) if record["compression"] == "gzip" else data


# --- single-job exports -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("compression", ["none", "gzip"])
async def test_single_job_export(client: Client, job_id: str, fmt: str, compression: str) -> None:
    result = {"metrics": {"duration_ms": 1200, "big": 18446744073709551615}, "tags": ["ci"], "note": "=cmd()"}
    labels = {"branch": "main", "tool": "pytest"}
    stored = await put(client, job_id, result, "failed", labels)
    response = await client.post(f"/v1/job-results/{job_id}/exports", json={"format": fmt, "compression": compression})
    assert response.status_code == 201, response.text
    record = response.json()
    assert response.headers["location"] == f"/v1/exports/{record['export_id']}"
    assert record["state"] == "succeeded"
    assert record["kind"] == "job"
    assert record["job_id"] == job_id
    assert record["rows_written"] == 1
    assert record["requested_by"]
    # RFC 3339 with fixed-width fractions compares as text: requested, started, then finished.
    assert record["created_at"] <= record["started_at"] <= record["finished_at"]
    assert (await client.get(f"/v1/exports/{record['export_id']}")).json() == record
    body = await download(client, record)
    expected = {
        "job_id": job_id,
        "status": "failed",
        "created_at": stored["created_at"],
        "result": result,
        "labels": labels,
    }
    if fmt == "json":
        assert json.loads(body) == expected
    elif fmt == "ndjson":
        assert body.endswith(b"\n")
        assert body.count(b"\n") == 1
        assert json.loads(body) == expected
    else:
        rows = list(csv.reader(io.StringIO(body.decode("utf-8"), newline="")))
        header, row = rows
        cells = dict(zip(header, row, strict=True))
        assert header[:3] == ["job_id", "status", "created_at"]
        assert cells["metrics.duration_ms"] == "1200"
        assert cells["metrics.big"] == "18446744073709551615"
        assert cells["note"] == "'=cmd()"
        assert cells["tags"] == '["ci"]'
    if compression == "gzip":
        assert record["content_url"].endswith(record["export_id"] + "/content")


async def test_export_files_are_private(client: Client, job_id: str, settings: Settings) -> None:
    await put(client, job_id, {"secret": True})
    record = (await client.post(f"/v1/job-results/{job_id}/exports", json={"format": "json"})).json()
    directory = settings.exports_path
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = [p for p in directory.iterdir() if p.name.startswith(record["export_id"])]
    assert [p.name for p in files] == [f"{record['export_id']}.json"]
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600


async def test_single_export_errors(client: Client, job_id: str) -> None:
    missing = await client.post(f"/v1/job-results/{job_id}/exports", json={"format": "json"})
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    await put(client, job_id, {})
    for body, fragment in [
        ({"format": "xml"}, "format"),
        ({"format": "json", "compression": "zip"}, "compression"),
        ({}, "format"),
        ({"format": "json", "path": "/etc/passwd"}, "path"),
    ]:
        response = await client.post(f"/v1/job-results/{job_id}/exports", json=body)
        assert response.status_code == 400, (body, response.text)
        assert fragment in response.text
    bad_id = await client.post("/v1/job-results/bad%20id/exports", json={"format": "json"})
    assert bad_id.status_code == 400


async def test_twenty_concurrent_exports_of_one_job(client: Client, job_id: str) -> None:
    result = {"payload": "x" * 50_000, "n": list(range(500))}
    await put(client, job_id, result)
    responses = await asyncio.gather(
        *(client.post(f"/v1/job-results/{job_id}/exports", json={"format": "ndjson"}) for _ in range(20))
    )
    assert [r.status_code for r in responses] == [201] * 20
    records = [r.json() for r in responses]
    assert len({r["export_id"] for r in records}) == 20
    for record in records:
        assert json.loads(await download(client, record))["result"] == result


REAL_FILES = sorted(p for p in REALDATA.glob("*/*.json") if p.name != "govulncheck-json-stream.json")


@pytest.mark.parametrize("path", REAL_FILES, ids=lambda p: p.name)
async def test_real_documents_export_in_every_format(client: Client, job_id: str, path: Path) -> None:
    raw = path.read_bytes()
    content = b'{"status": "succeeded", "result": ' + raw + b"}"
    stored = await client.put(
        f"/v1/job-results/{job_id}", content=content, headers={"Content-Type": "application/json"}
    )
    assert stored.status_code == 201
    expected = json.loads(raw)
    for fmt in FORMATS:
        record = (await client.post(f"/v1/job-results/{job_id}/exports", json={"format": fmt})).json()
        body = await download(client, record)
        if fmt == "json":
            assert json.loads(body)["result"] == expected
        elif fmt == "ndjson":
            assert body.count(b"\n") == 1
            assert json.loads(body)["result"] == expected
        else:
            rows = list(csv.reader(io.StringIO(body.decode("utf-8"), newline="")))
            assert len(rows) == 2
            assert rows[0][:3] == ["job_id", "status", "created_at"]
            assert rows[1][:2] == [job_id, "succeeded"]
            assert len(rows[0]) == len(rows[1])


# --- range exports ------------------------------------------------------------------------------


async def make_range(client: Client, job_id: str) -> tuple[str, str, list[dict[str, Any]]]:
    start = datetime.now(UTC)
    made = [
        await put(client, f"{job_id}-a", {"metrics": {"ms": 1}, "ok": True}),
        await put(client, f"{job_id}-b", {"metrics": {"ms": 2, "cpu": 0.5}}, "failed"),
        await put(client, f"{job_id}-c", [1, 2, 3]),
        await put(client, f"{job_id}-d", "-1+1"),
    ]
    end = datetime.now(UTC) + timedelta(microseconds=1)
    return stamp(start), stamp(end), made


@pytest.mark.parametrize("fmt", FORMATS)
async def test_range_export(worker_client: Client, job_id: str, fmt: str) -> None:
    start, end, made = await make_range(worker_client, job_id)
    response = await worker_client.post(
        "/v1/exports", json={"format": fmt, "compression": "gzip", "created_from": start, "created_to": end}
    )
    assert response.status_code == 202, response.text
    queued = response.json()
    assert response.headers["location"] == f"/v1/exports/{queued['export_id']}"
    assert queued["state"] in ("queued", "running")
    record = await wait_done(worker_client, queued["export_id"])
    assert record["state"] == "succeeded", record
    assert record["rows_written"] == 4
    body = (await download(worker_client, record)).decode()
    ids = [m["job_id"] for m in made]
    if fmt == "json":
        items = json.loads(body)
        assert [i["job_id"] for i in items] == ids
        assert items[2]["result"] == [1, 2, 3]
    elif fmt == "ndjson":
        lines = body.splitlines()
        assert [json.loads(line)["job_id"] for line in lines] == ids
    else:
        rows = list(csv.reader(io.StringIO(body, newline="")))
        assert rows[0] == ["job_id", "status", "created_at", "metrics.cpu", "metrics.ms", "ok", "result"]
        assert [r[0] for r in rows[1:]] == ids
        assert rows[2][3:6] == ["0.5", "2", ""]
        assert rows[3][6] == "[1,2,3]"
        assert rows[4][6] == "'-1+1"


async def test_range_is_half_open_with_status_filter(worker_client: Client, job_id: str) -> None:
    start, _end, made = await make_range(worker_client, job_id)
    response = await worker_client.post(
        "/v1/exports",
        json={"format": "ndjson", "created_from": start, "created_to": made[3]["created_at"], "status": "succeeded"},
    )
    record = await wait_done(worker_client, response.json()["export_id"])
    lines = (await download(worker_client, record)).decode().splitlines()
    assert [json.loads(line)["job_id"] for line in lines] == [made[0]["job_id"], made[2]["job_id"]]
    assert record["status"] == "succeeded"


@pytest.mark.parametrize("fmt", ["json", "ndjson", "csv"])
async def test_range_export_with_label_status_and_prefix_filters(worker_client: Client, job_id: str, fmt: str) -> None:
    start = stamp(datetime.now(UTC))
    rows = [
        ("a", {"branch": "main", "tool": "pytest"}, "failed"),
        ("b", {"branch": "main", "tool": "jest"}, "cancelled"),
        ("c", {"branch": "dev", "tool": "pytest"}, "failed"),
        ("d", {"branch": "main", "tool": "go"}, "failed"),
        ("e", {"tool": "pytest"}, "failed"),
        ("f", {"branch": "main", "tool": "pytest"}, "succeeded"),
    ]
    for name, labels, status in rows:
        await put(worker_client, f"{job_id}-{name}", {"n": name}, status, labels)
    end = stamp(datetime.now(UTC) + timedelta(seconds=1))
    body = {
        "format": fmt,
        "created_from": start,
        "created_to": end,
        "status": ["failed", "cancelled"],
        "label": ["branch:main", "tool:pytest", "tool:jest", "branch:main"],
        "job_id_prefix": job_id,
    }
    response = await worker_client.post("/v1/exports", json=body)
    assert response.status_code == 202, response.text
    queued = response.json()
    assert queued["status"] == ["failed", "cancelled"]
    assert queued["label"] == ["branch:main", "tool:pytest", "tool:jest"]
    assert queued["job_id_prefix"] == job_id
    record = await wait_done(worker_client, queued["export_id"])
    assert record["state"] == "succeeded", record
    assert record["label"] == queued["label"]
    assert record["rows_written"] == 2
    content = (await download(worker_client, record)).decode()
    if fmt == "csv":
        table = list(csv.reader(io.StringIO(content, newline="")))
        assert [r[0] for r in table[1:]] == [f"{job_id}-a", f"{job_id}-b"]
        assert table[0] == ["job_id", "status", "created_at", "n"]  # csv unchanged: no label columns
        return
    items = json.loads(content) if fmt == "json" else [json.loads(line) for line in content.splitlines()]
    assert [i["job_id"] for i in items] == [f"{job_id}-a", f"{job_id}-b"]
    assert [i["labels"] for i in items] == [rows[0][1], rows[1][1]]


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"label": ["Branch:main"]}, "label key"),
        ({"label": [f"k{i}" for i in range(9)]}, "at most 8"),
        ({"label": "branch:main"}, "label"),
        ({"status": ["failed", "done"]}, "status"),
        ({"status": []}, "status"),
        ({"job_id_prefix": "a b"}, "job_id_prefix"),
    ],
)
async def test_bad_range_filters_are_400(client: Client, extra: dict[str, Any], fragment: str) -> None:
    body = {"format": "json", "created_from": "2026-01-01T00:00:00Z", "created_to": "2026-02-01T00:00:00Z"}
    response = await client.post("/v1/exports", json=body | extra)
    assert response.status_code == 400, response.text
    assert fragment in response.text


async def test_empty_range(worker_client: Client) -> None:
    response = await worker_client.post(
        "/v1/exports",
        json={"format": "json", "created_from": "1970-01-01T00:00:00Z", "created_to": "1970-01-02T00:00:00+01:00"},
    )
    record = await wait_done(worker_client, response.json()["export_id"])
    assert record["rows_written"] == 0
    assert json.loads(await download(worker_client, record)) == []


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"format": "json", "created_from": "2026-01-01T00:00:00Z"}, "created_to"),
        ({"format": "json", "created_from": "yesterday", "created_to": "2026-01-01T00:00:00Z"}, "RFC 3339"),
        ({"format": "json", "created_from": "2026-02-01T00:00:00Z", "created_to": "2026-01-01T00:00:00Z"}, "earlier"),
        ({"format": "pdf", "created_from": "2026-01-01T00:00:00Z", "created_to": "2026-02-01T00:00:00Z"}, "format"),
        (
            {
                "format": "csv",
                "created_from": "2026-01-01T00:00:00Z",
                "created_to": "2026-02-01T00:00:00Z",
                "status": "done",
            },
            "status",
        ),
    ],
)
async def test_bad_range_requests_are_400(client: Client, body: dict[str, Any], fragment: str) -> None:
    response = await client.post("/v1/exports", json=body)
    assert response.status_code == 400, response.text
    assert fragment in response.text


# --- reading exports ----------------------------------------------------------------------------


async def test_list_is_newest_first_and_paginated(client: Client, job_id: str) -> None:
    await put(client, job_id, {})
    ids = [
        (await client.post(f"/v1/job-results/{job_id}/exports", json={"format": "json"})).json()["export_id"]
        for _ in range(3)
    ]
    first = (await client.get("/v1/exports", params={"limit": "2", "state": "succeeded"})).json()
    assert [item["export_id"] for item in first["items"]] == ids[::-1][:2]
    second = (await client.get("/v1/exports", params={"limit": "1", "cursor": first["next_cursor"]})).json()
    assert second["items"][0]["export_id"] == ids[0]
    bad = await client.get("/v1/exports", params={"state": "lost"})
    assert bad.status_code == 400
    assert (await client.get("/v1/exports", params={"cursor": "@@"})).status_code == 400


async def test_unknown_export_is_404(client: Client) -> None:
    for path in ("/v1/exports/" + "0" * 32, "/v1/exports/" + "0" * 32 + "/content", "/v1/exports/..%2F..%2Fetc"):
        response = await client.get(path)
        assert response.status_code == 404, path
        assert response.headers["content-type"] == "application/problem+json"


async def test_a_404_echoes_only_ids_of_the_export_id_form(client: Client) -> None:
    """An export id of the right form is named; any other input is not echoed back (size, markup)."""
    well_formed = "0" * 32
    assert well_formed in (await client.get(f"/v1/exports/{well_formed}")).json()["detail"]
    hostile = "x" * 4000 + "<script>"
    for method, path in (("GET", f"/v1/exports/{hostile}"), ("DELETE", f"/v1/exports/{hostile}")):
        response = await client.request(method, path)
        assert response.status_code == 404
        detail = response.json()["detail"]
        assert "xxxx" not in detail
        assert "<script>" not in detail
        assert "32 lowercase hexadecimal characters" in detail


async def test_content_is_409_until_finished(client: Client) -> None:
    """The session app runs no export worker: a range export stays queued."""
    response = await client.post(
        "/v1/exports",
        json={"format": "json", "created_from": "1971-01-01T00:00:00Z", "created_to": "1971-01-02T00:00:00Z"},
    )
    export_id = response.json()["export_id"]
    record = (await client.get(f"/v1/exports/{export_id}")).json()
    assert record["state"] == "queued"
    assert "content_url" not in record
    content = await client.get(f"/v1/exports/{export_id}/content")
    assert content.status_code == 409
    assert "queued" in content.json()["detail"]


async def test_range_requests(client: Client, job_id: str) -> None:
    await put(client, job_id, {"data": "0123456789" * 100})
    record = (await client.post(f"/v1/job-results/{job_id}/exports", json={"format": "json"})).json()
    url = record["content_url"]
    full = (await client.get(url)).content
    size = len(full)
    etag = f'"{record["sha256"]}"'

    part = await client.get(url, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206
    assert part.content == full[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{size}"
    assert part.headers["content-length"] == "10"

    tail = await client.get(url, headers={"Range": "bytes=-5"})
    assert tail.status_code == 206
    assert tail.content == full[-5:]
    rest = await client.get(url, headers={"Range": f"bytes={size - 3}-"})
    assert rest.content == full[-3:]

    unsatisfiable = await client.get(url, headers={"Range": f"bytes={size}-"})
    assert unsatisfiable.status_code == 416
    assert unsatisfiable.headers["content-range"] == f"bytes */{size}"
    assert unsatisfiable.headers["content-type"] == "application/problem+json"

    stale_if_range = await client.get(url, headers={"Range": "bytes=0-1", "If-Range": '"other"'})
    assert stale_if_range.status_code == 200
    assert stale_if_range.content == full
    matching_if_range = await client.get(url, headers={"Range": "bytes=0-1", "If-Range": etag})
    assert matching_if_range.status_code == 206

    not_modified = await client.get(url, headers={"If-None-Match": etag})
    assert not_modified.status_code == 304
    assert (await client.get(url)).headers["accept-ranges"] == "bytes"


async def test_export_files_never_served_statically(client: Client, job_id: str) -> None:
    await put(client, job_id, {})
    record = (await client.post(f"/v1/job-results/{job_id}/exports", json={"format": "json"})).json()
    for path in (f"/exports/{record['export_id']}.json", f"/data/exports/{record['export_id']}.json"):
        assert (await client.get(path)).status_code == 404
    assert os.sep not in record["content_url"].removeprefix("/v1/exports/").removesuffix("/content")


async def test_export_requests_must_be_json(client: Client, job_id: str) -> None:
    await put(client, job_id, {})
    single = await client.post(
        f"/v1/job-results/{job_id}/exports", content=b'{"format":"csv"}', headers={"Content-Type": "text/plain"}
    )
    assert single.status_code == 415
    ranged = await client.post(
        "/v1/exports",
        content=b'{"format":"csv","created_from":"2026-01-01T00:00:00Z","created_to":"2026-01-02T00:00:00Z"}',
        headers={"Content-Type": "text/plain"},
    )
    assert ranged.status_code == 415


async def test_ranges_the_server_does_not_serve_are_ignored(client: Client, job_id: str) -> None:
    await put(client, job_id, {"data": "x" * 100})
    record = (await client.post(f"/v1/job-results/{job_id}/exports", json={"format": "json"})).json()
    full = (await client.get(record["content_url"])).content
    for header in ("items=0-1", "garbage", "bytes=0-1,5-6", "bytes=5-2"):
        response = await client.get(record["content_url"], headers={"Range": header})
        assert response.status_code == 200, header
        assert response.content == full


async def test_own_visibility_hides_other_keys_exports(
    settings: Settings, database_url: str, job_id: str, exports_dir: Path
) -> None:
    app = create_app(msgspec.structs.replace(settings, exports_visibility="own", exports_dir=str(exports_dir)))
    alice = {"Authorization": f"Bearer {make_token(database_url, name='alice')}"}
    bob = {"Authorization": f"Bearer {make_token(database_url, name='bob')}"}
    async with AsyncTestClient(app=app) as test_client:
        await test_client.put(f"/v1/job-results/{job_id}", json={"status": "succeeded", "result": 1}, headers=alice)
        mine = (
            await test_client.post(f"/v1/job-results/{job_id}/exports", json={"format": "json"}, headers=alice)
        ).json()
        export_url = f"/v1/exports/{mine['export_id']}"
        assert (await test_client.get(export_url, headers=alice)).status_code == 200
        assert (await test_client.get(export_url + "/content", headers=alice)).status_code == 200
        assert (await test_client.get(export_url, headers=bob)).status_code == 404
        assert (await test_client.get(export_url + "/content", headers=bob)).status_code == 404
        listed = (await test_client.get("/v1/exports", headers=bob)).json()["items"]
        assert mine["export_id"] not in [item["export_id"] for item in listed]


async def test_any_visibility_is_the_default(client: Client, database_url: str, job_id: str) -> None:
    await put(client, job_id, {})
    record = (await client.post(f"/v1/job-results/{job_id}/exports", json={"format": "json"})).json()
    other = {"Authorization": f"Bearer {make_token(database_url, ('exports:read',), name='reader')}"}
    assert (await client.get(record["content_url"], headers=other)).status_code == 200
