"""``JOBRESULTS_CSV_MAX_COLUMNS``: a CSV export wider than the cap fails with a clear error, leaves no file.

One document with 100k keys once turned 1.5 MB of stored data into a 101 MB CSV (issue 12 item 6).
The app runs in-process with a database of its own, its export worker on, and a cap of 10 columns.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from config.settings import Settings
from service.app import create_app
from tests.conftest import connect, fresh_database, make_token
from tests.support.exports import wait_done

LIMIT = 10
TOO_WIDE = "the CSV would have more than 10 result columns; export json or ndjson instead, or a narrower range"
WIDE = {f"k{i:03d}": i for i in range(LIMIT + 1)}
"""One more key than the cap allows."""


@pytest.fixture(scope="module")
def narrow_database_url(server_url: str) -> Iterator[str]:
    with fresh_database(server_url, "jr_csvcols") as url:
        yield url


@pytest.fixture
async def narrow(
    settings: Settings, narrow_database_url: str, tmp_path: Path
) -> AsyncIterator[AsyncTestClient[Litestar]]:
    app = create_app(
        msgspec.structs.replace(
            settings,
            database_url=narrow_database_url,
            exports_dir=str(tmp_path),
            csv_max_columns=LIMIT,
            export_worker=True,
        )
    )
    async with AsyncTestClient(app=app) as client:
        client.headers["Authorization"] = f"Bearer {make_token(narrow_database_url)}"
        yield client


async def _put(client: AsyncTestClient[Litestar], result: Any) -> dict[str, Any]:
    created = await client.put(
        f"/v1/job-results/csvcols-{uuid.uuid4().hex}", json={"status": "succeeded", "result": result}
    )
    assert created.status_code == 201, created.text
    body: dict[str, Any] = created.json()
    return body


async def test_single_job_csv_wider_than_the_cap_is_422_and_leaves_nothing(
    narrow: AsyncTestClient[Litestar], narrow_database_url: str, tmp_path: Path
) -> None:
    wide = await _put(narrow, WIDE)
    response = await narrow.post(f"/v1/job-results/{wide['job_id']}/exports", json={"format": "csv"})
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["type"].endswith("/csv-too-wide")
    assert problem["detail"] == TOO_WIDE
    assert list(tmp_path.iterdir()) == []
    with connect(narrow_database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM exports WHERE kind = 'job'")
        assert cur.fetchone() == (0,)
    # The same document exports as ndjson, and a document at the cap still exports as csv.
    assert (
        await narrow.post(f"/v1/job-results/{wide['job_id']}/exports", json={"format": "ndjson"})
    ).status_code == 201
    fits = await _put(narrow, {f"k{i:03d}": i for i in range(LIMIT)})
    assert (await narrow.post(f"/v1/job-results/{fits['job_id']}/exports", json={"format": "csv"})).status_code == 201


async def test_range_csv_whose_union_passes_the_cap_fails_and_leaves_nothing(
    narrow: AsyncTestClient[Litestar], tmp_path: Path
) -> None:
    # Each document alone fits; their union of columns (12) does not.
    first = await _put(narrow, {f"a{i}": i for i in range(6)})
    await _put(narrow, {f"b{i}": i for i in range(6)})
    start = datetime.fromisoformat(first["created_at"])
    window = {
        "created_from": first["created_at"],
        "created_to": (start + timedelta(seconds=30)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }
    queued = await narrow.post("/v1/exports", json={"format": "csv", **window})
    assert queued.status_code == 202, queued.text
    record = await wait_done(narrow, queued.json()["export_id"])
    assert (record["state"], record["error"]) == ("failed", TOO_WIDE)
    assert record.get("content_url") is None
    assert [p.name for p in tmp_path.iterdir()] == []
    # ndjson of the same range is not affected.
    again = await narrow.post("/v1/exports", json={"format": "ndjson", **window})
    assert (await wait_done(narrow, again.json()["export_id"]))["state"] == "succeeded"


async def test_range_csv_with_chosen_columns_reads_the_rows_once_and_ignores_the_cap(
    narrow: AsyncTestClient[Litestar],
) -> None:
    # The union of the columns (12) passes the cap, which only the discovery pass checks: with chosen
    # columns there is no discovery pass, so the export succeeds with exactly the chosen columns.
    first = await _put(narrow, {f"a{i}": i for i in range(6)})
    second = await _put(narrow, {f"b{i}": i for i in range(6)})
    start = datetime.fromisoformat(first["created_at"])
    window = {
        "created_from": first["created_at"],
        "created_to": (start + timedelta(seconds=30)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }
    columns = ["b5", "a0", "a5"]
    queued = await narrow.post("/v1/exports", json={"format": "csv", "columns": columns, **window})
    record = await wait_done(narrow, queued.json()["export_id"])
    assert record["state"] == "succeeded", record
    content = await narrow.get(record["content_url"])
    lines = content.text.splitlines()
    assert lines[0] == "job_id,status,created_at,b5,a0,a5"
    by_job = {line.split(",")[0]: line.split(",")[3:] for line in lines[1:]}
    assert by_job[first["job_id"]] == ["", "0", "5"]
    assert by_job[second["job_id"]] == ["5", "", ""]
