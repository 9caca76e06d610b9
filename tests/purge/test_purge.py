"""The purge (issue 14): it deletes exactly the expired results, in batches, under one lease at a time.

Each test starts from an empty ``job_results`` table in a database of this module's own, seeds rows with
known expiries (past ones written directly, as the clock would leave them), and runs the real runner.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import msgspec
import pytest
from prometheus_client import REGISTRY

from config.settings import Settings
from repositories.database import Database
from repositories.job_results import JobResultRepository
from repositories.leases import LeaseRepository
from repositories.webhooks import SUBSCRIPTIONS, WebhookRepository
from service.purge import LEASE_NAME, JobResultPurgeTask, LeaseHeld, PurgeBatch, PurgeRunner
from tests.conftest import connect, fresh_database, make_token
from tests.support.servers import Servers


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@pytest.fixture(scope="module")
def purge_url(server_url: str) -> Iterator[str]:
    with fresh_database(server_url, "jr_purge") as url:
        yield url


@pytest.fixture
def purge_settings(settings: Settings, purge_url: str, exports_dir: Path) -> Settings:
    return msgspec.structs.replace(
        settings, database_url=purge_url, exports_dir=str(exports_dir), purge_batch_rows=500, purge_pause_s=0.0
    )


@pytest.fixture
async def purge_db(purge_settings: Settings, purge_url: str) -> AsyncIterator[Database]:
    with connect(purge_url) as conn, conn.cursor() as cur:
        cur.execute("DELETE FROM job_results")
        cur.execute("DELETE FROM webhook_outbox")
        cur.execute("DELETE FROM webhook_endpoints")
        cur.execute("UPDATE leases SET lease_owner = NULL, lease_until = NULL")
    SUBSCRIPTIONS.invalidate()
    db = await Database.open(purge_settings)
    try:
        yield db
    finally:
        await db.close()


def seed(url: str, prefix: str, count: int, *, expires_at: datetime | None, pinned: bool = False, pad: int = 0) -> int:
    """Insert ``count`` results ``<prefix>-<n>``; returns the bytes of their documents in all."""
    now = utcnow()
    documents = [json.dumps({"n": n, "pad": "x" * pad}) for n in range(count)]
    rows = [(f"{prefix}-{n}", "succeeded", doc, now, now, expires_at, pinned) for n, doc in enumerate(documents)]
    with connect(url) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO job_results (job_id, status, result_data, version, created_at, updated_at, expires_at, "
            "pinned) VALUES (%s, %s, %s, 1, %s, %s, %s, %s)",
            rows,
        )
    return sum(len(doc) for doc in documents)


def job_ids(url: str) -> set[str]:
    with connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT job_id FROM job_results")
        return {row[0].decode() for row in cur.fetchall()}


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name, {"task": "job_results"}) or 0.0


async def test_a_pass_deletes_the_expired_rows_and_nothing_else(
    purge_db: Database, purge_settings: Settings, purge_url: str
) -> None:
    now = utcnow()
    size = seed(purge_url, "old", 1100, expires_at=now - timedelta(days=2), pad=100)
    size += seed(purge_url, "just", 3, expires_at=now - timedelta(microseconds=1))
    seed(purge_url, "future", 5, expires_at=now + timedelta(hours=1))
    seed(purge_url, "never", 5, expires_at=None)
    seed(purge_url, "pinned", 5, expires_at=None, pinned=True)
    runner = PurgeRunner(purge_db, purge_settings)
    lag = (await runner.observe_lag())["job_results"]
    assert 2 * 86400 <= lag < 2 * 86400 + 60
    assert REGISTRY.get_sample_value("jobresults_purge_lag_seconds", {"task": "job_results"}) == lag
    rows_before, bytes_before = sample("jobresults_purge_rows_total"), sample("jobresults_purge_bytes_total")

    report = await runner.run_pass()

    assert report.purged == {"job_results": (1103, size)}
    assert not report.lease_lost
    left = job_ids(purge_url)
    assert left == {f"{kind}-{n}" for kind in ("future", "never", "pinned") for n in range(5)}
    assert sample("jobresults_purge_rows_total") - rows_before == 1103
    assert sample("jobresults_purge_bytes_total") - bytes_before == size
    assert (await runner.observe_lag())["job_results"] == 0.0
    lease = await purge_db.run(lambda conn: LeaseRepository(conn).get(LEASE_NAME), transaction=False)
    assert lease.owner is None  # given back after the pass


async def test_batches_are_bounded_in_rows_and_bytes(
    purge_db: Database, purge_settings: Settings, purge_url: str
) -> None:
    now = utcnow()
    seed(purge_url, "old", 12, expires_at=now - timedelta(hours=1), pad=10_000)
    task = JobResultPurgeTask(max_batch_bytes=25_000)  # two 10 kB documents fit, a third does not
    first = await task.purge_batch(purge_db, utcnow(), 5, dry_run=False)
    assert first.rows == 2
    assert len(job_ids(purge_url)) == 10
    rows = 2
    while batch := (await task.purge_batch(purge_db, utcnow(), 5, dry_run=False)).rows:
        assert batch <= 2
        rows += batch
    assert rows == 12
    assert job_ids(purge_url) == set()


async def test_a_result_written_again_after_its_id_was_found_is_kept(purge_db: Database, purge_url: str) -> None:
    """The race between finding due ids and deleting them: a PUT over the expired row in between wins."""
    now = utcnow()
    seed(purge_url, "raced", 1, expires_at=now - timedelta(hours=1))
    ids = await purge_db.run(lambda conn: JobResultRepository(conn).due_ids(utcnow(), 10), transaction=False)
    assert len(ids) == 1
    await purge_db.run(lambda conn: JobResultRepository(conn).upsert("raced-0", "failed", '{"again": true}'))
    deleted = await purge_db.run(lambda conn: JobResultRepository(conn).delete_expired(ids, utcnow()))
    assert deleted == []
    row = await purge_db.run(lambda conn: JobResultRepository(conn).get("raced-0"), transaction=False)
    assert row.result == b'{"again": true}'


async def test_the_clock_decides_what_is_due(purge_db: Database, purge_settings: Settings, purge_url: str) -> None:
    now = utcnow()
    seed(purge_url, "soon", 4, expires_at=now + timedelta(days=1))
    seed(purge_url, "later", 4, expires_at=now + timedelta(days=3))
    runner = PurgeRunner(purge_db, purge_settings, clock=lambda: now + timedelta(days=2))
    assert (await runner.run_pass()).purged["job_results"][0] == 4
    assert job_ids(purge_url) == {f"later-{n}" for n in range(4)}


async def test_a_purged_result_is_announced_as_deleted_expired(
    purge_db: Database, purge_settings: Settings, purge_url: str
) -> None:
    await purge_db.run(
        lambda conn: WebhookRepository(conn).create(
            url="http://127.0.0.1:9/hook",
            events=["job_result.deleted"],
            description=None,
            secret="whsec_" + "A" * 32,
            created_by=None,
        )
    )
    SUBSCRIPTIONS.invalidate()
    seed(purge_url, "gone", 3, expires_at=utcnow() - timedelta(minutes=1))
    await PurgeRunner(purge_db, purge_settings).run_pass()
    with connect(purge_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT event_type, payload FROM webhook_outbox")
        events = cur.fetchall()
    assert sorted(json.loads(payload)["data"]["job_id"] for _, payload in events) == ["gone-0", "gone-1", "gone-2"]
    assert {event_type for event_type, _ in events} == {"job_result.deleted"}
    assert {json.loads(payload)["data"]["reason"] for _, payload in events} == {"expired"}


async def test_the_dry_run_lists_and_deletes_nothing(
    purge_db: Database, purge_settings: Settings, purge_url: str
) -> None:
    now = utcnow()
    seed(purge_url, "old", 7, expires_at=now - timedelta(hours=1))
    seed(purge_url, "kept", 2, expires_at=None)
    found = await PurgeRunner(purge_db, purge_settings).dry_run(limit=5)
    batch, oldest = found["job_results"]
    assert batch.rows == 5
    assert set(batch.items) <= {f"old-{n}" for n in range(7)}
    assert oldest is not None
    assert oldest <= now
    assert len(job_ids(purge_url)) == 9


async def test_two_runners_never_both_hold_the_lease(
    purge_settings: Settings, purge_db: Database, purge_url: str
) -> None:
    """Two processes' runners (each with its own pool) race for the lease, round after round."""
    other_db = await Database.open(purge_settings)
    try:
        first = PurgeRunner(purge_db, purge_settings, owner="runner-a")
        second = PurgeRunner(other_db, purge_settings, owner="runner-b")
        for _ in range(20):
            took = await asyncio.gather(first._take_lease(), second._take_lease())
            assert sorted(took) == [False, True]
            winner = first if took[0] else second
            loser = second if took[0] else first
            assert await loser._take_lease() is False  # still held: renewing is only for the holder
            assert await winner._take_lease() is True
            await winner._release_lease()

        seed(purge_url, "old", 1500, expires_at=utcnow() - timedelta(hours=1))
        results = await asyncio.gather(first.run_pass(), second.run_pass(), return_exceptions=True)
        reports = [r for r in results if not isinstance(r, BaseException)]
        assert [type(r) for r in results if isinstance(r, BaseException)] in ([LeaseHeld], [])
        assert sum(report.purged["job_results"][0] for report in reports) == 1500
        assert job_ids(purge_url) == set()
    finally:
        await other_db.close()


class StallingTask:
    """The real job results task, stalled after its first batch for longer than the lease (a GC pause, a
    frozen VM) while another runner takes the lease over."""

    name = "job_results"

    def __init__(self, other: PurgeRunner, stall_s: float) -> None:
        self.real = JobResultPurgeTask()
        self.other = other
        self.stall_s = stall_s
        self.took_over: bool | None = None

    async def purge_batch(self, db: Database, now: datetime, limit: int, *, dry_run: bool) -> PurgeBatch:
        batch = await self.real.purge_batch(db, now, limit, dry_run=dry_run)
        if self.took_over is None:
            await asyncio.sleep(self.stall_s)
            self.took_over = await self.other._take_lease()
        return batch

    async def oldest_due(self, db: Database, now: datetime) -> datetime | None:
        return await self.real.oldest_due(db, now)


async def test_a_runner_that_lost_its_lease_stops_and_leaves_it_to_the_new_holder(
    purge_settings: Settings, purge_db: Database, purge_url: str
) -> None:
    seed(purge_url, "old", 1200, expires_at=utcnow() - timedelta(hours=1))
    other = PurgeRunner(purge_db, purge_settings, owner="takes-over")
    stalling = StallingTask(other, stall_s=0.3)
    stalled = PurgeRunner(purge_db, purge_settings, [stalling], owner="stalled", lease_s=0.2)
    assert await stalled._take_lease()
    with pytest.raises(LeaseHeld):  # while one holds it, nobody else starts a pass
        await other.run_pass()
    report = await stalled.run_pass()
    assert stalling.took_over is True
    assert report.lease_lost
    assert report.purged["job_results"][0] == 500  # the batch before the stall, not one more
    assert len(job_ids(purge_url)) == 700
    lease = await purge_db.run(lambda conn: LeaseRepository(conn).get(LEASE_NAME), transaction=False)
    assert lease.owner == "takes-over"  # the stalled runner did not give back a lease it no longer held
    assert (await other.run_pass()).purged["job_results"][0] == 700


@pytest.mark.slow
def test_the_service_purges_in_the_background_and_reports_it(servers: Servers, server_url: str, tmp_path: Path) -> None:
    with fresh_database(server_url, "jr_purge_svc") as url:
        seed(url, "old", 700, expires_at=utcnow() - timedelta(minutes=5))
        seed(url, "kept", 3, expires_at=utcnow() + timedelta(days=1))
        token = make_token(url, scopes=("metrics:read",))
        server = servers.start(
            url, workers=2, redis_url="redis://127.0.0.1:6379/0", purge_batch_rows=300, purge_interval_s=0.5
        )
        deadline = datetime.now(UTC) + timedelta(seconds=30)
        while len(job_ids(url)) > 3:
            assert datetime.now(UTC) < deadline, server.output()
            httpx.get(server.base_url + "/healthz", timeout=5)
        assert job_ids(url) == {"kept-0", "kept-1", "kept-2"}
        lines = [json.loads(line) for line in server.output().splitlines() if '"purge.batch"' in line]
        assert sorted(line["rows"] for line in lines) == [100, 300, 300]
        assert {line["task"] for line in lines} == {"job_results"}
        wanted = [
            'jobresults_purge_rows_total{task="job_results"} 700.0',
            'jobresults_purge_lag_seconds{task="job_results"} 0.0',
        ]
        while True:  # the gauge is set once the batch's unit has returned
            metrics = httpx.get(server.base_url + "/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=5)
            if all(line in metrics.text for line in wanted):
                break
            assert datetime.now(UTC) < deadline, metrics.text


async def test_a_purged_result_takes_its_single_job_exports_with_it(
    purge_db: Database, purge_settings: Settings, purge_url: str
) -> None:
    """As a DELETE of the job does: its single-job exports are deleted and their files removed."""
    from exports.pipeline import ExportService
    from repositories.exports import ExportRepository
    from service.export_purge import purge_tasks

    seed(purge_url, "cascade", 1, expires_at=None)
    exports = ExportService(purge_db, purge_settings)
    export = await exports.export_job("cascade-0", "json", "none", None)
    assert export.stored_key is not None
    path = Path(purge_settings.exports_dir) / export.stored_key
    assert path.exists()
    with connect(purge_url) as conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE job_results SET expires_at = %s WHERE job_id = 'cascade-0'", (utcnow() - timedelta(seconds=1),)
        )

    await PurgeRunner(purge_db, purge_settings, tasks=purge_tasks(exports.store, purge_settings)).run_pass()

    assert "cascade-0" not in job_ids(purge_url)
    after = await purge_db.run(lambda conn: ExportRepository(conn).get(export.export_id), transaction=False)
    assert after.state == "deleted"
    assert not path.exists()
