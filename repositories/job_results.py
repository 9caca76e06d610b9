"""Hand-written SQL for the ``job_results`` aggregate.

Repositories work on a connection handed to them by the unit of work
(:meth:`repositories.database.Database.run`); they never open or end transactions.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, cast

import aiomysql
import msgspec
import pymysql

from repositories.database import ER_DUP_ENTRY, Connection, SQLText, error_code, escape_text
from repositories.domain import JobResultNotFound, JobStatus, utcnow


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
    status: JobStatus
    version: int
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None = None
    pinned: bool = False


def etag_of(meta: JobResultMeta) -> str:
    """Strong entity tag of a stored job result: changes on every write, and on delete + re-create."""
    return f'"{meta.id:x}.{meta.version}"'


class JobResultRow(msgspec.Struct, frozen=True):
    """A stored job result; ``result`` is the stored JSON text, never decoded; ``labels`` its labels."""

    meta: JobResultMeta
    result: bytes
    labels: dict[str, str] = msgspec.field(default_factory=dict)


class LabelTerm(msgspec.Struct, frozen=True):
    """One label key of a filter: the result has label ``key`` with one of ``values`` (any value if empty)."""

    key: str
    values: tuple[str, ...] = ()


class ResultFilter(msgspec.Struct, frozen=True):
    """What a listing or a range export selects besides its time range.

    Every part must hold (AND): ``statuses`` (any of them; all if empty), each of ``labels`` (see
    :class:`LabelTerm`), and ``job_id_prefix`` (job ids starting with it). Callers check the bounds
    (``service/labels.py``); here every term becomes an indexed access (see :meth:`JobResultRepository.list`).
    """

    statuses: tuple[str, ...] = ()
    labels: tuple[LabelTerm, ...] = ()
    job_id_prefix: str | None = None


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


def _labels_column(id_column: str) -> str:
    """A column with the labels of the result whose id is ``id_column``: a JSON object, or NULL if none.

    Values are stored as UTF-8 bytes (VARBINARY); ``CONVERT(... USING utf8mb4)`` makes them text, which
    ``JSON_OBJECTAGG`` needs on MySQL. Labels hold no control characters, so both engines write plain
    JSON string escapes only (for a quote and a backslash).
    """
    return (
        "(SELECT JSON_OBJECTAGG(lb.label_key, CONVERT(lb.label_value USING utf8mb4)) "  # noqa: S608 - fixed
        f"FROM job_result_labels lb FORCE INDEX (PRIMARY) WHERE lb.result_id = {id_column})"
    )


_LABELS = _labels_column("job_results.id")
SQL_GET = f"SELECT {_META_COLUMNS}, result_data, {_LABELS} FROM job_results WHERE job_id = %(job_id)s AND {LIVE}"  # noqa: S608
SQL_GET_META = f"SELECT {_META_COLUMNS} FROM job_results WHERE job_id = %(job_id)s AND {LIVE}"  # noqa: S608
SQL_INSERT = (
    "INSERT INTO job_results (job_id, status, result_data, version, created_at, updated_at, expires_at, pinned) "
    "VALUES (%(job_id)s, %(status)s, %(result)s, 1, %(now)s, %(now)s, %(expires_at)s, %(pinned)s)"
)
SQL_INSERT_MANY = (
    "INSERT INTO job_results (job_id, status, result_data, version, created_at, updated_at, expires_at, pinned) VALUES "
)
_INSERT_ROW = "(%s, %s, %s, 1, %s, %s, %s, %s)"
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

SQL_DELETE_LABELS = "DELETE FROM job_result_labels WHERE result_id = %(result_id)s"
SQL_INSERT_LABELS = "INSERT INTO job_result_labels (result_id, label_key, label_value, created_at) VALUES "
_LABELS_DECODER = msgspec.json.Decoder(dict[str, str])


def _labels(value: object) -> dict[str, str]:
    """Decode a :func:`_labels_column` value (JSON text, or None when the result has no labels)."""
    if value is None:
        return {}
    return _LABELS_DECODER.decode(value if isinstance(value, bytes | str) else str(value))


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
        status=cast(JobStatus, status),  # the column is an ENUM of these
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


class NewJobResult(msgspec.Struct, frozen=True):
    """One row for :meth:`JobResultRepository.create_many`: what :meth:`JobResultRepository.create` takes."""

    job_id: str
    status: JobStatus
    result: Document
    labels: Mapping[str, str] | None = None
    expires_at: datetime | None = None
    pinned: bool = False


class JobResultRepository:
    """Reads and writes ``job_results`` rows (and their labels) on one connection.

    Every method that takes ``now`` (naive UTC; None means the service's clock now, :func:`utcnow`)
    sees only rows that have not expired at ``now`` (:data:`LIVE`). Pass one ``now`` to every call of
    a unit so they agree.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    async def get(self, job_id: str, now: datetime | None = None) -> JobResultRow:
        """The live job result with ``job_id`` and its labels; the document comes back as stored JSON text (bytes).

        Raises:
            JobResultNotFound: no such job id, or it expired.
        """
        async with self.conn.cursor() as cur:
            await cur.execute(SQL_GET, {"job_id": job_id, "now": now or utcnow()})
            row = await cur.fetchone()
        if row is None:
            raise JobResultNotFound(job_id)
        document = row[1]
        return JobResultRow(
            meta=_meta(row),
            result=document.encode() if isinstance(document, str) else document,
            labels=_labels(row[2]),
        )

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
        status: JobStatus,
        result: Document,
        labels: Mapping[str, str] | None = None,
        *,
        expires_at: datetime | None = None,
        pinned: bool = False,
        now: datetime | None = None,
    ) -> JobResultMeta:
        """Insert a new job result with ``labels`` (checked by the caller); ``result`` is checked JSON text.

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
        meta = JobResultMeta(
            id=row_id,
            job_id=job_id,
            status=status,
            version=1,
            created_at=now,
            updated_at=now,
            expires_at=expires_at,
            pinned=pinned,
        )
        if labels:
            await self._insert_labels(meta, labels)
        return meta

    async def create_many(
        self, rows: Sequence[NewJobResult], now: datetime | None = None
    ) -> builtins.list[JobResultMeta]:
        """Insert new job results with one multi-row ``INSERT`` (and one for all their labels), in order.

        The same rows as :meth:`create` would write one by one (version 1, one timestamp for all), in
        three round trips whatever their number: the ``INSERT``, one read of the new rows' ids, and the
        labels' ``INSERT``. ``now`` (naive UTC; default: the clock now) is the rows' timestamp, the one
        their ``expires_at`` was computed from. The caller keeps the statement under ``max_allowed_packet``.

        Raises:
            JobResultExists: one of the job ids is taken (1062, an expired row not yet purged
                included); the statement inserted nothing.
        """
        now = now or utcnow()
        params: builtins.list[object] = []
        for row in rows:
            params += (row.job_id, row.status, _document(row.result), now, now, row.expires_at, row.pinned)
        sql = SQL_INSERT_MANY + ", ".join([_INSERT_ROW] * len(rows))
        async with self.conn.cursor() as cur:
            try:
                await cur.execute(sql, params)
            except pymysql.err.IntegrityError as exc:
                if error_code(exc) == ER_DUP_ENTRY:
                    raise JobResultExists(rows[0].job_id) from None
                raise
            await cur.execute(
                f"SELECT id, job_id FROM job_results WHERE job_id IN ({', '.join(['%s'] * len(rows))})",  # noqa: S608
                [row.job_id for row in rows],
            )
            ids = {
                (job_id.decode() if isinstance(job_id, bytes) else job_id): row_id
                for row_id, job_id in await cur.fetchall()
            }
        metas = [
            JobResultMeta(
                id=ids[row.job_id],
                job_id=row.job_id,
                status=row.status,
                version=1,
                created_at=now,
                updated_at=now,
                expires_at=row.expires_at,
                pinned=row.pinned,
            )
            for row in rows
        ]
        labelled = [(meta, row.labels) for meta, row in zip(metas, rows, strict=True) if row.labels]
        if labelled:
            values: builtins.list[object] = []
            for meta, labels in labelled:
                for key, value in labels.items():
                    values += (meta.id, key, value, meta.created_at)
            async with self.conn.cursor() as cur:
                await cur.execute(SQL_INSERT_LABELS + ", ".join(["(%s, %s, %s, %s)"] * (len(values) // 4)), values)
        return metas

    async def existing(self, job_ids: builtins.list[str]) -> set[str]:
        """Which of ``job_ids`` have a job result (a plain read: no lock is taken)."""
        if not job_ids:
            return set()
        async with self.conn.cursor() as cur:
            await cur.execute(
                f"SELECT job_id FROM job_results WHERE job_id IN ({', '.join(['%s'] * len(job_ids))})",  # noqa: S608
                job_ids,
            )
            return {job_id.decode() if isinstance(job_id, bytes) else job_id for (job_id,) in await cur.fetchall()}

    async def replace(
        self,
        job_id: str,
        status: JobStatus,
        result: Document,
        labels: Mapping[str, str] | None = None,
        *,
        expires_at: datetime | None = None,
        pinned: bool = False,
        now: datetime | None = None,
    ) -> JobResultMeta:
        """Replace a live job result and all its labels (None or empty: none), bumping its version.

        Returns the new metadata.

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
        meta = await self.get_meta(job_id, now)
        async with self.conn.cursor() as cur:
            await cur.execute(SQL_DELETE_LABELS, {"result_id": meta.id})
        if labels:
            await self._insert_labels(meta, labels)
        return meta

    async def _insert_labels(self, meta: JobResultMeta, labels: Mapping[str, str]) -> None:
        """One multi-row INSERT of the result's labels, each carrying the result's ``created_at``."""
        rows = []
        params: list[object] = []
        for key, value in labels.items():
            rows.append("(%s, %s, %s, %s)")
            params += [meta.id, key, value, meta.created_at]
        async with self.conn.cursor() as cur:
            await cur.execute(SQL_INSERT_LABELS + ", ".join(rows), params)

    async def upsert(
        self,
        job_id: str,
        status: JobStatus,
        result: Document,
        labels: Mapping[str, str] | None = None,
        *,
        expires_at: datetime | None = None,
        pinned: bool = False,
        now: datetime | None = None,
    ) -> tuple[JobResultMeta, bool]:
        """Create or replace (labels included); returns the stored metadata and True when the row is new.

        INSERT comes first: a new job takes no gap lock, so concurrent uploads of new jobs do not
        deadlock under REPEATABLE READ. A concurrent delete between the two statements makes the
        UPDATE miss; that is reported as :class:`JobResultNotFound` only if it repeats. An expired
        row counts as absent (see :meth:`create`).
        """
        now = now or utcnow()
        for _ in range(2):
            try:
                return await self.create(
                    job_id, status, result, labels, expires_at=expires_at, pinned=pinned, now=now
                ), True
            except JobResultExists:
                pass
            try:
                return await self.replace(
                    job_id, status, result, labels, expires_at=expires_at, pinned=pinned, now=now
                ), False
            except JobResultNotFound:
                continue
        raise JobResultNotFound(job_id)

    async def delete(self, job_id: str, now: datetime | None = None) -> None:
        """Delete the job result (its labels go with it: ``ON DELETE CASCADE``).

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
        filters: ResultFilter | None = None,
        pinned: bool | None = None,
        expires_before: datetime | None = None,
        now: datetime | None = None,
    ) -> tuple[list[JobResultRow], bool]:
        """A page of live job results with ``created_from <= created_at < created_to``, oldest first.

        Keyset pagination on ``(created_at, id)``: rows strictly after ``after``. Returns at most
        ``limit`` rows and whether more rows follow the last one. ``result`` is empty bytes unless
        ``include_result``. Bounds are naive UTC. ``status`` and ``filters`` narrow the rows (AND).

        Every filter is an index access (see :func:`page_query`): the query is driven by the label
        index (a label with values), by ``idx_status_created`` (statuses), or by ``idx_created``, and
        reads that index in keyset order, so a page stops after ``limit + 1`` matching rows.

        ``pinned`` keeps only pinned (True) or unpinned (False) results, ``expires_before`` only those
        with ``expires_at < expires_before`` (never those that never expire); rows expired at ``now``
        are never listed. These three are conditions on the rows the driving index reaches.

        With ``include_result`` and ``max_bytes``, the page also stops before the row whose document
        would bring the documents' total above ``max_bytes`` (bytes of JSON text), though never before
        its first row: the rows are read one by one from a server-side cursor, so at most one document
        beyond the budget is ever held. A page cut short this way closes the connection (the rest of
        the result set is never read).
        """
        where = _merged(filters, status)
        sql, params = page_query(
            created_from,
            created_to,
            where,
            after,
            limit + 1,
            include_result,
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
    return JobResultRow(meta=_meta(row), result=result, labels=_labels(row[-1]))  # type: ignore[arg-type]


def _merged(filters: ResultFilter | None, status: str | None) -> ResultFilter:
    """``filters`` with the single ``status`` of older callers folded into its statuses."""
    where = filters or ResultFilter()
    if status is None:
        return where
    if where.statuses and status not in where.statuses:
        return msgspec.structs.replace(where, statuses=("",))  # both given, disjoint: no row matches
    return msgspec.structs.replace(where, statuses=(status,))


_META_R = (
    "CONCAT_WS(' ', r.id, r.version, r.status, r.pinned, r.created_at, r.updated_at, "
    "COALESCE(REPLACE(r.expires_at, ' ', 'T'), '-'), r.job_id)"
)
""":data:`_META_COLUMNS` of the table aliased ``r``."""


def _like_prefix(prefix: str) -> str:
    """A ``LIKE`` pattern matching strings that start with ``prefix`` (backslash, ``%`` and ``_`` escaped)."""
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class _Sql:
    """Collects named parameters while a statement is built."""

    def __init__(self) -> None:
        self.params: dict[str, object] = {}

    def add(self, value: object) -> str:
        name = f"p{len(self.params)}"
        self.params[name] = value
        return f"%({name})s"


def _label_joins(sql: _Sql, terms: Iterable[LabelTerm], id_column: str) -> str:
    """One ``STRAIGHT_JOIN`` per term on the labels' primary key ``(result_id, label_key)``: ``eq_ref``.

    A join rather than ``EXISTS``: MySQL turns an ``EXISTS`` into a semi-join it may reorder, reading
    the labels table first (a full scan). ``STRAIGHT_JOIN`` keeps the driving index first on both
    engines, and a term matches at most one row per result (one value per key), so no row repeats.
    """
    joins = []
    for n, term in enumerate(terms):
        alias = f"x{n}"
        on = f"{alias}.result_id = {id_column} AND {alias}.label_key = {sql.add(term.key)}"
        if term.values:
            on += f" AND {alias}.label_value IN ({', '.join(sql.add(v) for v in term.values)})"
        joins.append(f" STRAIGHT_JOIN job_result_labels {alias} FORCE INDEX (PRIMARY) ON {on}")
    return "".join(joins)


def _conditions(
    sql: _Sql,
    created_from: datetime | None,
    created_to: datetime | None,
    after: Cursor | None,
    time_column: str,
    id_column: str,
) -> list[str]:
    """Time range and keyset conditions on ``time_column`` / ``id_column``."""
    out = []
    if created_from is not None:
        out.append(f"{time_column} >= {sql.add(created_from)}")
    if created_to is not None:
        out.append(f"{time_column} < {sql.add(created_to)}")
    if after is not None:
        # Expanded form of (created_at, id) > (%s, %s): both engines read it as a range of the index.
        at, row_id = sql.add(after.created_at), sql.add(after.id)
        out.append(f"({time_column} > {at} OR ({time_column} = {at} AND {id_column} > {row_id}))")
    return out


def _live(sql: _Sql, table: str, now: datetime | None) -> str:
    """:data:`LIVE` for the rows of ``table`` (an alias or name), at ``now`` (default: the clock now)."""
    at = sql.add(now or utcnow())
    return f"({table}.expires_at IS NULL OR {table}.expires_at > {at})"


def _lifecycle(sql: _Sql, table: str, pinned: bool | None, expires_before: datetime | None) -> list[str]:
    """The listing's ``pinned`` and ``expires_before`` conditions on ``table`` (residual, not index ranges)."""
    out = []
    if pinned is not None:
        out.append(f"{table}.pinned = {sql.add(pinned)}")
    if expires_before is not None:
        out.append(f"{table}.expires_at < {sql.add(expires_before)}")
    return out


def driving_term(where: ResultFilter) -> LabelTerm | None:
    """The label term whose index range drives a page query: a key with values, the fewest values first.

    None when no term has values (a page is then driven by ``idx_status_created`` or ``idx_created``).
    """
    with_values = [term for term in where.labels if term.values]
    return min(with_values, key=lambda term: len(term.values)) if with_values else None


def page_query(
    created_from: datetime | None,
    created_to: datetime | None,
    where: ResultFilter,
    after: Cursor | None,
    limit: int,
    include_result: bool,
    *,
    pinned: bool | None = None,
    expires_before: datetime | None = None,
    now: datetime | None = None,
) -> tuple[str, dict[str, object]]:
    """The SQL of one listing page (at most ``limit`` rows in keyset order) and its parameters.

    Shape: one *branch* per value of the driving index, each reading that index in ``(created_at, id)``
    order with every other filter applied as it goes, and stopping after ``limit`` rows:

    * a label key with values (:func:`driving_term`): ``idx_labels_filter`` at ``(key, value)``, one
      branch per value; the job row by primary key (``eq_ref``) for status and prefix; other label keys
      as joins on the labels' primary key (``eq_ref``);
    * else statuses: ``idx_status_created``, one branch per status;
    * else ``idx_created`` (``FORCE INDEX``: never a table scan plus filesort).

    Several branches are merged with ``UNION ALL`` (they are disjoint: one value per key, one status
    per row) and the outer query sorts at most ``branches * limit`` keys. ``STRAIGHT_JOIN`` and
    ``FORCE INDEX`` fix the plan, so no optimizer estimate can turn it into a scan.
    """
    sql = _Sql()
    columns = _META_R + (", r.result_data" if include_result else "") + ", " + _labels_column("r.id")
    driver = driving_term(where)
    prefix = _like_prefix(where.job_id_prefix) if where.job_id_prefix else None
    branches: list[str] = []
    if driver is not None:
        for value in driver.values:
            conds = [f"d.label_key = {sql.add(driver.key)}", f"d.label_value = {sql.add(value)}"]
            conds += _conditions(sql, created_from, created_to, after, "d.created_at", "d.result_id")
            if where.statuses:
                conds.append(f"r.status IN ({', '.join(sql.add(s) for s in where.statuses)})")
            if prefix is not None:
                conds.append(f"r.job_id LIKE {sql.add(prefix)}")
            conds += [_live(sql, "r", now), *_lifecycle(sql, "r", pinned, expires_before)]
            joins = _label_joins(sql, (term for term in where.labels if term is not driver), "d.result_id")
            branches.append(
                "SELECT d.created_at AS created_at, d.result_id AS id "  # noqa: S608
                "FROM job_result_labels d FORCE INDEX (idx_labels_filter) "
                f"STRAIGHT_JOIN job_results r FORCE INDEX (PRIMARY) ON r.id = d.result_id{joins} "
                f"WHERE {' AND '.join(conds)} ORDER BY d.created_at, d.result_id LIMIT {sql.add(limit)}"
            )
    else:
        index = "idx_status_created" if where.statuses else "idx_created"
        for status in where.statuses or (None,):
            conds = [] if status is None else [f"r.status = {sql.add(status)}"]
            conds += _conditions(sql, created_from, created_to, after, "r.created_at", "r.id")
            if prefix is not None:
                conds.append(f"r.job_id LIKE {sql.add(prefix)}")
            conds += [_live(sql, "r", now), *_lifecycle(sql, "r", pinned, expires_before)]
            joins = _label_joins(sql, where.labels, "r.id")
            where_sql = f" WHERE {' AND '.join(conds)}" if conds else ""
            branches.append(
                f"SELECT r.created_at AS created_at, r.id AS id FROM job_results r FORCE INDEX ({index})"  # noqa: S608
                f"{joins}{where_sql} ORDER BY r.created_at, r.id LIMIT {sql.add(limit)}"
            )
    if len(branches) == 1:
        # One branch: select the page's columns in it directly (no derived table).
        _, _, rest = branches[0].partition(" FROM ")
        return f"SELECT {columns} FROM {rest}", sql.params  # noqa: S608 - fixed fragments only
    limit_sql = sql.add(limit)
    union = " UNION ALL ".join(f"({branch})" for branch in branches)
    text = (
        f"SELECT {columns} FROM ({union}) p STRAIGHT_JOIN job_results r FORCE INDEX (PRIMARY) ON r.id = p.id "  # noqa: S608
        f"ORDER BY p.created_at, p.id LIMIT {limit_sql}"
    )
    return text, sql.params


SQL_EXPORT_COLUMNS = (
    "CONCAT_WS(' ', job_results.job_id, job_results.status, "
    "DATE_FORMAT(job_results.created_at, '%%Y-%%m-%%dT%%H:%%i:%%s.%%fZ')), job_results.result_data, "
    + _labels_column("job_results.id")
)
"""Export rows as three columns: ``b"<job_id> <status> <created_at RFC 3339>"``, the JSON text and the labels.

Neither job ids nor statuses contain spaces. One packed column instead of three, and the timestamp
formatted by the server, halve the per-row work of aiomysql's pure-Python protocol parser, which
dominates the cost of a range export. The labels are a JSON object, or NULL when there are none."""
ORDERED_BY_TIME = "FORCE INDEX (idx_created)"
"""Read rows in index order instead of sorting them: when a range covers most of the table, MySQL
prefers a table scan plus filesort, and a filesort of rows carrying multi-megabyte JSON documents fails
with error 1038 "Out of sort memory" (seen on MySQL 9.7 with the default 256 KiB sort_buffer_size)."""


def range_filter(
    created_from: datetime | None,
    created_to: datetime | None,
    status: str | None,
    filters: ResultFilter | None = None,
    *,
    now: datetime | None = None,
) -> tuple[str, dict[str, object]]:
    """What follows ``FROM job_results FORCE INDEX (idx_created)`` for ``created_from <= created_at < created_to``.

    Label joins (each term on the labels' primary key, ``eq_ref``) and a ``WHERE`` clause (possibly
    empty): ``status`` and ``filters`` narrow the range (statuses as ``IN``, the prefix as ``LIKE``), for
    a scan of ``job_results`` in ``idx_created`` order. Columns of ``job_results`` must be qualified.
    Only rows live at ``now`` (:data:`LIVE`; default: the service's clock now).
    """
    where = _merged(filters, status)
    sql = _Sql()
    joins = _label_joins(sql, where.labels, "job_results.id")
    conds = _conditions(sql, created_from, created_to, None, "job_results.created_at", "job_results.id")
    conds.append(_live(sql, "job_results", now))
    if where.statuses:
        conds.append(f"job_results.status IN ({', '.join(sql.add(s) for s in where.statuses)})")
    if where.job_id_prefix:
        conds.append(f"job_results.job_id LIKE {sql.add(_like_prefix(where.job_id_prefix))}")
    return joins + (" WHERE " + " AND ".join(conds) if conds else ""), sql.params


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
        filters: ResultFilter | None = None,
        *,
        now: datetime | None = None,
    ) -> int:
        """Number of rows in the range live at ``now`` that pass ``status`` and ``filters``."""
        where, params = range_filter(created_from, created_to, status, filters, now=now)
        async with self.conn.cursor() as cur:
            await cur.execute(f"SELECT COUNT(*) FROM job_results {ORDERED_BY_TIME}{where}", params)  # noqa: S608
            row = await cur.fetchone()
        return int(row[0])

    async def chunks(
        self,
        created_from: datetime | None,
        created_to: datetime | None,
        status: str | None,
        chunk_rows: int,
        chunk_bytes: int = 8 * 1024**2,
        filters: ResultFilter | None = None,
        *,
        now: datetime | None = None,
    ) -> AsyncIterator[list[tuple[bytes, str, str | None]]]:
        """Yield lists of ``(b"<job_id> <status> <created_at>", result_json_text, labels_json)``, oldest first.

        ``labels_json`` is a JSON object, or None when the job has no labels. A list ends after
        ``chunk_rows`` rows, or after the row that brings its documents' length (characters of JSON
        text) to ``chunk_bytes``: 500 rows of 15 MB documents are never held at once. ``status`` and
        ``filters`` narrow the rows as in :func:`range_filter`; only rows live at ``now`` (pass the same
        ``now`` to every pass over one export, so they read the same rows).
        """
        where, params = range_filter(created_from, created_to, status, filters, now=now)
        sql = (
            f"SELECT {SQL_EXPORT_COLUMNS} FROM job_results {ORDERED_BY_TIME}{where} "  # noqa: S608
            "ORDER BY job_results.created_at, job_results.id"
        )
        cur = await self.conn.cursor(aiomysql.SSCursor)
        # No try/finally around the cursor: after an error or an abandoned stream the caller closes the
        # connection, and closing the cursor first would read the rest of the result, or, with the
        # connection lost, fail with an AttributeError inside aiomysql that hides the 2013 it follows.
        await cur.execute(sql, params)
        chunk: list[tuple[bytes, str, str | None]] = []
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
