"""Export lifecycle with the ``s3`` store, against the real SeaweedFS of ``test_s3_store``: deletion removes
the object, expiry caps presigned URLs and then answers 410, cancellation midway leaves no object, and
the purge removes expired objects.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path

import pytest
from obstore.store import S3Store

from config.settings import Settings
from exports.store import open_store
from repositories.database import Database
from repositories.domain import utcnow
from service.app import create_app
from service.export_purge import ExportPurge
from tests.exports.test_cancellation import seed_rows
from tests.exports.test_lifecycle import set_expiry
from tests.exports.test_s3_store import (  # noqa: F401 - fixtures used by name
    Client,
    keys_of,
    put_job,
    raw_store,
    replica_a,
    replica_b,
    s3_database_url,
    s3_settings,
    seaweedfs,
    started,
    token,
)
from tests.seaweedfs import SeaweedFS
from tests.support.exports import wait_done


async def _export(client: Client) -> dict[str, str]:
    stored = await put_job(client, {"pad": "z" * 3000})
    response = await client.post(f"/v1/job-results/{stored['job_id']}/exports", json={"format": "json"})
    assert response.status_code == 201, response.text
    record: dict[str, str] = response.json()
    return record


async def test_delete_removes_the_object_and_content_is_410(
    replica_a: Client, replica_b: Client, raw_store: S3Store
) -> None:
    record = await _export(replica_a)
    assert await keys_of(raw_store, record["export_id"])
    deleted = await replica_b.delete(f"/v1/exports/{record['export_id']}")
    assert deleted.json()["state"] == "deleted"
    assert await keys_of(raw_store, record["export_id"]) == []
    assert (await replica_a.get(record["content_url"])).status_code == 410


async def test_redirect_urls_never_outlive_the_export(
    seaweedfs: SeaweedFS, s3_database_url: str, token: str, tmp_path: Path, replica_a: Client
) -> None:
    record = await _export(replica_a)
    settings = s3_settings(
        s3_database_url, tmp_path, seaweedfs.endpoint, export_worker=False, exports_download="redirect"
    )
    assert settings.exports_url_ttl_s == 60
    async for client in started(create_app(settings), token):
        response = await client.get(record["content_url"], follow_redirects=False)
        assert "X-Amz-Expires=60" in response.headers["location"]
        set_expiry(s3_database_url, record["export_id"], utcnow() + timedelta(seconds=20))
        response = await client.get(record["content_url"], follow_redirects=False)
        assert response.status_code == 302
        expires = int(response.headers["location"].split("X-Amz-Expires=")[1].split("&")[0])
        assert 18 <= expires <= 20  # capped at the export's remaining lifetime
        set_expiry(s3_database_url, record["export_id"], utcnow() - timedelta(seconds=1))
        gone = await client.get(record["content_url"], follow_redirects=False)
        assert gone.status_code == 410
        assert "location" not in gone.headers


async def test_the_purge_removes_expired_objects(
    seaweedfs: SeaweedFS, s3_database_url: str, tmp_path: Path, replica_a: Client, raw_store: S3Store
) -> None:
    expired, kept = await _export(replica_a), await _export(replica_a)
    now = utcnow()
    set_expiry(s3_database_url, expired["export_id"], now - timedelta(seconds=1))
    settings: Settings = s3_settings(s3_database_url, tmp_path, seaweedfs.endpoint, export_worker=False)
    db = await Database.open(settings)
    try:
        purge = ExportPurge(open_store(settings))
        batch = await purge.purge_batch(db, now, 1000, dry_run=False)
    finally:
        await db.close()
    assert f"export {expired['export_id']}: expired job export" in "\n".join(batch.items)
    assert await keys_of(raw_store, expired["export_id"]) == []
    assert await keys_of(raw_store, kept["export_id"])
    assert (await replica_a.get(f"/v1/exports/{expired['export_id']}")).status_code == 404


@pytest.mark.slow  # seeds 1M rows
async def test_cancelling_a_running_upload_leaves_no_object(
    s3_database_url: str, replica_a: Client, replica_b: Client, raw_store: S3Store
) -> None:
    seed_rows(s3_database_url, 1_000_000)  # on 2021-01-01, a day no other test of the module uses
    created = await replica_b.post(
        "/v1/exports",
        json={"format": "ndjson", "created_from": "2021-01-01T00:00:00Z", "created_to": "2021-01-02T00:00:00Z"},
    )
    url = created.headers["location"]
    export_id = created.json()["export_id"]
    deadline = time.monotonic() + 60
    while True:
        record = (await replica_b.get(url)).json()
        if record["state"] == "running" and record["rows_written"] > 200_000:  # past the first 5 MiB parts
            break
        assert record["state"] in ("queued", "running"), record
        assert time.monotonic() < deadline, record
        await asyncio.sleep(0.05)
    assert (await replica_b.delete(url)).json()["state"] == "cancelled"
    # The worker (replica a) is free again once it has aborted the upload: the next export runs there.
    after = await _export(replica_b)
    queued = await replica_b.post(
        "/v1/exports",
        json={"format": "json", "created_from": "2019-01-01T00:00:00Z", "created_to": "2019-01-02T00:00:00Z"},
    )
    assert (await wait_done(replica_b, queued.json()["export_id"]))["state"] == "succeeded"
    assert after["state"] == "succeeded"
    assert await keys_of(raw_store, export_id) == []
    final = (await replica_b.get(url)).json()
    assert final["state"] == "cancelled"
    assert final["rows_written"] < 1_000_000
