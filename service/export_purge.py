"""The purge task of exports: files and records of expired and deleted exports, in small batches.

A :class:`service.purge.PurgeTask`: ``service/purge.py`` runs every task under one lease per
deployment. Each row says when the purge has work on it (``exports.purge_at``, indexed, see migration 0010):

* a finished export (succeeded, failed, cancelled, deleted) at its ``expires_at``: its file or object
  goes first, then its record, in a unit that also queues ``export.expired`` for an export that had
  succeeded (the moment it expired for good: the event announces that its file is gone);
* a ``deleted`` export whose file the API did not get to remove after its COMMIT (the process died,
  or the store failed) at once: its file goes, and the record stays (state ``deleted``) until its
  ``expires_at``.

A file goes before its record, so a crash in between leaves a record whose file is already gone
(removed again next time: missing is fine), never a file without a record. Each record is deleted by
a conditional ``DELETE`` naming the ``purge_at`` it read, so a change made meanwhile (a DELETE of an
export that was just expiring) wins, and the row is looked at again in a later batch.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

import structlog

from config.settings import Settings
from exports.store import ExportStore, StoreError, download_name
from repositories.database import Connection, Database
from repositories.exports import Export, ExportRepository
from repositories.webhook_events import emitting, export_expired
from service.purge import JobResultPurgeTask, PurgeBatch, PurgeTask

log = structlog.get_logger("jobresults.purge")


class ExportPurge:
    """:class:`PurgeTask` of exports, for either store (``local`` files, ``s3`` objects)."""

    name = "exports"

    def __init__(self, store: ExportStore) -> None:
        self.store = store

    async def oldest_due(self, db: Database, now: datetime) -> datetime | None:
        """The earliest ``purge_at`` not after ``now`` (one index look-up), or None."""
        return await db.run(lambda conn: ExportRepository(conn).oldest_due(now), transaction=False)

    async def purge_batch(self, db: Database, now: datetime, limit: int, *, dry_run: bool) -> PurgeBatch:
        """Handle up to ``limit`` due exports, oldest due first (see the module docstring).

        A file the store fails to remove is logged and skipped: its row stays due and is tried again
        in a later batch. Never raises for one export's store failure; database errors propagate.
        """
        due = await db.run(lambda conn: ExportRepository(conn).due_for_purge(now, limit), transaction=False)
        rows = size_total = 0
        items: list[str] = []
        for export in due:
            record_goes = export.expires_at is None or export.expires_at <= now
            size = (export.bytes or 0) if export.stored_key else 0
            what = _describe(export, now, record_goes, size)
            if dry_run:
                rows, size_total = rows + 1, size_total + size
                items.append(what)
                continue
            try:
                await self._remove_file(export)
            except StoreError as exc:
                log.warning("purge.file_removal_failed", export_id=export.export_id, error=type(exc).__name__)
                continue
            if record_goes:
                if not await db.run(_purge_unit(export)):
                    continue  # changed meanwhile (e.g. deleted): due again, looked at in a later batch
            else:
                await db.run(_file_removed_unit(export), transaction=False)
            rows, size_total = rows + 1, size_total + size
            items.append(what)
        return PurgeBatch(rows=rows, bytes=size_total, items=items)

    async def _remove_file(self, export: Export) -> None:
        key = export.stored_key
        if key is None and self.store.kind == "local" and export.state != "succeeded":
            # A local attempt whose COMMIT was in doubt may have left its final file unrecorded
            # (exports/pipeline.py keeps it then); its name follows from the record. Missing is fine.
            key = download_name(export.export_id, export.format, export.compression)
        if key is not None:
            await self.store.remove(key)


def _purge_unit(export: Export) -> Callable[[Connection], Awaitable[bool]]:
    async def unit(conn: Connection) -> bool:
        return await ExportRepository(conn).purge_record(export)

    return emitting(unit, lambda done: export_expired(export) if done and export.state == "succeeded" else None)


def _file_removed_unit(export: Export) -> Callable[[Connection], Awaitable[None]]:
    async def unit(conn: Connection) -> None:
        await ExportRepository(conn).file_removed(export)

    return unit


def _describe(export: Export, now: datetime, record_goes: bool, size: int) -> str:
    state = export.visible_state(now)
    file = f"file {size} bytes" if export.stored_key else "no file"
    action = "record and file" if record_goes else "file (record kept until it expires)"
    return f"export {export.export_id}: {state} {export.kind} export, {file}; removes {action}"


def purge_tasks(store: ExportStore, settings: Settings) -> list[PurgeTask]:
    """Everything the purge deletes, in pass order.

    Expired job results (their single-job exports marked deleted with them), then exports' files and
    records (in ``store``).
    """
    retention = timedelta(days=settings.export_retention_days)
    return [JobResultPurgeTask(export_retention=retention), ExportPurge(store)]
