"""Hand-written SQL for the ``job_results`` aggregate.

Repositories work on a connection handed to them by the unit of work
(:meth:`repositories.database.Database.run`); they never open or end transactions.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import aiomysql
import msgspec
import pymysql

from repositories.database import ER_DUP_ENTRY, Connection, SQLText, error_code, escape_text


class JobResultNotFound(Exception):
    """No job result has this job id."""


class JobResultExists(Exception):
    """A create-only write found the job id taken."""


class PreconditionFailed(Exception):
    """The stored version is not the one the client named (``If-Match``)."""


class JobResultMeta(msgspec.Struct, frozen=True):
    """A stored job result without its document. Timestamps are naive UTC ``datetime``.

    ``expires_at`` is when the result stops being visible (None: never); a ``pinned`` result never
    expires, so its ``expires_at`` is always None.
    """

    id: int
    job_id: str
    status: str
    version: int
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None = None
    pinned: bool = False


class JobResultRow(msgspec.Struct, frozen=True):
    """A stored job result; ``result`` is the stored JSON text, never decoded."""

    meta: JobResultMeta
    result: bytes


class Cursor(msgspec.Struct, array_like=True, frozen=True):
    """Keyset position: the (created_at, id) of the last row a page returned."""

    created_at: datetime
    id: int


class EscapedText:
    """A document escaped as a MySQL string literal ahead of time (:func:`escape_text`).

    Escaping a large document in a worker thread leaves the event loop only a copy to make when the
    statement is built.

    Attributes:
        literal: the quoted, escaped literal.
    """

    __slots__ = ("literal",)

    def __init__(self, text: str) -> None:
        if len(text) <= _ESCAPE_CHUNK:
            self.literal = escape_text(text)
            return
        # In pieces: one str.replace over a whole 16 MiB document full of quotes holds the GIL for
        # tens of milliseconds. Escapes never span characters, so any cut is safe.
        parts = ["'"]
        for start in range(0, len(text), _ESCAPE_CHUNK):
            parts.append(escape_text(text[start : start + _ESCAPE_CHUNK])[1:-1])
        parts.append("'")
        self.literal = "".join(parts)


_ESCAPE_CHUNK = 1 << 20
"""Characters escaped per step by :class:`EscapedText`."""


def _encode_escaped(value: EscapedText, mapping: object = None) -> str:
    return value.literal


# aiomysql ignores the connection's ``conv`` for encoding and uses PyMySQL's module-level registry.
pymysql.converters.encoders[EscapedText] = _encode_escaped

Document = str | EscapedText
"""A checked JSON document to store: its text, or its text already escaped."""


def _document(result: Document) -> EscapedText | SQLText:
    return result if isinstance(result, EscapedText) else SQLText(result)


async def read_max_allowed_packet(conn: Connection) -> int:
    """The session's ``max_allowed_packet`` in bytes: the largest statement the server accepts."""
    async with conn.cursor() as cur:
        await cur.execute("SELECT @@SESSION.max_allowed_packet")
        row = await cur.fetchone()
    return int(row[0])


def utcnow() -> datetime:
    """Current UTC time as a naive ``datetime`` (the form ``DATETIME(6)`` columns hold)."""
    return datetime.now(UTC).replace(tzinfo=None)


_META_COLUMNS = (
    "CONCAT_WS(' ', id, version, status, pinned, created_at, updated_at, "
    "COALESCE(REPLACE(expires_at, ' ', 'T'), '-'), job_id)"
)
"""A row's metadata packed into one column:
``b"<id> <version> <status> <pinned> <created> <updated> <expires> <job_id>"``.

Each column of a result set costs aiomysql's pure-Python protocol code a field-descriptor parse per
query and a length-coded read per row, so one packed column costs less than eight. Timestamps come as
``YYYY-MM-DD HH:MM:SS.ffffff`` (``DATETIME(6)``); ``expires`` as ``YYYY-MM-DDTHH:MM:SS.ffffff`` or ``-``
for never (``CONCAT_WS`` would skip a NULL); ``pinned`` as 0 or 1. The job id goes last, so it is the
rest of the string whatever it holds."""

LIVE = "(expires_at IS NULL OR expires_at > %(now)s)"
"""The rows readers see at ``now`` (naive UTC, the service's clock): an expired row is gone for every
reader and writer at once, whether or not the purge has deleted it yet. Expired means
``expires_at <= now``, in :data:`SQL_DUE_IDS` too."""

SQL_GET = f"SELECT {_META_COLUMNS}, result_data FROM job_results WHERE job_id = %(job_id)s AND {LIVE}"  # noqa: S608
SQL_GET_META = f"SELECT {_META_COLUMNS} FROM job_results WHERE job_id = %(job_id)s AND {LIVE}"  # noqa: S608
SQL_INSERT = (
    "INSERT INTO job_results (job_id, status, result_data, version, created_at, updated_at, expires_at, pinned) "
    "VALUES (%(job_id)s, %(status)s, %(result)s, 1, %(now)s, %(now)s, %(expires_at)s, %(pinned)s)"
)
SQL_UPDATE = (
    "UPDATE job_results SET status = %(status)s, result_data = %(result)s, "  # noqa: S608 - fixed fragments only
    "version = version + 1, updated_at = %(now)s, expires_at = %(expires_at)s, pinned = %(pinned)s "
    f"WHERE job_id = %(job_id)s AND {LIVE}"
)
SQL_DELETE = f"DELETE FROM job_results WHERE job_id = %(job_id)s AND {LIVE}"  # noqa: S608
SQL_DELETE_EXPIRED = "DELETE FROM job_results WHERE job_id = %(job_id)s AND expires_at <= %(now)s"

SQL_DUE_IDS = "SELECT id FROM job_results WHERE expires_at <= %(now)s ORDER BY expires_at, id LIMIT %(limit)s"
"""Ids of expired rows, oldest expiry first: a range scan of ``idx_job_results_expires`` that reads the
index only (``id`` is in it), so finding a batch costs no row reads and takes no locks."""
SQL_DUE_ROWS = (
    "SELECT id, job_id, LENGTH(result_data) FROM job_results WHERE expires_at <= %(now)s "
    "ORDER BY expires_at, id LIMIT %(limit)s"
)
SQL_OLDEST_DUE = "SELECT MIN(expires_at) FROM job_results WHERE expires_at <= %(now)s"


def _meta(row: tuple[object, ...]) -> JobResultMeta:
    """Unpack :data:`_META_COLUMNS` (the row's first column; bytes, since ``job_id`` is binary)."""
    packed = row[0]
    text = packed.decode("utf-8") if isinstance(packed, bytes) else str(packed)
    (row_id, version, status, pinned, created_day, created_time, updated_day, updated_time, expires, job_id) = (
        text.split(" ", 9)
    )
    return JobResultMeta(
        id=int(row_id),
        job_id=job_id,
        status=status,
        version=int(version),
        created_at=datetime.fromisoformat(f"{created_day} {created_time}"),
        updated_at=datetime.fromisoformat(f"{updated_day} {updated_time}"),
        expires_at=None if expires == "-" else datetime.fromisoformat(expires),
        pinned=pinned == "1",
    )


def _in_list(name: str, values: Sequence[object]) -> tuple[str, dict[str, object]]:
    """``%(name0)s, %(name1)s, ...`` and its parameters: one placeholder per value.

    PyMySQL (>= 1.1.1) refuses a tuple as one parameter.
    """
    params = {f"{name}{i}": value for i, value in enumerate(values)}
    return ", ".join(f"%({key})s" for key in params), params


class PurgedResult(msgspec.Struct, frozen=True):
    """A job result the purge deleted (or, in a dry run, would delete): its id, job id and document size."""

    id: int
    job_id: str
    bytes: int


class JobResultRepository:
    """Reads and writes ``job_results`` rows on one connection.

    Every method that takes ``now`` (naive UTC; None means the service's clock now, :func:`utcnow`)
    sees only rows that have not expired at ``now`` (:data:`LIVE`). Pass one ``now`` to every call of
    a unit so they agree.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    async def get(self, job_id: str, now: datetime | None = None) -> JobResultRow:
        """The job result with ``job_id``; the document comes back as stored JSON text (bytes).

        Raises:
            JobResultNotFound: no such job id, or it expired.
        """
        async with self.conn.cursor() as cur:
            await cur.execute(SQL_GET, {"job_id": job_id, "now": now or utcnow()})
            row = await cur.fetchone()
        if row is None:
            raise JobResultNotFound(job_id)
        document = row[1]
        return JobResultRow(meta=_meta(row), result=document.encode() if isinstance(document, str) else document)

    async def get_meta(self, job_id: str, now: datetime | None = None) -> JobResultMeta:
        """The job result's metadata, without its document.

        Raises:
            JobResultNotFound: no such job id, or it expired.
        """
        return await self._meta_query(SQL_GET_META, job_id, now)

    async def lock_meta(self, job_id: str, now: datetime | None = None) -> JobResultMeta:
        """The job result's metadata, row-locked (``FOR UPDATE``) until the transaction ends.

        Raises:
            JobResultNotFound: no such job id, or it expired.
        """
        return await self._meta_query(SQL_GET_META + " FOR UPDATE", job_id, now)

    async def _meta_query(self, sql: str, job_id: str, now: datetime | None) -> JobResultMeta:
        async with self.conn.cursor() as cur:
            await cur.execute(sql, {"job_id": job_id, "now": now or utcnow()})
            row = await cur.fetchone()
        if row is None:
            raise JobResultNotFound(job_id)
        return _meta(row)

    async def create(
        self,
        job_id: str,
        status: str,
        result: Document,
        *,
        expires_at: datetime | None = None,
        pinned: bool = False,
        now: datetime | None = None,
    ) -> JobResultMeta:
        """Insert a new job result; ``result`` is JSON text already checked for fidelity.

        ``expires_at`` (naive UTC, None: never) and ``pinned`` are stored as given (a pinned result
        has none). A row of ``job_id`` that expired at ``now`` but is not purged yet counts as absent:
        it is deleted and the new result takes its place with a new id, so no ETag of the old one
        ever matches it.

        Raises:
            JobResultExists: the job id is taken by a live result (MySQL error 1062).
        """
        now = now or utcnow()
        params = {
            "job_id": job_id,
            "status": status,
            "result": _document(result),
            "now": now,
            "expires_at": expires_at,
            "pinned": pinned,
        }
        async with self.conn.cursor() as cur:
            for attempt in range(2):
                try:
                    await cur.execute(SQL_INSERT, params)
                    break
                except pymysql.err.IntegrityError as exc:
                    if error_code(exc) != ER_DUP_ENTRY:
                        raise
                if attempt or not await cur.execute(SQL_DELETE_EXPIRED, {"job_id": job_id, "now": now}):
                    raise JobResultExists(job_id) from None
            row_id = cur.lastrowid
        return JobResultMeta(
            id=row_id,
            job_id=job_id,
            status=status,
            version=1,
            created_at=now,
            updated_at=now,
            expires_at=expires_at,
            pinned=pinned,
        )

    async def replace(
        self,
        job_id: str,
        status: str,
        result: Document,
        *,
        expires_at: datetime | None = None,
        pinned: bool = False,
        now: datetime | None = None,
    ) -> JobResultMeta:
        """Replace a live job result, bumping its version; returns the new metadata.

        Everything is replaced: the status, the document, ``expires_at`` and ``pinned``.

        Raises:
            JobResultNotFound: no such job id, or it expired.
        """
        now = now or utcnow()
        params = {
            "job_id": job_id,
            "status": status,
            "result": _document(result),
            "now": now,
            "expires_at": expires_at,
            "pinned": pinned,
        }
        async with self.conn.cursor() as cur:
            changed = await cur.execute(SQL_UPDATE, params)
        if not changed:
            raise JobResultNotFound(job_id)
        return await self.get_meta(job_id, now)

    async def upsert(
        self,
        job_id: str,
        status: str,
        result: Document,
        *,
        expires_at: datetime | None = None,
        pinned: bool = False,
        now: datetime | None = None,
    ) -> tuple[JobResultMeta, bool]:
        """Create or replace; returns the stored metadata and True when the row is new.

        INSERT comes first: a new job takes no gap lock, so concurrent uploads of new jobs do not
        deadlock under REPEATABLE READ. A concurrent delete between the two statements makes the
        UPDATE miss; that is reported as :class:`JobResultNotFound` only if it repeats. An expired
        row counts as absent (see :meth:`create`).
        """
        now = now or utcnow()
        for _ in range(2):
            try:
                return await self.create(job_id, status, result, expires_at=expires_at, pinned=pinned, now=now), True
            except JobResultExists:
                pass
            try:
                return await self.replace(job_id, status, result, expires_at=expires_at, pinned=pinned, now=now), False
            except JobResultNotFound:
                continue
        raise JobResultNotFound(job_id)

    async def delete(self, job_id: str, now: datetime | None = None) -> None:
        """Delete the job result.

        Raises:
            JobResultNotFound: no such job id, or it expired (the purge deletes that row).
        """
        async with self.conn.cursor() as cur:
            deleted = await cur.execute(SQL_DELETE, {"job_id": job_id, "now": now or utcnow()})
        if not deleted:
            raise JobResultNotFound(job_id)

    # --- the purge ----------------------------------------------------------------------------------

    async def due_ids(self, now: datetime, limit: int) -> builtins.list[int]:
        """Ids of up to ``limit`` rows expired at ``now``, oldest expiry first (a plain, lock-free read)."""
        async with self.conn.cursor() as cur:
            await cur.execute(SQL_DUE_IDS, {"now": now, "limit": limit})
            return [int(row[0]) for row in await cur.fetchall()]

    async def due_rows(self, now: datetime, limit: int) -> builtins.list[PurgedResult]:
        """Up to ``limit`` rows expired at ``now``, oldest expiry first, with their sizes (a plain read)."""
        async with self.conn.cursor() as cur:
            await cur.execute(SQL_DUE_ROWS, {"now": now, "limit": limit})
            return [_purged(row) for row in await cur.fetchall()]

    async def delete_expired(
        self, ids: Sequence[int], now: datetime, *, max_bytes: int | None = None
    ) -> builtins.list[PurgedResult]:
        """Delete those of ``ids`` that are still expired at ``now``; returns what was deleted.

        Run it inside a transaction: the rows are row-locked by primary key (``FOR UPDATE``) and checked
        again, so a result replaced since its id was read (a new ``expires_at``) is left alone, then
        deleted by primary key. No range or gap is locked. With ``max_bytes``, the deletion stops
        before the row whose document would bring the total past it (the first row always goes);
        the rest stay for the next batch.
        """
        if not ids:
            return []
        placeholders, params = _in_list("id", ids)
        params["now"] = now
        sql = (
            f"SELECT id, job_id, LENGTH(result_data) FROM job_results "  # noqa: S608 - placeholders only
            f"WHERE id IN ({placeholders}) AND expires_at <= %(now)s ORDER BY id FOR UPDATE"
        )
        async with self.conn.cursor() as cur:
            await cur.execute(sql, params)
            doomed = [_purged(row) for row in await cur.fetchall()]
            if max_bytes is not None:
                total = 0
                for kept, row in enumerate(doomed):
                    total += row.bytes
                    if kept and total > max_bytes:
                        doomed = doomed[:kept]
                        break
            if doomed:
                placeholders, params = _in_list("id", [row.id for row in doomed])
                await cur.execute(f"DELETE FROM job_results WHERE id IN ({placeholders})", params)  # noqa: S608
        return doomed

    async def oldest_due(self, now: datetime) -> datetime | None:
        """The earliest ``expires_at`` of a row expired at ``now`` and not purged yet; None if none."""
        async with self.conn.cursor() as cur:
            await cur.execute(SQL_OLDEST_DUE, {"now": now})
            row = await cur.fetchone()
        value = row[0] if row else None
        return value if isinstance(value, datetime) else None

    async def list(
        self,
        *,
        created_from: datetime | None,
        created_to: datetime | None,
        status: str | None,
        after: Cursor | None,
        limit: int,
        include_result: bool,
        max_bytes: int | None = None,
        pinned: bool | None = None,
        expires_before: datetime | None = None,
        now: datetime | None = None,
    ) -> tuple[list[JobResultRow], bool]:
        """A page of live job results with ``created_from <= created_at < created_to``, oldest first.

        Keyset pagination on ``(created_at, id)``: rows strictly after ``after``. Returns at most
        ``limit`` rows and whether more rows follow the last one. ``result`` is empty bytes unless
        ``include_result``. Bounds are naive UTC. ``pinned`` keeps only pinned (True) or unpinned
        (False) results, ``expires_before`` only those with ``expires_at < expires_before`` (never those
        that never expire); rows expired at ``now`` are never listed. These filters, like ``status``,
        are conditions on the rows the ``idx_created`` keyset scan reads, not index ranges.

        With ``include_result`` and ``max_bytes``, the page also stops before the row whose document
        would bring the documents' total above ``max_bytes`` (bytes of JSON text), though never before
        its first row: the rows are read one by one from a server-side cursor, so at most one document
        beyond the budget is ever held. A page cut short this way closes the connection (the rest of
        the result set is never read).
        """
        sql, params = list_query(
            created_from=created_from,
            created_to=created_to,
            status=status,
            after=after,
            limit=limit,
            include_result=include_result,
            pinned=pinned,
            expires_before=expires_before,
            now=now,
        )
        if include_result and max_bytes is not None:
            return await self._list_within(sql, params, limit, max_bytes)
        async with self.conn.cursor() as cur:
            await cur.execute(sql, params)
            rows = await cur.fetchall()
        out = [_row(row, include_result) for row in rows[:limit]]
        return out, len(rows) > limit

    async def _list_within(
        self, sql: str, params: dict[str, object], limit: int, max_bytes: int
    ) -> tuple[builtins.list[JobResultRow], bool]:
        out: builtins.list[JobResultRow] = []
        total = 0
        cur = await self.conn.cursor(aiomysql.SSCursor)
        await cur.execute(sql, params)
        while True:
            row = await cur.fetchone()
            if row is None:
                await cur.close()
                return out, False
            item = _row(row, include_result=True)
            if len(out) == limit:  # the look-ahead row (LIMIT is limit + 1): the result set is done
                await cur.close()
                return out, True
            if out and total + len(item.result) > max_bytes:
                # Over budget: rather than drain the rest of the result set (up to `limit` more
                # documents) through the socket, drop the connection; the pool opens a new one.
                self.conn.close()
                return out, True
            out.append(item)
            total += len(item.result)


def _purged(row: tuple[Any, ...]) -> PurgedResult:
    job_id = row[1]
    return PurgedResult(
        id=int(row[0]),
        job_id=job_id.decode("utf-8") if isinstance(job_id, bytes) else str(job_id),
        bytes=int(row[2] or 0),
    )


def _row(row: tuple[object, ...], include_result: bool) -> JobResultRow:
    document = row[1] if include_result else b""
    result = document.encode() if isinstance(document, str) else document
    return JobResultRow(meta=_meta(row), result=result)  # type: ignore[arg-type]


def list_query(
    *,
    created_from: datetime | None,
    created_to: datetime | None,
    status: str | None,
    after: Cursor | None,
    limit: int,
    include_result: bool,
    pinned: bool | None = None,
    expires_before: datetime | None = None,
    now: datetime | None = None,
) -> tuple[str, dict[str, object]]:
    """The ``SELECT`` of :meth:`JobResultRepository.list` and its parameters (``LIMIT`` is ``limit + 1``).

    It reads ``idx_created`` in order from the keyset position; every other condition (liveness,
    ``status``, ``pinned``, ``expires_before``) is checked on the rows that scan reaches.
    """
    columns = _META_COLUMNS + (", result_data" if include_result else "")
    where, params = range_filter(created_from, created_to, status, now=now)
    params["limit"] = limit + 1
    if pinned is not None:
        where += " AND pinned = %(pinned)s"
        params["pinned"] = pinned
    if expires_before is not None:
        where += " AND expires_at < %(expires_before)s"
        params["expires_before"] = expires_before
    if after is not None:
        # Expanded form of (created_at, id) > (%s, %s): both engines use idx_created for it.
        where += " AND (created_at > %(after_created)s OR (created_at = %(after_created)s AND id > %(after_id)s))"
        params["after_created"] = after.created_at
        params["after_id"] = after.id
    sql = f"SELECT {columns} FROM job_results {ORDERED_BY_TIME}{where}"  # noqa: S608 - fixed fragments only
    return sql + " ORDER BY created_at, id LIMIT %(limit)s", params


SQL_EXPORT_COLUMNS = (
    "CONCAT_WS(' ', job_id, status, DATE_FORMAT(created_at, '%%Y-%%m-%%dT%%H:%%i:%%s.%%fZ')), result_data"
)
"""Export rows as two columns: ``b"<job_id> <status> <created_at RFC 3339>"`` and the JSON text.

Neither job ids nor statuses contain spaces. Two columns instead of four, and the timestamp formatted
by the server, halve the per-row work of aiomysql's pure-Python protocol parser, which dominates the
cost of a range export."""
ORDERED_BY_TIME = "FORCE INDEX (idx_created)"
"""Read rows in index order instead of sorting them: when a range covers most of the table, MySQL
prefers a table scan plus filesort, and a filesort of rows carrying multi-megabyte JSON documents fails
with error 1038 "Out of sort memory" (seen on MySQL 9.7 with the default 256 KiB sort_buffer_size)."""


def range_filter(
    created_from: datetime | None, created_to: datetime | None, status: str | None, *, now: datetime | None = None
) -> tuple[str, dict[str, object]]:
    """``WHERE`` clause and parameters for live rows with ``created_from <= created_at < created_to``.

    Live: not expired at ``now`` (:data:`LIVE`; default: the service's clock now).
    """
    where: list[str] = [LIVE]
    params: dict[str, object] = {"now": now or utcnow()}
    if created_from is not None:
        where.append("created_at >= %(created_from)s")
        params["created_from"] = created_from
    if created_to is not None:
        where.append("created_at < %(created_to)s")
        params["created_to"] = created_to
    if status is not None:
        where.append("status = %(status)s")
        params["status"] = status
    return " WHERE " + " AND ".join(where), params


class JobResultStream:
    """Rows of a time range for an export, read through a server-side (unbuffered) cursor.

    Memory stays flat whatever the range size: rows arrive in chunks of at most ``chunk_rows`` rows
    that end once their documents reach ``chunk_bytes`` (a chunk holds at least one row). The connection
    is busy until the stream is exhausted; a stream abandoned half-way leaves the connection unusable,
    so callers close that connection.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    async def count(
        self,
        created_from: datetime | None,
        created_to: datetime | None,
        status: str | None,
        *,
        now: datetime | None = None,
    ) -> int:
        """Number of rows in the range that are live at ``now`` (default: the service's clock now)."""
        where, params = range_filter(created_from, created_to, status, now=now)
        async with self.conn.cursor() as cur:
            await cur.execute(f"SELECT COUNT(*) FROM job_results{where}", params)  # noqa: S608
            row = await cur.fetchone()
        return int(row[0])

    async def chunks(
        self,
        created_from: datetime | None,
        created_to: datetime | None,
        status: str | None,
        chunk_rows: int,
        chunk_bytes: int = 8 * 1024**2,
        *,
        now: datetime | None = None,
    ) -> AsyncIterator[list[tuple[bytes, str]]]:
        """Yield lists of ``(b"<job_id> <status> <created_at>", result_json_text)``, oldest first.

        Only rows live at ``now`` (default: the service's clock now): pass the same ``now`` to every
        pass over one export, so they read the same rows.

        A list ends after ``chunk_rows`` rows, or after the row that brings its documents' length
        (characters of JSON text) to ``chunk_bytes``: 500 rows of 15 MB documents are never held at once.
        """
        where, params = range_filter(created_from, created_to, status, now=now)
        sql = f"SELECT {SQL_EXPORT_COLUMNS} FROM job_results {ORDERED_BY_TIME}{where} ORDER BY created_at, id"  # noqa: S608
        cur = await self.conn.cursor(aiomysql.SSCursor)
        # No try/finally around the cursor: after an error or an abandoned stream the caller closes the
        # connection, and closing the cursor first would read the rest of the result, or, with the
        # connection lost, fail with an AttributeError inside aiomysql that hides the 2013 it follows.
        await cur.execute(sql, params)
        chunk: list[tuple[bytes, str]] = []
        size = 0
        while True:
            row = await cur.fetchone()  # row by row: a fetchmany(n) would hold n rows whatever their size
            if row is None:
                break
            chunk.append(row)
            size += len(row[1])
            if len(chunk) >= chunk_rows or size >= chunk_bytes:
                yield chunk
                chunk, size = [], 0
        if chunk:
            yield chunk
        await cur.close()
