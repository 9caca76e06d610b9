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
from typing import Any, Literal

import msgspec

from repositories.database import Connection
from repositories.job_results import LabelTerm, ResultFilter, utcnow

ExportState = Literal["queued", "running", "succeeded", "failed"]
ExportKind = Literal["job", "range"]


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
    """

    job_id: str | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None
    status: str | list[str] | None = None
    label: list[str] | None = None
    job_id_prefix: str | None = None


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
    kind: str
    format: str
    compression: str
    parameters: ExportParameters
    state: str
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


_COLUMNS = (
    "id, export_id, kind, format, compression, parameters, state, rows_written, bytes, sha256, file_name, "
    "error, requested_by, attempts, lease_owner, lease_until, created_at, started_at, finished_at, object_key"
)
_PARAMS_DECODER = msgspec.json.Decoder(ExportParameters)
_ENCODER = msgspec.json.Encoder()

SQL_INSERT = (
    f"INSERT INTO exports ({_COLUMNS}) VALUES (NULL, %(export_id)s, %(kind)s, %(format)s, %(compression)s, "  # noqa: S608
    "%(parameters)s, %(state)s, %(rows_written)s, %(bytes)s, %(sha256)s, %(file_name)s, NULL, %(requested_by)s, "
    "%(attempts)s, %(lease_owner)s, %(lease_until)s, %(created_at)s, %(started_at)s, %(finished_at)s, "
    "%(object_key)s)"
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
    "lease_owner = NULL, lease_until = NULL, "
    "finished_at = %(now)s WHERE id = %(id)s AND state = 'running' AND lease_owner = %(owner)s "
    "AND attempts = %(attempts)s"
)
SQL_FAIL = (
    "UPDATE exports SET state = 'failed', error = %(error)s, lease_owner = NULL, lease_until = NULL, "
    "finished_at = %(now)s WHERE id = %(id)s AND state = 'running' AND lease_owner = %(owner)s"
)
SQL_REQUEUE = (
    "UPDATE exports SET state = 'queued', lease_owner = NULL, lease_until = NULL, rows_written = 0 "
    "WHERE id = %(id)s AND state = 'running' AND lease_owner = %(owner)s"
)


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
        format: str,
        compression: str,
        parameters: ExportParameters,
        state: ExportState,
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
    ) -> Export:
        """Record an export and return it as stored (``lease_*`` to record it already claimed).

        ``created_at`` defaults to now (naive UTC).

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

        Only those with ``id < before_id`` and requested by ``requested_by``, when given.
        """
        where: list[str] = []
        params: dict[str, object] = {"limit": limit}
        if requested_by is not None:
            where.append("requested_by = %(requested_by)s")
            params["requested_by"] = requested_by
        if state is not None:
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
        format: str,
        compression: str,
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
        object_key: str | None = None,
    ) -> bool:
        """Mark the export succeeded and record its file or object; False if ``owner`` lost its lease."""
        params = {
            "id": export.id,
            "owner": owner,
            "rows_written": rows_written,
            "bytes": size,
            "sha256": sha256,
            "file_name": file_name,
            "object_key": object_key,
            "attempts": export.attempts,
            "now": utcnow(),
        }
        async with self.conn.cursor() as cur:
            changed = await cur.execute(SQL_SUCCEED, params)
        return bool(changed)

    async def fail(self, export: Export, owner: str, error: str) -> bool:
        """Mark the export failed with a message safe to show clients."""
        params = {"id": export.id, "owner": owner, "error": error[:255], "now": utcnow()}
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
