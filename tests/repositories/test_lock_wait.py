"""A write behind a row lock held by another session answers 503 (Retry-After) long before the query
timeout, and its pooled connection comes back (issue 12 item 10)."""

from __future__ import annotations

import time
from pathlib import Path

from litestar.testing import AsyncTestClient

from config.settings import Settings
from repositories.database import Database
from service.app import create_app
from tests.conftest import connect


async def test_put_behind_a_held_row_lock_is_503_soon(
    settings: Settings, database_url: str, job_id: str, auth_headers: dict[str, str], exports_dir: Path
) -> None:
    app = create_app(
        Settings.from_env(
            {},
            database_url=database_url,
            exports_dir=str(exports_dir),
            log_level="error",
            export_worker=False,
            pool_max_size=2,
        )
    )
    async with AsyncTestClient(app=app) as client:
        client.headers.update(auth_headers)
        url = f"/v1/job-results/{job_id}"
        assert (await client.put(url, json={"status": "succeeded", "result": {"v": 1}})).status_code == 201
        with connect(database_url) as holder, holder.cursor() as cur:
            cur.execute("START TRANSACTION")
            cur.execute("SELECT id FROM job_results WHERE job_id = %s FOR UPDATE", (job_id,))
            started = time.monotonic()
            response = await client.put(url, json={"status": "failed", "result": {"v": 2}})
            waited = time.monotonic() - started
            cur.execute("ROLLBACK")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert response.headers["content-type"] == "application/problem+json"
        # Each attempt waits JOBRESULTS_LOCK_WAIT_TIMEOUT_S (1 s); far below the 30 s query timeout.
        assert waited < settings.query_timeout_s / 2
        db: Database = app.state.db
        assert db.pool.size - db.pool.freesize == 0  # the connection went back to the pool
        # Once the lock is gone the same write goes through on the pooled connections.
        after = await client.put(url, json={"status": "failed", "result": {"v": 3}})
        assert after.status_code == 200
        assert (await client.get(url)).json()["result"] == {"v": 3}


async def test_sessions_wait_for_locks_as_configured(database_url: str) -> None:
    db = await Database.open(Settings.from_env({}, database_url=database_url, lock_wait_timeout_s=3))

    async def read(conn: object) -> int:
        async with conn.cursor() as cur:  # type: ignore[attr-defined]
            await cur.execute("SELECT @@SESSION.innodb_lock_wait_timeout")
            (value,) = await cur.fetchone()
        return int(value)

    try:
        assert await db.run(read, transaction=False) == 3
    finally:
        await db.close()
