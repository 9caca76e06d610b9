"""The purge: deletes what has expired, in small batches, in one process of the deployment at a time.

Every service process runs a :class:`PurgeRunner` (``JOBRESULTS_PURGE_WORKER``). A pass first takes the
``purge`` lease (:mod:`repositories.leases`, a conditional ``UPDATE``), so any number of replicas purge
without overlap, then runs each :class:`PurgeTask` batch after batch until a batch finds nothing, and
gives the lease back. Each batch is one short transaction (at most ``JOBRESULTS_PURGE_BATCH_ROWS`` rows,
found through an index and deleted by primary key), and the lease is renewed before each one. Between
batches the runner pauses ``JOBRESULTS_PURGE_PAUSE_S`` plus as long as the batch took, so a purge that
catches up on many rows keeps a steady pace and uses at most half of one connection's time.

If a holder stalls past its lease, another process may take over while the stalled batch finishes;
a batch deletes only rows it finds expired under row locks, so a row is never deleted twice and
nothing live is touched. A task added later (expired or deleted exports) implements :class:`PurgeTask`
and is passed to the runner.

Each batch logs one ``purge.batch`` line, counts ``jobresults_purge_rows_total`` and
``jobresults_purge_bytes_total`` and sets ``jobresults_purge_lag_seconds`` (the age of the oldest item
that is due and still there; one index look-up); between passes every process sets the lag too, so
each replica's gauge is current whoever holds the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Protocol

import msgspec
import structlog

from config.settings import Settings
from exports.pipeline import new_owner
from observability.metrics import PURGE_BYTES, PURGE_LAG, PURGE_ROWS
from repositories.database import Connection, Database, DatabaseUnavailable
from repositories.domain import utcnow
from repositories.exports import ExportRepository
from repositories.job_results import JobResultRepository, PurgedResult
from repositories.leases import LeaseRepository
from repositories.webhook_events import job_result_expired
from repositories.webhooks import WebhookOutbox

log = structlog.get_logger("jobresults.purge")

LEASE_NAME = "purge"
"""The row of ``leases`` a purge pass holds."""
LEASE_S = 60.0
"""How long a pass holds the lease without renewing it (renewed before every batch, seconds)."""
MAX_BATCH_BYTES = 64 * 1024**2
"""A batch of job results also stops once its documents reach this many bytes (it deletes at least one),
so a batch of large documents stays a short transaction."""


class PurgeBatch(msgspec.Struct, frozen=True):
    """What one batch deleted (or, in a dry run, would delete).

    Attributes:
        rows: rows (or records) deleted.
        bytes: bytes of data they held (documents, files).
        items: their public names (job ids, export ids), for the dry run and the log.
    """

    rows: int
    bytes: int
    items: list[str]


class PurgeTask(Protocol):
    """One kind of expired thing the purge deletes. ``name`` labels its metrics and log lines."""

    name: str

    async def purge_batch(self, db: Database, now: datetime, limit: int, *, dry_run: bool) -> PurgeBatch:
        """Delete up to ``limit`` things expired at ``now`` (naive UTC), in one short unit of work.

        With ``dry_run``, delete nothing and return the first ``limit`` things that would go. A batch
        that returns 0 rows ends the task's part of the pass.
        """
        ...

    async def oldest_due(self, db: Database, now: datetime) -> datetime | None:
        """When the oldest thing due at ``now`` and not purged yet fell due (naive UTC); None if none."""
        ...


class JobResultPurgeTask:
    """Expired job results: found by ``idx_job_results_expires``, deleted by primary key.

    A purged result is announced like a deleted one: a ``job_result.deleted`` webhook event whose data
    carries ``"reason": "expired"``, queued in the batch's transaction. Like a DELETE of the job, it
    takes the job's single-job exports with it (marked ``deleted`` in the same transaction; the export
    task then removes their files); ``export_retention`` is how long such a record stays listed.
    """

    name = "job_results"

    def __init__(
        self, max_batch_bytes: int = MAX_BATCH_BYTES, export_retention: timedelta = timedelta(days=30)
    ) -> None:
        self.max_batch_bytes = max_batch_bytes
        self.export_retention = export_retention

    async def purge_batch(self, db: Database, now: datetime, limit: int, *, dry_run: bool) -> PurgeBatch:
        """See :meth:`PurgeTask.purge_batch`; ``items`` are job ids.

        Two steps: the ids of up to ``limit`` expired rows are read from the index alone (no lock), then
        one transaction locks those rows by primary key, checks again that they are expired (a result
        replaced in between has a new expiry and stays), and deletes them.
        """
        if dry_run:
            due = await db.run(lambda conn: JobResultRepository(conn).due_rows(now, limit), transaction=False)
            return _batch(due)
        ids = await db.run(lambda conn: JobResultRepository(conn).due_ids(now, limit), transaction=False)
        if not ids:
            return PurgeBatch(rows=0, bytes=0, items=[])

        async def unit(conn: Connection) -> list[PurgedResult]:
            deleted = await JobResultRepository(conn).delete_expired(ids, now, max_bytes=self.max_batch_bytes)
            outbox = WebhookOutbox(conn)
            exports = ExportRepository(conn)
            for row in deleted:
                await outbox.emit(*job_result_expired(row.job_id))
                await exports.delete_job_exports(row.job_id, retention=self.export_retention)
            return deleted

        return _batch(await db.run(unit))

    async def oldest_due(self, db: Database, now: datetime) -> datetime | None:
        """See :meth:`PurgeTask.oldest_due`: the earliest ``expires_at`` at or before ``now``."""
        return await db.run(lambda conn: JobResultRepository(conn).oldest_due(now), transaction=False)


def _batch(rows: Sequence[PurgedResult]) -> PurgeBatch:
    return PurgeBatch(rows=len(rows), bytes=sum(row.bytes for row in rows), items=[row.job_id for row in rows])


class PassReport(msgspec.Struct):
    """What one pass did: ``task name -> (rows, bytes)``; ``lease_lost`` if it stopped early."""

    purged: dict[str, tuple[int, int]]
    lease_lost: bool = False


class LeaseHeld(Exception):
    """Another process holds the purge lease (it is running a pass)."""


class PurgeRunner:
    """Runs purge passes for one process: in the background (:meth:`start`) or once (:meth:`run_pass`).

    ``clock`` gives the current naive UTC time (the service's clock; tests pass another). ``tasks``
    defaults to the job results task.
    """

    def __init__(
        self,
        db: Database,
        settings: Settings,
        tasks: Sequence[PurgeTask] | None = None,
        *,
        owner: str | None = None,
        lease_s: float = LEASE_S,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.db = db
        self.settings = settings
        self.tasks: list[PurgeTask] = list(tasks) if tasks is not None else [JobResultPurgeTask()]
        self.owner = owner or new_owner()
        self.lease = timedelta(seconds=lease_s)
        self.clock = clock
        self._task: asyncio.Task[None] | None = None

    async def _take_lease(self) -> bool:
        now = self.clock()
        # No commit token: a take whose COMMIT is lost raises CommitOutcomeUnknown; the lease, if it
        # landed, runs out on its own.
        return await self.db.run(
            lambda conn: LeaseRepository(conn).take(LEASE_NAME, self.owner, now, self.lease), verify_commit=False
        )

    async def _release_lease(self) -> None:
        with contextlib.suppress(DatabaseUnavailable):
            await self.db.run(lambda conn: LeaseRepository(conn).release(LEASE_NAME, self.owner), verify_commit=False)

    async def run_pass(self, *, max_batches: int | None = None) -> PassReport:
        """Take the lease, purge every task until nothing is due (or ``max_batches`` per task), give it back.

        Raises:
            LeaseHeld: another process holds the lease.
            DatabaseUnavailable: the database failed; the lease runs out on its own if not given back.
        """
        if not await self._take_lease():
            raise LeaseHeld(LEASE_NAME)
        report = PassReport(purged={})
        try:
            for task in self.tasks:
                rows = size = batches = 0
                while max_batches is None or batches < max_batches:
                    if batches and not await self._take_lease():  # renew; the first batch has it fresh
                        log.warning("purge.lease_lost", owner=self.owner, task=task.name)
                        report.lease_lost = True
                        break
                    started = time.perf_counter()
                    batch = await task.purge_batch(self.db, self.clock(), self.settings.purge_batch_rows, dry_run=False)
                    took = time.perf_counter() - started
                    batches += 1
                    if not batch.rows:
                        break
                    rows, size = rows + batch.rows, size + batch.bytes
                    PURGE_ROWS.labels(task.name).inc(batch.rows)
                    PURGE_BYTES.labels(task.name).inc(batch.bytes)
                    lag = await self._observe_lag(task)
                    log.info(
                        "purge.batch",
                        task=task.name,
                        rows=batch.rows,
                        bytes=batch.bytes,
                        duration_ms=round(took * 1000, 1),
                        lag_s=round(lag, 3),
                        first=batch.items[0] if batch.items else None,
                    )
                    await asyncio.sleep(self.settings.purge_pause_s + took)
                report.purged[task.name] = (rows, size)
                if report.lease_lost:
                    break
        finally:
            if not report.lease_lost:
                await asyncio.shield(self._release_lease())
        return report

    async def dry_run(self, limit: int) -> dict[str, tuple[PurgeBatch, datetime | None]]:
        """What a pass would purge now: per task, its first ``limit`` due items and its oldest due time.

        Deletes nothing and takes no lease.
        """
        now = self.clock()
        return {
            task.name: (
                await task.purge_batch(self.db, now, limit, dry_run=True),
                await task.oldest_due(self.db, now),
            )
            for task in self.tasks
        }

    async def observe_lag(self) -> dict[str, float]:
        """Set ``jobresults_purge_lag_seconds`` per task: seconds since the oldest due item fell due (0: none)."""
        return {task.name: await self._observe_lag(task) for task in self.tasks}

    async def _observe_lag(self, task: PurgeTask) -> float:
        now = self.clock()
        oldest = await task.oldest_due(self.db, now)
        lag = max((now - oldest).total_seconds(), 0.0) if oldest is not None else 0.0
        PURGE_LAG.labels(task.name).set(lag)
        return lag

    def start(self) -> None:
        """Start the background loop (idempotent)."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="purge")

    async def stop(self) -> None:
        """Stop the loop; a batch in flight is rolled back, and the lease given back."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        failures = 0
        while True:
            try:
                report = await self.run_pass()
                if any(rows for rows, _ in report.purged.values()):
                    log.info("purge.pass_done", purged={name: rows for name, (rows, _) in report.purged.items()})
                failures = 0
            except LeaseHeld:
                failures = 0
            except DatabaseUnavailable as exc:
                failures += 1
                if failures == 1:
                    log.warning("purge.waiting_for_database", error=str(exc))
            except Exception:
                failures += 1
                log.exception("purge.failed")
            with contextlib.suppress(Exception):
                await self.observe_lag()
            await asyncio.sleep(min(self.settings.purge_interval_s * 2 ** min(failures, 5), 3600.0))
