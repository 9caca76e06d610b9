"""Hand-written SQL for the ``exports`` aggregate: export records, and the lease protocol of range exports.

A range export is a durable job. A worker claims a claimable row (``queued``, or ``running`` with an
expired lease) with a conditional ``UPDATE`` that names the state, attempt count and lease it read:
the claim counts only if exactly one row changed, so exactly one worker wins on every MySQL-compatible
engine, Galera, Group Replication, TiDB and Vitess included (a plain read picks the candidates; no
``SKIP LOCKED`` semantics are relied on). Candidates are taken round-robin across requesters: the
requester whose last range export started longest ago goes first. The worker renews its lease while it
works and may only finish an export whose lease it still holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import msgspec

from repositories.database import Connection
from repositories.domain import (
    Compression,
    ExportKind,
    ExportState,
    Format,
    JobResultNotFound,
    StoredExportState,
    utcnow,
)
from repositories.job_results import LabelTerm, ResultFilter


class ExportNotFound(Exception):
    """No export has this id."""


class TooManyPendingExports(Exception):
    """The requester already has ``limit`` range exports queued or running.

    Attributes:
        limit: the per-requester cap (``JOBRESULTS_EXPORTS_MAX_PENDING_PER_KEY``).
    """

    def __init__(self, requested_by: str | None, limit: int) -> None:
        super().__init__(f"{requested_by} has {limit} range exports queued or running")
        self.limit = limit


class ExportParameters(msgspec.Struct, omit_defaults=True, frozen=True):
    """What an export covers: one ``job_id``, or ``[created_from, created_to)`` (naive UTC) and filters.

    Filters (stored with the export, shown in its record): ``status`` (one status, or several ORed),
    ``label`` (checked terms ``key:value`` / ``key``, see ``service/labels.py``), ``job_id_prefix``.
    ``columns``: the columns the client chose, as given (see :mod:`exports.columns`); None for all.
    """

    job_id: str | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None
    status: str | list[str] | None = None
    label: list[str] | None = None
    job_id_prefix: str | None = None
    columns: tuple[str, ...] | None = None


def label_terms(where: ResultFilter) -> list[str]:
    """The label terms of ``where`` as ``key:value`` / ``key`` strings (the inverse of :func:`filter_of`)."""
    return [f"{t.key}:{v}" for t in where.labels for v in t.values] + [t.key for t in where.labels if not t.values]


def filter_of(parameters: ExportParameters) -> ResultFilter:
    """The :class:`ResultFilter` of a range export's stored (already checked) parameters."""
    values: dict[str, list[str] | None] = {}
    for term in parameters.label or ():
        key, colon, value = term.partition(":")
        known = values.setdefault(key, [])
        if not colon:
            values[key] = None
        elif known is not None and value not in known:
            known.append(value)
    status = parameters.status
    return ResultFilter(
        statuses=(status,) if isinstance(status, str) else tuple(status or ()),
        labels=tuple(LabelTerm(key, tuple(vals or ())) for key, vals in values.items()),
        job_id_prefix=parameters.job_id_prefix,
    )


class Export(msgspec.Struct, frozen=True):
    """An export record. Timestamps are naive UTC; ``file_name`` is relative to the exports directory."""

    id: int
    export_id: str
    kind: ExportKind
    format: Format
    compression: Compression
    parameters: ExportParameters
    state: StoredExportState
    rows_written: int
    bytes: int | None
    sha256: str | None
    file_name: str | None
    error: str | None
    requested_by: str | None
    attempts: int
    lease_owner: str | None
    lease_until: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    object_key: str | None = None
    """The object in the ``s3`` store (``<prefix><export_id>/<attempt>.<ext>``); None for local files."""
    expires_at: datetime | None = None
    """When a finished export expires (naive UTC); None while it is queued or running."""
    purge_at: datetime | None = None
    """When the purge next has work on it (see migration 0010); None: nothing to do."""

    def visible_state(self, now: datetime) -> ExportState:
        """The state clients see at ``now`` (naive UTC): ``expired`` for a succeeded export past ``expires_at``.

        Computed at read time, so expiry is enforced before the purge has removed anything.
        """
        if self.state == "succeeded" and self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return self.state

    @property
    def stored_key(self) -> str | None:
        """The store key of its file or object (``object_key`` in ``s3``, ``file_name`` locally), if any."""
        return self.object_key or self.file_name


_COLUMNS = (
    "id, export_id, kind, format, compression, parameters, state, rows_written, bytes, sha256, file_name, "
    "error, requested_by, attempts, lease_owner, lease_until, created_at, started_at, finished_at, object_key, "
    "expires_at, purge_at"
)
_PARAMS_DECODER = msgspec.json.Decoder(ExportParameters)
_ENCODER = msgspec.json.Encoder()

SQL_INSERT = (
    f"INSERT INTO exports ({_COLUMNS}, job_id) VALUES (NULL, %(export_id)s, %(kind)s, %(format)s, %(compression)s, "  # noqa: S608
    "%(parameters)s, %(state)s, %(rows_written)s, %(bytes)s, %(sha256)s, %(file_name)s, NULL, %(requested_by)s, "
    "%(attempts)s, %(lease_owner)s, %(lease_until)s, %(created_at)s, %(started_at)s, %(finished_at)s, "
    "%(object_key)s, %(expires_at)s, %(expires_at)s, %(job_id)s)"
)
SQL_GET = f"SELECT {_COLUMNS} FROM exports WHERE export_id = %(export_id)s"  # noqa: S608
CLAIM_CANDIDATES = 8
"""Candidates read per claim; each is tried with the conditional UPDATE until one is won."""
SQL_CLAIMABLE = (
    "SELECT e.id, e.state, e.attempts, e.lease_until FROM exports e "
    "WHERE e.kind = 'range' AND (e.state = 'queued' OR (e.state = 'running' AND e.lease_until < %(now)s)) "
    # Round-robin across requesters: the one whose last range export started longest ago (or never)
    # first, then the oldest of its exports. NULL (never started) sorts first on both engines.
    "ORDER BY (SELECT MAX(s.started_at) FROM exports s "
    "WHERE s.requested_by = e.requested_by AND s.kind = 'range'), e.id "
    "LIMIT %(candidates)s"
)
SQL_CLAIM = (
    "UPDATE exports SET state = 'running', attempts = attempts + 1, lease_owner = %(owner)s, "
    "lease_until = %(lease_until)s, started_at = %(now)s, rows_written = 0 "
    "WHERE id = %(id)s AND state = %(state)s AND attempts = %(attempts)s AND lease_until <=> %(seen_lease)s "
    "AND (state = 'queued' OR (state = 'running' AND lease_until < %(now)s))"
)
SQL_PENDING = (
    "SELECT id FROM exports WHERE requested_by = %(requested_by)s AND kind = 'range' "
    "AND state IN ('queued', 'running') LIMIT %(limit)s FOR UPDATE"
)
SQL_RENEW = (
    "UPDATE exports SET lease_until = %(lease_until)s, rows_written = %(rows_written)s "
    "WHERE id = %(id)s AND state = 'running' AND lease_owner = %(owner)s"
)
SQL_LOCK_OWNED = "SELECT id FROM exports WHERE id = %(id)s AND state = 'running' AND lease_owner = %(owner)s FOR UPDATE"
SQL_SUCCEED = (
    "UPDATE exports SET state = 'succeeded', rows_written = %(rows_written)s, bytes = %(bytes)s, "
    "sha256 = %(sha256)s, file_name = %(file_name)s, object_key = %(object_key)s, error = NULL, "
    "lease_owner = NULL, lease_until = NULL, expires_at = %(expires_at)s, purge_at = %(expires_at)s, "
    "finished_at = %(now)s WHERE id = %(id)s AND state = 'running' AND lease_owner = %(owner)s "
    "AND attempts = %(attempts)s"
)
SQL_FAIL = (
    "UPDATE exports SET state = 'failed', error = %(error)s, lease_owner = NULL, lease_until = NULL, "
    "expires_at = %(expires_at)s, purge_at = %(expires_at)s, finished_at = %(now)s "
    "WHERE id = %(id)s AND state = 'running' AND lease_owner = %(owner)s"
)
SQL_REQUEUE = (
    "UPDATE exports SET state = 'queued', lease_owner = NULL, lease_until = NULL, rows_written = 0 "
    "WHERE id = %(id)s AND state = 'running' AND lease_owner = %(owner)s"
)


SQL_LOCK_JOB_SHARED = "SELECT id FROM job_results WHERE job_id = %(job_id)s LOCK IN SHARE MODE"


async def lock_job_shared(conn: Connection, job_id: str) -> None:
    """Share-lock the job's row (a single-job export against a concurrent DELETE of the job).

    ``LOCK IN SHARE MODE`` rather than ``FOR SHARE``: MariaDB has only the former.

    Raises:
        JobResultNotFound: no such job (now: a locking read sees the latest committed row).
    """
    async with conn.cursor() as cur:
        await cur.execute(SQL_LOCK_JOB_SHARED, {"job_id": job_id})
        if await cur.fetchone() is None:
            raise JobResultNotFound(job_id)


def _export(row: tuple[Any, ...]) -> Export:
    return Export(
        id=row[0],
        export_id=row[1],
        kind=row[2],
        format=row[3],
        compression=row[4],
        parameters=_PARAMS_DECODER.decode(row[5]),
        state=row[6],
        rows_written=row[7],
        bytes=row[8],
        sha256=row[9],
        file_name=row[10],
        error=row[11],
        requested_by=row[12],
        attempts=row[13],
        lease_owner=row[14],
        lease_until=row[15],
        created_at=row[16],
        started_at=row[17],
        finished_at=row[18],
        object_key=row[19],
        expires_at=row[20],
        purge_at=row[21],
    )


class ExportRepository:
    """Reads and writes ``exports`` rows on one connection; never opens or ends transactions."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    async def insert(
        self,
        *,
        export_id: str,
        kind: ExportKind,
        format: Format,
        compression: Compression,
        parameters: ExportParameters,
        state: StoredExportState,
        requested_by: str | None,
        rows_written: int = 0,
        bytes: int | None = None,
        sha256: str | None = None,
        file_name: str | None = None,
        started_at: datetime | None = None,
        finished_at: datetime | None = None,
        attempts: int = 0,
        lease_owner: str | None = None,
        lease_until: datetime | None = None,
        created_at: datetime | None = None,
        object_key: str | None = None,
        expires_at: datetime | None = None,
    ) -> Export:
        """Record an export and return it as stored (``lease_*`` to record it already claimed).

        ``created_at`` defaults to now (naive UTC). A finished export (single-job exports are inserted
        succeeded) needs its ``expires_at``; the purge takes it up then (``purge_at``).

        The record is built from the inserted values and the new ``AUTO_INCREMENT`` id rather than read
        back: every column is stored as given (``DATETIME(6)`` keeps the microseconds, strict SQL mode
        refuses what does not fit), and reading 19 columns back would cost a descriptor parse per column
        (aiomysql parses each column's descriptor in Python), a large share of a single-job export's CPU.
        """
        now = created_at or utcnow()
        params = {
            "export_id": export_id,
            "kind": kind,
            "format": format,
            "compression": compression,
            "parameters": _ENCODER.encode(parameters).decode(),
            "state": state,
            "rows_written": rows_written,
            "bytes": bytes,
            "sha256": sha256,
            "file_name": file_name,
            "requested_by": requested_by,
            "attempts": attempts,
            "created_at": now,
            "started_at": started_at,
            "finished_at": finished_at,
            "lease_owner": lease_owner,
            "lease_until": lease_until,
            "object_key": object_key,
            "expires_at": expires_at,
            "job_id": parameters.job_id,
        }
        async with self.conn.cursor() as cur:
            await cur.execute(SQL_INSERT, params)
            row_id = int(cur.lastrowid)
        return Export(
            id=row_id,
            export_id=export_id,
            kind=kind,
            format=format,
            compression=compression,
            parameters=parameters,
            state=state,
            rows_written=rows_written,
            bytes=bytes,
            sha256=sha256,
            file_name=file_name,
            error=None,
            requested_by=requested_by,
            attempts=attempts,
            lease_owner=lease_owner,
            lease_until=lease_until,
            created_at=now,
            started_at=started_at,
            finished_at=finished_at,
            object_key=object_key,
            expires_at=expires_at,
            purge_at=expires_at,
        )

    async def get(self, export_id: str) -> Export:
        """The export with this public id.

        Raises:
            ExportNotFound: no such export.
        """
        async with self.conn.cursor() as cur:
            await cur.execute(SQL_GET, {"export_id": export_id})
            row = await cur.fetchone()
        if row is None:
            raise ExportNotFound(export_id)
        return _export(row)

    async def list(
        self, *, state: str | None, before_id: int | None, limit: int, requested_by: str | None = None
    ) -> list[Export]:
        """Exports newest first (keyset on ``id``), at most ``limit``.

        Only those with ``id < before_id``, requested by ``requested_by`` and in ``state`` (as clients
        see it: ``expired`` is a succeeded export past ``expires_at``, ``succeeded`` one before it), when given.
        """
        where: list[str] = []
        params: dict[str, object] = {"limit": limit}
        if requested_by is not None:
            where.append("requested_by = %(requested_by)s")
            params["requested_by"] = requested_by
        if state == "expired":
            where.append("state = 'succeeded' AND expires_at <= %(now)s")
            params["now"] = utcnow()
        elif state == "succeeded":
            where.append("state = 'succeeded' AND (expires_at IS NULL OR expires_at > %(now)s)")
            params["now"] = utcnow()
        elif state is not None:
            where.append("state = %(state)s")
            params["state"] = state
        if before_id is not None:
            where.append("id < %(before_id)s")
            params["before_id"] = before_id
        sql = f"SELECT {_COLUMNS} FROM exports"  # noqa: S608 - only fixed fragments are joined
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT %(limit)s"
        async with self.conn.cursor() as cur:
            await cur.execute(sql, params)
            rows = await cur.fetchall()
        return [_export(row) for row in rows]

    async def enqueue(
        self,
        *,
        export_id: str,
        format: Format,
        compression: Compression,
        parameters: ExportParameters,
        requested_by: str | None,
        max_pending: int,
    ) -> Export:
        """Record a queued range export unless its requester already has ``max_pending`` queued or running.

        Run it inside a transaction: the requester's pending rows are read with ``FOR UPDATE``, so two
        concurrent requests of one requester on one server cannot both pass the cap (one waits, or is
        a deadlock victim and is retried).

        Raises:
            TooManyPendingExports: the requester is at its cap.
        """
        async with self.conn.cursor() as cur:
            await cur.execute(SQL_PENDING, {"requested_by": requested_by, "limit": max_pending})
            pending = len(await cur.fetchall())
        if pending >= max_pending:
            raise TooManyPendingExports(requested_by, max_pending)
        return await self.insert(
            export_id=export_id,
            kind="range",
            format=format,
            compression=compression,
            parameters=parameters,
            state="queued",
            requested_by=requested_by,
        )

    async def claim(self, owner: str, lease: timedelta) -> Export | None:
        """Claim a queued range export, or a running one whose lease expired; None if there is none.

        Requesters take turns (see the module docstring). A candidate is won only if the conditional
        ``UPDATE`` (same state, attempts and lease as read) changed exactly one row; a candidate some
        other worker won meanwhile changes none and the next one is tried. Run it inside a
        transaction: the claim is made when it commits (on Galera a conflicting claim fails there
        with 1213, and the unit runs again from BEGIN).
        """
        now = utcnow()
        async with self.conn.cursor() as cur:
            await cur.execute(SQL_CLAIMABLE, {"now": now, "candidates": CLAIM_CANDIDATES})
            candidates = await cur.fetchall()
            for row_id, state, attempts, seen_lease in candidates:
                params = {
                    "id": row_id,
                    "state": state,
                    "attempts": attempts,
                    "seen_lease": seen_lease,
                    "owner": owner,
                    "lease_until": now + lease,
                    "now": now,
                }
                if await cur.execute(SQL_CLAIM, params) != 1:
                    continue
                await cur.execute(f"SELECT {_COLUMNS} FROM exports WHERE id = %(id)s", {"id": row_id})  # noqa: S608
                return _export(await cur.fetchone())
        return None

    async def renew(self, export: Export, owner: str, lease: timedelta, rows_written: int) -> bool:
        """Extend the lease and record progress; False if the lease was lost to another worker."""
        params = {"id": export.id, "owner": owner, "lease_until": utcnow() + lease, "rows_written": rows_written}
        async with self.conn.cursor() as cur:
            changed = await cur.execute(SQL_RENEW, params)
        return bool(changed)

    async def lock_owned(self, export: Export, owner: str) -> bool:
        """Row-lock the export if ``owner`` still holds its lease (inside a transaction)."""
        async with self.conn.cursor() as cur:
            await cur.execute(SQL_LOCK_OWNED, {"id": export.id, "owner": owner})
            return await cur.fetchone() is not None

    async def succeed(
        self,
        export: Export,
        owner: str,
        *,
        rows_written: int,
        size: int,
        sha256: str,
        file_name: str,
        retention: timedelta,
        object_key: str | None = None,
    ) -> bool:
        """Mark the export succeeded and record its file or object; False if ``owner`` lost its lease.

        It expires ``retention`` from now (the finish), and a cancelled export is never marked.
        """
        now = utcnow()
        params = {
            "id": export.id,
            "owner": owner,
            "rows_written": rows_written,
            "bytes": size,
            "sha256": sha256,
            "file_name": file_name,
            "object_key": object_key,
            "attempts": export.attempts,
            "now": now,
            "expires_at": now + retention,
        }
        async with self.conn.cursor() as cur:
            changed = await cur.execute(SQL_SUCCEED, params)
        return bool(changed)

    async def fail(self, export: Export, owner: str, error: str, *, retention: timedelta) -> bool:
        """Mark the export failed with a message safe to show clients; its record expires ``retention`` from now."""
        now = utcnow()
        params = {"id": export.id, "owner": owner, "error": error[:255], "now": now, "expires_at": now + retention}
        async with self.conn.cursor() as cur:
            changed = await cur.execute(SQL_FAIL, params)
        return bool(changed)

    async def requeue(self, export: Export, owner: str) -> bool:
        """Give the export back to the queue (after a transient failure)."""
        async with self.conn.cursor() as cur:
            changed = await cur.execute(SQL_REQUEUE, {"id": export.id, "owner": owner})
        return bool(changed)

    async def lease_holders(self, export_ids: Sequence[str]) -> dict[str, tuple[str, str | None, datetime | None]]:
        """``export_id -> (state, lease_owner, lease_until)`` for the ids that exist."""
        if not export_ids:
            return {}
        # One placeholder per id: pymysql (>= 1.1.1) refuses a tuple as a single parameter.
        params = {f"id{i}": export_id for i, export_id in enumerate(export_ids)}
        placeholders = ", ".join(f"%({name})s" for name in params)
        sql = f"SELECT export_id, state, lease_owner, lease_until FROM exports WHERE export_id IN ({placeholders})"  # noqa: S608
        async with self.conn.cursor() as cur:
            await cur.execute(sql, params)
            rows = await cur.fetchall()
        return {row[0]: (row[1], row[2], row[3]) for row in rows}

    async def states(self, export_ids: Sequence[str]) -> dict[str, str]:
        """``export_id -> state`` for the ids that exist (one query; for the long-poll poller)."""
        if not export_ids:
            return {}
        params = {f"id{i}": export_id for i, export_id in enumerate(export_ids)}
        placeholders = ", ".join(f"%({name})s" for name in params)
        sql = f"SELECT export_id, state FROM exports WHERE export_id IN ({placeholders})"  # noqa: S608
        async with self.conn.cursor() as cur:
            await cur.execute(sql, params)
            rows = await cur.fetchall()
        return {row[0]: row[1] for row in rows}

    async def attempt_states(self, export_ids: Sequence[str]) -> dict[str, tuple[str, int, str | None]]:
        """``export_id -> (state, attempts, object_key)`` for the ids that exist (for the store sweep)."""
        if not export_ids:
            return {}
        params = {f"id{i}": export_id for i, export_id in enumerate(export_ids)}
        placeholders = ", ".join(f"%({name})s" for name in params)
        sql = f"SELECT export_id, state, attempts, object_key FROM exports WHERE export_id IN ({placeholders})"  # noqa: S608
        async with self.conn.cursor() as cur:
            await cur.execute(sql, params)
            rows = await cur.fetchall()
        return {row[0]: (row[1], int(row[2]), row[3]) for row in rows}

    # --- lifecycle: cancellation, deletion, the cascade from a deleted job, the purge -----------

    async def lock(self, export_id: str) -> Export:
        """The export with this public id, row-locked (``FOR UPDATE``, inside a transaction).

        Raises:
            ExportNotFound: no such export.
        """
        async with self.conn.cursor() as cur:
            await cur.execute(SQL_GET + " FOR UPDATE", {"export_id": export_id})
            row = await cur.fetchone()
        if row is None:
            raise ExportNotFound(export_id)
        return _export(row)

    async def cancel(self, export: Export, *, retention: timedelta) -> bool:
        """Mark a queued or running export ``cancelled``; False if it is neither any more.

        Its lease is dropped, so the worker's next renewal, and the conditional ``UPDATE`` that would mark
        it succeeded, change no row. The record expires ``retention`` from now.
        """
        now = utcnow()
        async with self.conn.cursor() as cur:
            changed = await cur.execute(SQL_CANCEL, {"id": export.id, "now": now, "expires_at": now + retention})
        return bool(changed)

    async def mark_deleted(self, export: Export, *, retention: timedelta) -> bool:
        """Mark a succeeded or failed export ``deleted``, its file due for removal now; False otherwise.

        The record stays (state ``deleted``) until its ``expires_at`` (set now + ``retention`` if it had none).
        """
        now = utcnow()
        params = {"id": export.id, "now": now, "expires_at": now + retention}
        async with self.conn.cursor() as cur:
            changed = await cur.execute(SQL_MARK_DELETED, params)
        return bool(changed)

    async def delete_job_exports(self, job_id: str, *, retention: timedelta) -> Sequence[Export]:
        """Mark every succeeded single-job export of ``job_id`` ``deleted`` (the cascade of a job's DELETE).

        Returns them as they were (their files are to be removed after the COMMIT; the purge removes
        what that misses). Run it in the unit that deletes the job.
        """
        async with self.conn.cursor() as cur:
            await cur.execute(SQL_JOB_EXPORTS, {"job_id": job_id})
            found = [_export(row) for row in await cur.fetchall()]
            if found:
                now = utcnow()
                for export in found:
                    await cur.execute(SQL_MARK_DELETED, {"id": export.id, "now": now, "expires_at": now + retention})
        return found

    async def file_removed(self, export: Export) -> None:
        """Record that a deleted export's file is gone: the purge next looks at it at its ``expires_at``."""
        async with self.conn.cursor() as cur:
            await cur.execute(SQL_FILE_REMOVED, {"id": export.id})

    async def due_for_purge(self, now: datetime, limit: int) -> Sequence[Export]:
        """Up to ``limit`` exports whose ``purge_at`` is not after ``now``, oldest first (index ``purge_at``)."""
        async with self.conn.cursor() as cur:
            await cur.execute(SQL_DUE, {"now": now, "limit": limit})
            rows = await cur.fetchall()
        return [_export(row) for row in rows]

    async def oldest_due(self, now: datetime) -> datetime | None:
        """The earliest ``purge_at`` not after ``now`` (the purge lag's start), or None if nothing is due."""
        async with self.conn.cursor() as cur:
            await cur.execute(SQL_OLDEST_DUE, {"now": now})
            row = await cur.fetchone()
        return row[0] if row else None

    async def purge_record(self, export: Export) -> bool:
        """Delete the record if its ``purge_at`` is still the one read (nobody changed it meanwhile)."""
        async with self.conn.cursor() as cur:
            changed = await cur.execute(SQL_PURGE_RECORD, {"id": export.id, "seen": export.purge_at})
        return bool(changed)


SQL_CANCEL = (
    "UPDATE exports SET state = 'cancelled', lease_owner = NULL, lease_until = NULL, finished_at = %(now)s, "
    "expires_at = %(expires_at)s, purge_at = %(expires_at)s WHERE id = %(id)s AND state IN ('queued', 'running')"
)
SQL_MARK_DELETED = (
    "UPDATE exports SET state = 'deleted', expires_at = COALESCE(expires_at, %(expires_at)s), purge_at = %(now)s "
    "WHERE id = %(id)s AND state IN ('succeeded', 'failed')"
)
SQL_JOB_EXPORTS = (
    f"SELECT {_COLUMNS} FROM exports WHERE job_id = %(job_id)s AND kind = 'job' AND state = 'succeeded' FOR UPDATE"  # noqa: S608
)
SQL_FILE_REMOVED = (
    "UPDATE exports SET file_name = NULL, object_key = NULL, purge_at = expires_at "
    "WHERE id = %(id)s AND state = 'deleted'"
)
SQL_DUE = f"SELECT {_COLUMNS} FROM exports WHERE purge_at <= %(now)s ORDER BY purge_at LIMIT %(limit)s"  # noqa: S608
SQL_OLDEST_DUE = "SELECT MIN(purge_at) FROM exports WHERE purge_at <= %(now)s"
SQL_PURGE_RECORD = "DELETE FROM exports WHERE id = %(id)s AND purge_at <=> %(seen)s"
