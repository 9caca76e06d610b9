"""Cancelling and deleting range exports while a worker runs them, and the races with their final rename.

Each test has a database and an export directory of its own. The worker is either an app's own
background worker (cancellation in the middle of a 1M-row export) or an :class:`ExportService` run here
on the test's loop, paused at the seam the race is about; DELETE always goes through the API.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from config.settings import Settings
from exports.files import LocalStore, LocalWriter
from exports.pipeline import ExportService
from exports.store import ExportWriter
from repositories.database import Database
from service.app import create_app
from tests.conftest import connect, fresh_database, make_token
from tests.support.exports import wait_done
from tests.support.servers import Servers

Client = AsyncTestClient[Litestar]
BIG_ROWS = 1_000_000
RANGE = {"created_from": "2021-01-01T00:00:00Z", "created_to": "2021-01-02T00:00:00Z"}
_DIGITS = "(SELECT 0 d UNION ALL " + " UNION ALL ".join(f"SELECT {i}" for i in range(1, 10)) + ")"


def seed_rows(database_url: str, count: int) -> None:
    """``count`` (a power of ten) small results on 2021-01-01, inserted by the server in one statement."""
    digits = len(str(count)) - 1
    number = " + ".join(f"{10**i} * t{i}.d" for i in range(digits))
    tables = " CROSS JOIN ".join(f"{_DIGITS} t{i}" for i in range(digits))
    with connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO job_results (job_id, status, result_data, created_at, updated_at) "
            "SELECT CONCAT('big-', n), 'succeeded', CONCAT('{\"n\": ', n, ', \"tests\": 12, \"ok\": true}'), "
            "'2021-01-01' + INTERVAL n MICROSECOND, '2021-01-01' + INTERVAL n MICROSECOND "
            f"FROM (SELECT {number} AS n FROM {tables}) numbers"
        )


def leftovers(directory: Path, export_id: str) -> list[str]:
    """Every file of this export in the directory: final or temporary."""
    return sorted(p.name for p in directory.glob(f"*{export_id}*")) if directory.exists() else []


@pytest.fixture
def own_database(server_url: str) -> Iterator[str]:
    with fresh_database(server_url, "jr_cancel") as url:
        yield url


def own_settings(settings: Settings, database_url: str, exports_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"export_worker": False, **overrides}
    return msgspec.structs.replace(settings, database_url=database_url, exports_dir=str(exports_dir), **values)


@pytest.fixture
async def api(settings: Settings, own_database: str, exports_dir: Path) -> AsyncIterator[Client]:
    """The API without a worker, on this test's database and directory."""
    async with AsyncTestClient(app=create_app(own_settings(settings, own_database, exports_dir))) as client:
        client.headers.update({"Authorization": f"Bearer {make_token(own_database)}"})
        yield client


# --- cancellation in the middle of a big export --------------------------------------------------


@pytest.mark.slow  # seeding 1M rows takes about 10 s on the 2-core development machine
async def test_cancelling_a_million_row_export_midway_leaves_no_file_within_two_seconds(
    settings: Settings, own_database: str, exports_dir: Path
) -> None:
    seed_rows(own_database, BIG_ROWS)
    with_worker = own_settings(settings, own_database, exports_dir, export_worker=True)
    async with AsyncTestClient(app=create_app(with_worker)) as client:
        client.headers.update({"Authorization": f"Bearer {make_token(own_database)}"})
        created = await client.post("/v1/exports", json={"format": "ndjson", **RANGE})
        assert created.status_code == 202
        url = created.headers["location"]
        export_id = created.json()["export_id"]
        deadline = time.monotonic() + 60
        while True:  # running, with rows written (progress is recorded at each lease renewal)
            record = (await client.get(url)).json()
            if record["state"] == "running" and record["rows_written"] > 0:
                break
            assert record["state"] in ("queued", "running"), record
            assert time.monotonic() < deadline, record
            await asyncio.sleep(0.05)
        assert leftovers(exports_dir, export_id)  # its temporary file is being written

        cancelled_at = time.monotonic()
        response = await client.delete(url)
        assert response.status_code == 200
        assert response.json()["state"] == "cancelled"
        while leftovers(exports_dir, export_id):  # the worker notices, aborts its writer, removes its file
            assert time.monotonic() - cancelled_at < 2.0, leftovers(exports_dir, export_id)
            await asyncio.sleep(0.02)
        stopped_after = time.monotonic() - cancelled_at
        final = (await client.get(url)).json()
        assert final["state"] == "cancelled"
        assert 0 < final["rows_written"] < BIG_ROWS, final  # it was stopped in the middle
        assert stopped_after < 2.0
        print(f"cancelled at row {final['rows_written']} of {BIG_ROWS}; no file left after {stopped_after:.2f} s")

        # The worker is free again: the next export runs (and the cancelled one never reappears).
        small = await client.post(
            "/v1/exports",
            json={"format": "json", "created_from": "2020-01-01T00:00:00Z", **{"created_to": "2020-01-02T00:00:00Z"}},
        )
        assert (await wait_done(client, small.json()["export_id"], limit_s=30))["state"] == "succeeded"
        assert leftovers(exports_dir, export_id) == []
        assert (await client.get(url)).json()["state"] == "cancelled"


# --- the races with the final rename and commit -------------------------------------------------


class PausedBeforeFinish(ExportService):
    """A worker that stops after writing the whole file, just before ``_finish`` (lock, rename, mark)."""

    def __init__(self, db: Database, settings: Settings) -> None:
        super().__init__(db, settings)
        self.at_finish = asyncio.Event()
        self.go_on = asyncio.Event()

    async def _finish(self, export: Any, file: ExportWriter, extension: str, rows_written: int) -> int:
        self.at_finish.set()
        await self.go_on.wait()
        return await super()._finish(export, file, extension, rows_written)


class SlowCommitStore(LocalStore):
    """Local files whose commit (the rename, under the export's row lock) then waits ``pause_s``."""

    def __init__(self, directory: Path, pause_s: float) -> None:
        super().__init__(directory)
        self.pause_s = pause_s
        self.committing = asyncio.Event()

    async def open_writer(
        self, export_id: str, attempt: int, extension: str, compression: str, owner: str
    ) -> LocalWriter:
        writer = await super().open_writer(export_id, attempt, extension, compression, owner)
        store = self

        class Slow(LocalWriter):
            async def commit(self) -> tuple[int, str]:
                done = await super().commit()
                store.committing.set()
                await asyncio.sleep(store.pause_s)
                return done

        return Slow(writer.file)


async def _queued(api: Client, database_url: str) -> str:
    seed_rows(database_url, 1000)
    created = await api.post("/v1/exports", json={"format": "ndjson", **RANGE})
    assert created.status_code == 202
    export_id: str = created.json()["export_id"]
    return export_id


async def test_a_delete_just_before_the_final_rename_wins_and_no_file_is_left(
    api: Client, settings: Settings, own_database: str, exports_dir: Path
) -> None:
    export_id = await _queued(api, own_database)
    db = await Database.open(own_settings(settings, own_database, exports_dir))
    try:
        worker = PausedBeforeFinish(db, own_settings(settings, own_database, exports_dir))
        run = asyncio.create_task(worker.run_next())
        await asyncio.wait_for(worker.at_finish.wait(), 30)
        assert leftovers(exports_dir, export_id)  # the complete temporary file, not yet renamed
        response = await api.delete(f"/v1/exports/{export_id}")
        assert response.json()["state"] == "cancelled"
        worker.go_on.set()
        assert await run is True
    finally:
        await db.close()
    assert leftovers(exports_dir, export_id) == []
    record = (await api.get(f"/v1/exports/{export_id}")).json()
    assert record["state"] == "cancelled"
    assert (await api.get(f"/v1/exports/{export_id}/content")).status_code == 409


async def test_a_delete_during_the_final_commit_waits_for_it_then_deletes_the_file(
    api: Client, settings: Settings, own_database: str, exports_dir: Path
) -> None:
    export_id = await _queued(api, own_database)
    own = own_settings(settings, own_database, exports_dir)
    db = await Database.open(own)
    try:
        store = SlowCommitStore(own.exports_path, pause_s=0.4)  # under the 1 s lock wait of the DELETE
        worker = ExportService(db, own, store)
        run = asyncio.create_task(worker.run_next())
        await asyncio.wait_for(store.committing.wait(), 30)
        assert (exports_dir / f"{export_id}.ndjson").exists()  # renamed; the row lock is still held
        # What DELETE /v1/exports/{id} runs, here on this loop (the test client would block it while the
        # worker must go on): it waits for the worker's row lock, then finds the export succeeded.
        api_side = ExportService(db, own)
        deleted = await api_side.delete_export(export_id, None)
        assert await run is True
    finally:
        await db.close()
    assert deleted.state == "deleted"
    assert leftovers(exports_dir, export_id) == []
    assert (await api.get(f"/v1/exports/{export_id}")).json()["state"] == "deleted"
    assert (await api.get(f"/v1/exports/{export_id}/content")).status_code == 410


# --- DELETE during a download -------------------------------------------------------------------


async def test_a_download_under_way_completes_and_the_next_one_is_410(
    servers: Servers, client: Client, settings: Settings, database_url: str, auth_headers: dict[str, str], job_id: str
) -> None:
    """Decision: a local download already streaming finishes from its open file; every later one is 410."""
    document = {"rows": ["x" * 1000 for _ in range(14_000)]}  # a 14 MB file: more than the socket buffers hold
    assert (
        await client.put(f"/v1/job-results/{job_id}", json={"status": "succeeded", "result": document})
    ).status_code == 201
    record = (await client.post(f"/v1/job-results/{job_id}/exports", json={"format": "json"})).json()
    path = settings.exports_path / f"{record['export_id']}.json"
    server = servers.start(
        database_url, exports_dir=settings.exports_path, export_worker=False, webhooks_worker=False, workers=1
    )
    async with httpx.AsyncClient(base_url=server.base_url, headers=auth_headers, timeout=30) as http:
        async with http.stream("GET", record["content_url"]) as download:
            assert download.status_code == 200
            chunks = download.aiter_raw()
            received = bytearray(await anext(chunks))
            assert len(received) < record["bytes"]
            deleted = await client.delete(f"/v1/exports/{record['export_id']}")
            assert deleted.json()["state"] == "deleted"
            assert not path.exists()
            async for chunk in chunks:
                received += chunk
        assert len(received) == record["bytes"]
        assert hashlib.sha256(received).hexdigest() == record["sha256"]
        assert (await http.get(record["content_url"])).status_code == 410
