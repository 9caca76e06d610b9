"""Export lifecycle through the API: expiry (410, listed as expired), DELETE, cancellation, the job cascade.

The purge task (``service/export_purge.py``) is tested by calling it directly, on a database of its own (a
purge at a far ``now`` would otherwise touch the other tests' exports).
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from config.settings import Settings, SettingsError
from exports.store import ExportStore, open_store
from repositories.database import Database
from repositories.domain import utcnow
from service.app import create_app
from service.export_purge import ExportPurge
from tests.conftest import connect, fresh_database, make_token

Client = AsyncTestClient[Litestar]


async def put_job(client: Client, job_id: str, result: object = None) -> None:
    body = {"status": "succeeded", "result": result if result is not None else {"n": 1}}
    response = await client.put(f"/v1/job-results/{job_id}", json=body)
    assert response.status_code in (200, 201), response.text


async def export_job(client: Client, job_id: str, fmt: str = "json") -> dict[str, Any]:
    response = await client.post(f"/v1/job-results/{job_id}/exports", json={"format": fmt})
    assert response.status_code == 201, response.text
    record: dict[str, Any] = response.json()
    return record


def set_expiry(database_url: str, export_id: str, expires_at: datetime) -> None:
    """Move an export's expiry (and with it, when the purge takes it up), as time passing would."""
    with connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE exports SET expires_at = %s, purge_at = %s WHERE export_id = %s",
            (expires_at, expires_at, export_id),
        )


def file_of(settings: Settings, record: dict[str, Any]) -> Path:
    return settings.exports_path / f"{record['export_id']}.{record['format']}"


def assert_problem(response: Any, status: int, slug: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["type"].endswith(f"/{slug}"), response.json()


# --- settings -----------------------------------------------------------------------------------


def test_retention_days_default_and_validation() -> None:
    assert Settings.from_env({}, database_url="mysql://u@h/d").export_retention_days == 30
    for bad in ("0", "3651", "soon"):
        with pytest.raises(SettingsError, match="JOBRESULTS_EXPORT_RETENTION_DAYS"):
            Settings.from_env({"JOBRESULTS_EXPORT_RETENTION_DAYS": bad}, database_url="mysql://u@h/d")


# --- expiry -------------------------------------------------------------------------------------


async def test_a_finished_export_expires_retention_days_after_it_finished(client: Client, job_id: str) -> None:
    await put_job(client, job_id)
    record = await export_job(client, job_id)
    finished = datetime.fromisoformat(record["finished_at"].replace("Z", "+00:00"))
    expires = datetime.fromisoformat(record["expires_at"].replace("Z", "+00:00"))
    assert expires - finished == timedelta(days=30)


async def test_an_expired_export_is_410_at_once_and_listed_as_expired(
    client: Client, settings: Settings, database_url: str, job_id: str
) -> None:
    await put_job(client, job_id)
    record = await export_job(client, job_id)
    assert (await client.get(record["content_url"])).status_code == 200
    set_expiry(database_url, record["export_id"], utcnow() - timedelta(seconds=1))

    response = await client.get(record["content_url"])
    assert_problem(response, 410, "export-expired")
    # Enforced before the purge ran: the file is still on disk, but nobody gets it.
    assert file_of(settings, record).exists()
    etag = f'"{record["sha256"]}"'
    assert (await client.get(record["content_url"], headers={"If-None-Match": etag})).status_code == 410
    seen = (await client.get(f"/v1/exports/{record['export_id']}")).json()
    assert seen["state"] == "expired"
    assert "content_url" not in seen
    expired = (await client.get("/v1/exports", params={"state": "expired", "limit": 1000})).json()["items"]
    assert record["export_id"] in [item["export_id"] for item in expired]
    succeeded = (await client.get("/v1/exports", params={"state": "succeeded", "limit": 1000})).json()["items"]
    assert record["export_id"] not in [item["export_id"] for item in succeeded]


# --- DELETE -------------------------------------------------------------------------------------


async def test_delete_removes_the_file_and_is_idempotent(client: Client, settings: Settings, job_id: str) -> None:
    await put_job(client, job_id)
    record = await export_job(client, job_id)
    path = file_of(settings, record)
    assert path.exists()
    url = f"/v1/exports/{record['export_id']}"

    first = await client.delete(url)
    assert first.status_code == 200, first.text
    assert first.json()["state"] == "deleted"
    assert "content_url" not in first.json()
    assert not path.exists()
    assert_problem(await client.get(record["content_url"]), 410, "export-deleted")

    second = await client.delete(url)
    assert second.status_code == 200
    assert second.json() == first.json()
    assert (await client.get(url)).json()["state"] == "deleted"
    deleted = (await client.get("/v1/exports", params={"state": "deleted", "limit": 1000})).json()["items"]
    assert record["export_id"] in [item["export_id"] for item in deleted]


async def test_delete_needs_exports_write_and_unknown_ids_are_404(
    client: Client, database_url: str, job_id: str
) -> None:
    await put_job(client, job_id)
    record = await export_job(client, job_id)
    reader = {"Authorization": f"Bearer {make_token(database_url, ('exports:read',), name='reader')}"}
    assert (await client.delete(f"/v1/exports/{record['export_id']}", headers=reader)).status_code == 403
    assert (await client.post(f"/v1/exports/{record['export_id']}/cancel", headers=reader)).status_code == 403
    assert (await client.get(record["content_url"])).status_code == 200
    assert_problem(await client.delete("/v1/exports/" + "0" * 32), 404, "export-not-found")
    assert_problem(await client.delete("/v1/exports/not-an-id"), 404, "export-not-found")


async def test_own_visibility_lets_only_the_requester_delete(
    settings: Settings, database_url: str, job_id: str, exports_dir: Path
) -> None:
    own = msgspec.structs.replace(settings, exports_visibility="own", exports_dir=str(exports_dir))
    alice = {"Authorization": f"Bearer {make_token(database_url, name='alice')}"}
    bob = {"Authorization": f"Bearer {make_token(database_url, name='bob')}"}
    async with AsyncTestClient(app=create_app(own)) as test_client:
        test_client.headers.update(alice)
        await put_job(test_client, job_id)
        mine = await export_job(test_client, job_id)
        url = f"/v1/exports/{mine['export_id']}"
        assert_problem(await test_client.delete(url, headers=bob), 404, "export-not-found")
        assert_problem(await test_client.post(url + "/cancel", headers=bob), 404, "export-not-found")
        assert (await test_client.get(mine["content_url"])).status_code == 200  # bob changed nothing
        assert (await test_client.delete(url)).json()["state"] == "deleted"
        assert not (exports_dir / f"{mine['export_id']}.json").exists()


# --- cancellation -------------------------------------------------------------------------------


async def test_a_queued_export_is_cancelled_and_cancel_of_a_finished_one_is_409(client: Client, job_id: str) -> None:
    # The session app runs no worker: a range export stays queued.
    queued = await client.post(
        "/v1/exports",
        json={"format": "ndjson", "created_from": "2020-01-01T00:00:00Z", "created_to": "2020-01-02T00:00:00Z"},
    )
    assert queued.status_code == 202
    url = queued.headers["location"]

    cancelled = await client.delete(url)
    assert cancelled.status_code == 200
    body = cancelled.json()
    assert body["state"] == "cancelled"
    assert body["expires_at"]
    assert body["finished_at"]
    assert_problem(await client.get(url + "/content"), 409, "export-not-ready")
    # Idempotent both ways: a cancelled export stays cancelled.
    assert (await client.delete(url)).json() == body
    again = await client.post(url + "/cancel")
    assert again.status_code == 200
    assert again.json() == body

    other = await client.post(
        "/v1/exports",
        json={"format": "csv", "created_from": "2020-01-01T00:00:00Z", "created_to": "2020-01-02T00:00:00Z"},
    )
    assert (await client.post(other.headers["location"] + "/cancel")).json()["state"] == "cancelled"

    await put_job(client, job_id)
    finished = await export_job(client, job_id)
    finished_url = f"/v1/exports/{finished['export_id']}"
    response = await client.post(finished_url + "/cancel")
    assert_problem(response, 409, "export-finished")
    assert "succeeded" in response.json()["detail"]
    assert (await client.get(finished["content_url"])).status_code == 200  # the refused cancel changed nothing
    await client.delete(finished_url)
    assert_problem(await client.post(finished_url + "/cancel"), 409, "export-finished")


# --- the cascade from a deleted job -------------------------------------------------------------


async def test_deleting_a_job_deletes_its_single_job_exports(client: Client, settings: Settings, job_id: str) -> None:
    await put_job(client, job_id)
    exports = [await export_job(client, job_id, fmt) for fmt in ("json", "csv")]
    await put_job(client, f"{job_id}-other")
    other = await export_job(client, f"{job_id}-other")
    assert all(file_of(settings, record).exists() for record in [*exports, other])

    assert (await client.delete(f"/v1/job-results/{job_id}")).status_code == 204
    for record in exports:
        assert not file_of(settings, record).exists()
        assert (await client.get(f"/v1/exports/{record['export_id']}")).json()["state"] == "deleted"
        assert_problem(await client.get(record["content_url"]), 410, "export-deleted")
    # Another job's export is untouched; a job created again under the same id starts afresh.
    assert (await client.get(other["content_url"])).status_code == 200
    await put_job(client, job_id)
    assert (await client.get((await export_job(client, job_id))["content_url"])).status_code == 200


async def test_an_expired_jobs_exports_are_410_at_once_and_after_it_is_written_anew(
    client: Client, database_url: str, job_id: str
) -> None:
    """Expiry hides a result from readers at once: its single-job exports too, before any purge."""
    await put_job(client, job_id, {"secret": 1})
    record = await export_job(client, job_id)
    assert (await client.get(record["content_url"])).status_code == 200
    with connect(database_url) as conn, conn.cursor() as cur:
        past = utcnow() - timedelta(seconds=1)
        cur.execute("UPDATE job_results SET expires_at = %s WHERE job_id = %s", (past, job_id))
    assert_problem(await client.get(record["content_url"]), 410, "export-source-gone")
    # A result written anew over the expired one is another result: the old export stays gone.
    await put_job(client, job_id, {"secret": 2})
    assert_problem(await client.get(record["content_url"]), 410, "export-source-gone")
    fresh = await export_job(client, job_id)
    assert (await client.get(fresh["content_url"])).json()["result"] == {"secret": 2}


# --- the purge ----------------------------------------------------------------------------------


@pytest.fixture
async def own_app(settings: Settings, server_url: str, exports_dir: Path) -> AsyncIterator[tuple[Client, Settings]]:
    """An app (no worker) on a database of its own, and its settings."""
    with fresh_database(server_url, "jr_purge") as url:
        own = msgspec.structs.replace(settings, database_url=url, exports_dir=str(exports_dir))
        async with AsyncTestClient(app=create_app(own)) as test_client:
            test_client.headers.update({"Authorization": f"Bearer {make_token(url)}"})
            yield test_client, own


def _rows(database_url: str) -> dict[str, tuple[str, Any, Any]]:
    with connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT export_id, state, file_name, purge_at FROM exports")
        return {row[0]: (row[1], row[2], row[3]) for row in cur.fetchall()}


async def test_the_purge_removes_expired_and_deleted_exports_and_nothing_else(
    own_app: tuple[Client, Settings], exports_dir: Path, job_id: str
) -> None:
    client, own = own_app
    url = own.database_url
    db = await Database.open(own)  # the app's pool lives on the test client's own event loop
    try:
        await _purge_scenario(client, db, open_store(own), url, exports_dir, job_id)
    finally:
        await db.close()


async def _purge_scenario(
    client: Client, db: Database, store: ExportStore, url: str, exports_dir: Path, job_id: str
) -> None:
    webhook = await client.post("/v1/webhooks", json={"url": "https://1.1.1.1/hook", "events": ["export.expired"]})
    assert webhook.status_code == 201, webhook.text
    await put_job(client, job_id)
    expired, deleted, kept = [await export_job(client, job_id) for _ in range(3)]
    now = utcnow()
    set_expiry(url, expired["export_id"], now - timedelta(hours=1))
    # A deletion whose process died before it removed the file: marked deleted, file still there.
    with connect(url) as conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE exports SET state = 'deleted', purge_at = %s WHERE export_id = %s", (now, deleted["export_id"])
        )
    cancelled = await client.post(
        "/v1/exports",
        json={"format": "ndjson", "created_from": "2020-01-01T00:00:00Z", "created_to": "2020-01-02T00:00:00Z"},
    )
    cancelled_id = (await client.delete(cancelled.headers["location"])).json()["export_id"]
    set_expiry(url, cancelled_id, now - timedelta(minutes=1))
    purge = ExportPurge(store)
    assert purge.name == "exports"
    assert await purge.oldest_due(db, now) == now - timedelta(hours=1)

    dry = await purge.purge_batch(db, now, 100, dry_run=True)
    assert dry.rows == 3
    assert dry.bytes == expired["bytes"] + deleted["bytes"]
    assert len(dry.items) == 3
    assert any(expired["export_id"] in item and "expired" in item for item in dry.items)
    assert all((exports_dir / f"{r['export_id']}.json").exists() for r in (expired, deleted, kept))
    assert len(_rows(url)) == 4

    first = await purge.purge_batch(db, now, 2, dry_run=False)  # small batches: oldest due first
    assert first.rows == 2
    rest = await purge.purge_batch(db, now, 100, dry_run=False)
    assert rest.rows == 1
    assert first.bytes + rest.bytes == expired["bytes"] + deleted["bytes"]
    assert (await purge.purge_batch(db, now, 100, dry_run=False)).rows == 0
    assert await purge.oldest_due(db, now) is None

    rows = _rows(url)
    assert set(rows) == {deleted["export_id"], kept["export_id"]}  # expired and cancelled records are gone
    state, file_name, purge_at = rows[deleted["export_id"]]
    assert (state, file_name) == ("deleted", None)
    assert purge_at > now  # the deleted record stays (DELETE stays idempotent) until it expires
    assert not (exports_dir / f"{expired['export_id']}.json").exists()
    assert not (exports_dir / f"{deleted['export_id']}.json").exists()
    assert (await client.get(kept["content_url"])).status_code == 200
    assert (await client.get(f"/v1/exports/{expired['export_id']}")).status_code == 404
    assert (await client.delete(f"/v1/exports/{deleted['export_id']}")).json()["state"] == "deleted"

    with connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT event_type, payload FROM webhook_outbox ORDER BY id")
        events = cur.fetchall()
    assert [event_type for event_type, _ in events] == ["export.expired"]
    data = json.loads(events[0][1])["data"]
    assert data["export_id"] == expired["export_id"]
    assert data["state"] == "expired"
    assert data["job_id"] == job_id

    # Later, the deleted record's own expiry comes: then it goes too.
    later = purge_at  # due at exactly its purge_at; ``kept`` finished later, so it is not due yet
    assert (await purge.purge_batch(db, later, 100, dry_run=False)).rows == 1
    assert set(_rows(url)) == {kept["export_id"]}


async def test_an_export_racing_the_delete_of_its_job_waits_for_it_and_finds_no_job(
    client: Client, database_url: str, job_id: str
) -> None:
    """The job's DELETE has removed the row but not committed yet when the export starts.

    Read without a lock (a snapshot), the export would still see the job, record an export after the
    DELETE's cascade had looked for them, and outlive the job. It share-locks the row instead: it waits
    for the DELETE and then finds no job (404), so nothing of the job is left.
    """
    await put_job(client, job_id)
    deleting = connect(database_url)
    try:
        with deleting.cursor() as cur:
            cur.execute("BEGIN")
            cur.execute("DELETE FROM job_results WHERE job_id = %s", (job_id,))
        committer = threading.Timer(0.3, deleting.commit)  # while the export waits for the row lock
        committer.start()
        response = await client.post(f"/v1/job-results/{job_id}/exports", json={"format": "json"})
        committer.join()
    finally:
        deleting.close()
    assert response.status_code == 404, response.text
    with connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM exports WHERE job_id = %s", (job_id,))
        assert cur.fetchone() == (0,)
