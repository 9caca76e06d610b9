"""Range exports: a per-key cap on queued + running ones (429), round-robin claims across requesters,
and a claim that exactly one worker wins even when its candidate read is stale (issue 12 item 6,
issue 11 section 4).

Everything here runs on databases of its own: the session app's export worker would otherwise claim
these exports.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta

import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from config.settings import Settings
from exports.pipeline import new_export_id
from repositories.database import Connection, Database
from repositories.exports import Export, ExportParameters, ExportRepository, TooManyPendingExports
from service.app import create_app
from tests.conftest import connect, fresh_database, make_token

Client = AsyncTestClient[Litestar]
LEASE = timedelta(seconds=30)
RANGE_BODY = {"format": "ndjson", "created_from": "2020-01-01T00:00:00Z", "created_to": "2020-01-02T00:00:00Z"}


@pytest.fixture
def own_url(server_url: str) -> Iterator[str]:
    with fresh_database(server_url, "jr_claim") as url:
        yield url


@pytest.fixture
async def own_db(settings: Settings, own_url: str) -> AsyncIterator[Database]:
    database = await Database.open(msgspec.structs.replace(settings, database_url=own_url))
    try:
        yield database
    finally:
        await database.close()


async def _enqueue(db: Database, requested_by: str, max_pending: int = 100) -> Export:
    return await db.run(
        lambda conn: ExportRepository(conn).enqueue(
            export_id=new_export_id(),
            format="ndjson",
            compression="none",
            parameters=ExportParameters(),
            requested_by=requested_by,
            max_pending=max_pending,
        )
    )


async def _claim(db: Database, owner: str) -> Export | None:
    return await db.run(lambda conn: ExportRepository(conn).claim(owner, LEASE))


async def _finish(db: Database, export: Export, owner: str) -> None:
    async def unit(conn: Connection) -> bool:
        return await ExportRepository(conn).succeed(
            export, owner, rows_written=0, size=0, sha256="0" * 64, file_name="x.ndjson", retention=timedelta(days=30)
        )

    assert await db.run(unit)


async def test_a_key_with_one_export_is_served_among_the_first_claims(own_db: Database) -> None:
    flood = [await _enqueue(own_db, "key:flooder") for _ in range(8)]
    single = await _enqueue(own_db, "key:patient")
    claimed: list[str] = []
    for _ in range(4):  # one worker, exports run one after another
        export = await _claim(own_db, "worker-1")
        assert export is not None
        claimed.append(export.export_id)
        await _finish(own_db, export, "worker-1")
    assert single.export_id in claimed[:2]
    # The flooder's own exports still run oldest first.
    assert [e for e in claimed if e != single.export_id] == [e.export_id for e in flood[:3]]


async def test_a_stale_candidate_is_not_claimed_twice(own_db: Database) -> None:
    """Worker 1 picks candidates from a snapshot taken before worker 2 claimed the only export (what a
    lock-free engine, or another Galera node, shows it); its conditional UPDATE changes nothing."""
    export = await _enqueue(own_db, "key:one")
    conn = await own_db.acquire()
    try:
        async with conn.cursor() as cur:
            await cur.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT")
            await cur.execute("SELECT state FROM exports WHERE id = %s", (export.id,))
            assert (await cur.fetchone())[0] == "queued"
        won = await _claim(own_db, "worker-2")
        assert won is not None
        assert won.export_id == export.export_id
        assert await ExportRepository(conn).claim("worker-1", LEASE) is None
        await conn.commit()
    finally:
        own_db.release(conn)
    with connect(own_db.settings.database_url) as check, check.cursor() as cur:
        cur.execute("SELECT lease_owner, attempts FROM exports WHERE id = %s", (export.id,))
        assert cur.fetchone() == ("worker-2", 1)


async def test_racing_workers_claim_each_export_once(own_db: Database) -> None:
    exports = [await _enqueue(own_db, f"key:{i % 3}") for i in range(6)]
    claims = await asyncio.gather(*(_claim(own_db, f"worker-{i}") for i in range(10)))
    won = [c for c in claims if c is not None]
    assert sorted(c.export_id for c in won) == sorted(e.export_id for e in exports)
    assert all(c.attempts == 1 for c in won)


async def test_enqueue_stops_at_the_cap(own_db: Database) -> None:
    for _ in range(2):
        await _enqueue(own_db, "key:capped", max_pending=2)
    with pytest.raises(TooManyPendingExports):
        await _enqueue(own_db, "key:capped", max_pending=2)


@pytest.fixture
async def capped_app(settings: Settings, own_url: str) -> AsyncIterator[tuple[Client, str, str]]:
    """An app with no export worker (exports stay queued) and a cap of 3 per key; two keys' tokens."""
    app = create_app(
        msgspec.structs.replace(settings, database_url=own_url, export_worker=False, exports_max_pending_per_key=3)
    )
    async with AsyncTestClient(app=app) as client:
        yield client, make_token(own_url, name="a"), make_token(own_url, name="b")


async def test_a_key_over_its_cap_gets_429(capped_app: tuple[Client, str, str], own_url: str) -> None:
    client, token_a, token_b = capped_app
    as_a = {"Authorization": f"Bearer {token_a}"}
    accepted = [await client.post("/v1/exports", json=RANGE_BODY, headers=as_a) for _ in range(3)]
    assert [r.status_code for r in accepted] == [202, 202, 202]
    refused = await client.post("/v1/exports", json=RANGE_BODY, headers=as_a)
    assert refused.status_code == 429
    assert refused.headers["content-type"] == "application/problem+json"
    assert int(refused.headers["retry-after"]) >= 1
    problem = refused.json()
    assert problem["type"].endswith("/too-many-pending-exports")
    assert "JOBRESULTS_EXPORTS_MAX_PENDING_PER_KEY" in problem["detail"]
    # Another key is not affected.
    other = await client.post("/v1/exports", json=RANGE_BODY, headers={"Authorization": f"Bearer {token_b}"})
    assert other.status_code == 202
    # Once one of A's exports has finished, A may queue another.
    with connect(own_url) as conn, conn.cursor() as cur:
        cur.execute("UPDATE exports SET state = 'failed' WHERE export_id = %s", (accepted[0].json()["export_id"],))
    assert (await client.post("/v1/exports", json=RANGE_BODY, headers=as_a)).status_code == 202
