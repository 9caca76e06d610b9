"""``JOBRESULTS_EXPORT_MAX_BYTES``: an export that would pass it fails with a clear error and leaves no file.

The app runs in-process with a database of its own (the session app's worker would claim the range
exports otherwise) and a 20,000-byte cap; the exported job result is ~50 KB.
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

LIMIT = 20_000
BIG = {"log": ["x" * 100 for _ in range(500)]}
"""~51 KB of JSON (and ~1 KB gzip-compressed: the cap counts bytes as stored)."""
TOO_LARGE = f"the export is larger than the limit of {LIMIT} bytes; export a narrower range"


@pytest.fixture(scope="module")
def capped_database_url(server_url: str) -> Iterator[str]:
    with fresh_database(server_url, "jr_cap") as url:
        yield url


@pytest.fixture
async def capped(
    settings: Settings, capped_database_url: str, tmp_path: Path
) -> AsyncIterator[AsyncTestClient[Litestar]]:
    app = create_app(
        msgspec.structs.replace(
            settings,
            database_url=capped_database_url,
            exports_dir=str(tmp_path),
            export_max_bytes=LIMIT,
            export_worker=True,
        )
    )
    async with AsyncTestClient(app=app) as client:
        client.headers["Authorization"] = f"Bearer {make_token(capped_database_url)}"
        yield client


async def _put(client: AsyncTestClient[Litestar], result: Any) -> dict[str, Any]:
    job_id = f"cap-{uuid.uuid4().hex}"
    created = await client.put(f"/v1/job-results/{job_id}", json={"status": "succeeded", "result": result})
    assert created.status_code == 201, created.text
    body: dict[str, Any] = created.json()
    return body


def _window(created_at: str) -> dict[str, str]:
    at = datetime.fromisoformat(created_at)
    return {
        "created_from": created_at,
        "created_to": (at + timedelta(microseconds=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }


async def test_single_job_export_over_the_cap_is_refused_and_leaves_nothing(
    capped: AsyncTestClient[Litestar], capped_database_url: str, tmp_path: Path
) -> None:
    big = await _put(capped, BIG)
    response = await capped.post(f"/v1/job-results/{big['job_id']}/exports", json={"format": "json"})
    assert response.status_code == 507, response.text
    assert response.json()["detail"] == TOO_LARGE
    assert list(tmp_path.iterdir()) == []
    with connect(capped_database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM exports WHERE kind = 'job'")
        assert cur.fetchone() == (0,)
    # Compressed, the same document fits: the cap counts bytes as stored.
    fits = await capped.post(f"/v1/job-results/{big['job_id']}/exports", json={"format": "json", "compression": "gzip"})
    assert fits.status_code == 201, fits.text


async def test_range_export_over_the_cap_fails_and_leaves_nothing(
    capped: AsyncTestClient[Litestar], tmp_path: Path
) -> None:
    big = await _put(capped, BIG)
    queued = await capped.post("/v1/exports", json={"format": "ndjson", **_window(big["created_at"])})
    assert queued.status_code == 202, queued.text
    record = await wait_done(capped, queued.json()["export_id"])
    assert (record["state"], record["error"]) == ("failed", TOO_LARGE)
    assert record.get("content_url") is None
    assert list(tmp_path.iterdir()) == []
