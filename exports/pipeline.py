"""The export pipeline: single-job exports in one transaction, and durable range exports.

Single-job export: one transaction share-locks and reads the job and records the export (the lock
orders it against a DELETE of the job, which deletes the job's exports in its own transaction); the
file is durable under its final name before the COMMIT and removed only once its record is known not
to exist (a COMMIT whose answer was lost is looked up first, see :mod:`repositories.database`).
The unit is retried from BEGIN on transient errors (see :mod:`repositories.database`).

Range export: a row in ``exports`` (state ``queued``) that the background worker of some service
process (:meth:`ExportService.start`) claims with a lease, streams from a server-side cursor in chunks,
and finishes. Chunks are converted and encoded in a worker thread while the next chunk is read
(:func:`_in_threads`), in C calls that each cover a bounded amount of text, so export encoding never
holds the event loop for long. A csv export without chosen columns reads the database once: pass 1
flattens the rows into a :class:`CsvSpool`, collecting the columns; pass 2 writes the records from it. A worker that
dies stops renewing its lease; once the lease expires, another worker claims the export and starts it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import secrets
import socket
import struct
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar

import msgspec
import pymysql
import structlog

from config.settings import Settings
from exports.columns import ColumnSelection, parse_columns
from exports.files import StorageFull, temp_files
from exports.formats import CsvFlattener, CsvTooWide, CsvWriter, ExportRow, FormatWriter, make_writer
from exports.store import ExportStore, ExportWriter, StoreError, download_name, open_store
from observability.metrics import EXPORT_BYTES, EXPORT_DELETIONS, EXPORT_DURATION, EXPORT_ROWS, EXPORTS
from repositories.database import CommitOutcomeUnknown, Connection, Database, DatabaseUnavailable
from repositories.domain import (
    FINISHED_STATES,
    PENDING_STATES,
    Compression,
    Format,
    JobResultNotFound,
    format_timestamp,
    utcnow,
)
from repositories.exports import Export, ExportNotFound, ExportParameters, ExportRepository, filter_of, lock_job_shared
from repositories.job_results import JobResultRepository, JobResultRow, JobResultStream
from repositories.webhook_events import emitting, export_event

log = structlog.get_logger("jobresults.exports")
T = TypeVar("T")
R = TypeVar("R")

STORAGE_FULL_MESSAGE = "not enough storage for the export file"
INTERNAL_ERROR_MESSAGE = "the export failed because of an internal error"
RecordedHook = Callable[[Connection, Export], Awaitable[None]]
"""Runs inside the unit that records a new export, on its connection, with the export as it will commit
(the idempotency-key record is completed there, so it commits or rolls back with the export)."""
STORE_SWEEP_EVERY_S = 300.0
"""How often each worker removes the objects of lost attempts from the ``s3`` store (seconds)."""


class LeaseLost(Exception):
    """Another worker took over this range export (our lease expired)."""


class ExportCancelled(LeaseLost):
    """The range export was cancelled (``DELETE`` or ``POST .../cancel``) while this worker ran it."""


class ExportNotCancellable(Exception):
    """``POST .../cancel`` of an export that already finished; ``str()`` is its state as clients see it."""


class ExportTooLarge(Exception):
    """The export would pass ``JOBRESULTS_EXPORT_MAX_BYTES``; ``str()`` is safe to show clients."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the export is larger than the limit of {limit} bytes; export a narrower range")


def _check_size(file: ExportWriter, limit: int) -> None:
    if file.size > limit:
        raise ExportTooLarge(limit)


def _count(kind: str, fmt: str, state: str, *, rows: int = 0, size: int = 0, seconds: float | None = None) -> None:
    EXPORTS.labels(kind, fmt, state).inc()
    if state == "succeeded":
        EXPORT_ROWS.labels(fmt).inc(rows)
        EXPORT_BYTES.labels(fmt).inc(size)
        if seconds is not None:
            EXPORT_DURATION.labels(kind, fmt).observe(seconds)


def _caused_by_database(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was raised while handling, a lost connection or retries running out.

    aiomysql can re-raise a connection lost mid-stream (2013) as an ``AttributeError`` from its cursor's
    close, with the ``OperationalError`` as the context.
    """
    seen: BaseException | None = exc
    for _ in range(8):  # exception chains are short; the bound guards against cycles
        if seen is None:
            return False
        if isinstance(seen, DatabaseUnavailable | pymysql.err.OperationalError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def new_export_id() -> str:
    """A random export id: 32 lowercase hex characters (128 bits)."""
    return secrets.token_hex(16)


def new_owner() -> str:
    """A lease owner name unique to this process start: ``<host>-<pid>-<random>``, file-name safe."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32]
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


def _export_row(meta: bytes | str, result: str | bytes, labels: str | bytes | None = None) -> ExportRow:
    """From a row of :meth:`JobResultStream.chunks`: ``b"<job_id> <status> <created_at>"``, the JSON, the labels."""
    job_id, status, created_at = (meta.decode("ascii") if isinstance(meta, bytes) else meta).split(" ")
    return ExportRow(
        job_id=job_id,
        status=status,
        created_at=created_at,
        result=result.encode() if isinstance(result, str) else result,
        labels=_LABELS_DECODER.decode(labels) if labels is not None else {},
    )


_LABELS_DECODER = msgspec.json.Decoder(dict[str, str])


def _row_of(stored: JobResultRow) -> ExportRow:
    meta = stored.meta
    return ExportRow(
        job_id=meta.job_id,
        status=meta.status,
        created_at=format_timestamp(meta.created_at),
        result=stored.result,
        labels=stored.labels,
    )


def _encode_chunk(writer: FormatWriter, chunk: Sequence[tuple[Any, ...]]) -> tuple[int, bytes]:
    """Convert and encode one chunk of :meth:`JobResultStream.chunks` rows (blocking): ``(rows, bytes)``."""
    rows = [_export_row(*row) for row in chunk]
    return len(rows), writer.encode(rows)


_FRAME = struct.Struct("<Q")
_SPOOL_ENCODE = msgspec.msgpack.Encoder().encode
_SPOOL_DECODE = msgspec.msgpack.Decoder(list[tuple[Any, ...]]).decode


class CsvSpool:
    """Pass 1 of a full CSV range export: flattens the rows it reads, collecting the columns, and keeps them.

    Each chunk's rows, flattened by a :class:`CsvFlattener` to ``(job_id, status, created_at, column
    ids, cells, weight)``, are appended to an anonymous temporary file (``tempfile.TemporaryFile``: it
    has no name and vanishes when closed or when the process dies) as one length-prefixed msgpack
    frame, so pass 2 reads them back chunk by chunk, neither reading the database nor decoding the
    documents a second time. The file is in ``directory`` (the local exports directory) or the
    system's temporary directory; it holds about as many bytes as the CSV. :meth:`close` it.
    """

    def __init__(self, flattener: CsvFlattener, directory: str | None) -> None:
        self.flattener = flattener
        self._file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 - closed by close()

    def close(self) -> None:
        """Close (and so remove) the file."""
        self._file.close()

    def add(self, chunk: Sequence[tuple[Any, ...]]) -> None:
        """Flatten one chunk of :meth:`JobResultStream.chunks` rows and append it to the file (blocking).

        Raises:
            StorageFull: the disk is full.
            CsvTooWide: see :meth:`CsvFlattener.flatten`.
            msgspec.DecodeError: a stored result is not JSON.
        """
        flatten = self.flattener.flatten
        rows = []
        for meta, result, *_ in chunk:
            job_id, status, created_at = (meta.decode("ascii") if isinstance(meta, bytes) else meta).split(" ")
            rows.append((job_id, status, created_at, *flatten(result), len(result)))
        frame = _SPOOL_ENCODE(rows)
        try:
            self._file.write(_FRAME.pack(len(frame)))
            self._file.write(frame)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise StorageFull(STORAGE_FULL_MESSAGE) from exc
            raise

    def rewind(self) -> None:
        """Flush and go back to the first chunk (blocking)."""
        self._file.flush()
        self._file.seek(0)

    def next_chunk(self) -> list[tuple[Any, ...]] | None:
        """The next chunk as :meth:`add` got it, or None after the last one (blocking)."""
        head = self._file.read(_FRAME.size)
        if not head:
            return None
        return _SPOOL_DECODE(self._file.read(_FRAME.unpack(head)[0]))


async def _in_threads(chunks: AsyncIterator[T], work: Callable[[T], R]) -> AsyncGenerator[R, None]:
    """``work(chunk)`` for each chunk, in order, each in a worker thread while the next chunk is read.

    The database produces the next rows while this process converts the last ones, so waiting for
    the server overlaps with our own work; at most two chunks are held. One ``work`` runs at a time
    (writers keep state across chunks). Closing the generator waits for a running ``work`` to end.
    """
    pending: asyncio.Future[R] | None = None
    try:
        async for chunk in chunks:
            previous = pending
            if previous is not None:
                # Shielded: a cancelled wait leaves the future running, and `finally` waits for it.
                result = await asyncio.shield(previous)
            pending = asyncio.ensure_future(asyncio.to_thread(work, chunk))
            if previous is not None:
                yield result
        if pending is not None:
            yield await asyncio.shield(pending)
    finally:
        if pending is not None and not pending.done():
            await asyncio.wait([pending])


def _encode_spooled(writer: CsvWriter, spool: CsvSpool, positions: list[int]) -> tuple[int, bytes] | None:
    """Read one chunk back from the spool and encode it (blocking): ``(rows, bytes)``, None at the end."""
    chunk = spool.next_chunk()
    return None if chunk is None else (len(chunk), writer.encode_flat(chunk, positions))


def _encode_single(
    fmt: Format, row: ExportRow, max_columns: int, columns: ColumnSelection | None = None
) -> tuple[str, bytes]:
    """The whole file of a single-job export (blocking): ``(extension, bytes)``.

    Raises:
        CsvTooWide: a CSV of the result would have more than ``max_columns`` result columns (only
            when ``columns`` is None).
    """
    writer = make_writer(fmt, single=True, max_columns=max_columns, columns=columns)
    return writer.extension, writer.begin() + writer.encode([row]) + writer.end()


async def _write_all(writer: ExportWriter, data: bytes, limit: int) -> tuple[int, str]:
    """Write ``data`` and commit; the partial file or upload is removed on failure.

    Raises:
        ExportTooLarge: the file would pass ``limit`` bytes (nothing is left).
    """
    try:
        await writer.write(data)
        _check_size(writer, limit)
        size, sha256 = await writer.commit()
    except BaseException:
        await writer.discard()
        raise
    if size > limit:
        await writer.remove()
        raise ExportTooLarge(limit)
    return size, sha256


class ExportService:
    """Runs exports for one service process. ``owner`` names this process in range-export leases.

    ``on_settled`` is called with an export id after the COMMIT that took that export out of
    ``queued``/``running`` (the long-poll registry's :meth:`exports.waits.ExportWaits.settled`).
    """

    def __init__(
        self,
        db: Database,
        settings: Settings,
        store: ExportStore | None = None,
        *,
        on_settled: Callable[[str], None] | None = None,
    ) -> None:
        self.db = db
        self.on_settled = on_settled
        self.settings = settings
        self.directory = settings.exports_path
        self.store = store if store is not None else open_store(settings)
        self.owner = new_owner()
        self.lease = timedelta(seconds=settings.export_lease_s)
        self.retention = timedelta(days=settings.export_retention_days)
        # Renewing also records progress (rows_written), so renew at least every second.
        self._renew_every = min(settings.export_lease_s / 3, 1.0)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # --- single-job exports ------------------------------------------------------------------

    async def export_job(
        self,
        job_id: str,
        fmt: Format,
        compression: Compression,
        requested_by: str | None,
        columns: ColumnSelection | None = None,
        *,
        on_recorded: RecordedHook | None = None,
    ) -> Export:
        """Export one job's result synchronously; returns the committed export record.

        ``columns``: the chosen columns (:func:`exports.columns.parse_columns`), recorded in the
        export's parameters; None for all of them. ``on_recorded`` runs inside the unit, after the
        record is inserted (see :data:`RecordedHook`).

        Raises:
            JobResultNotFound: no such job.
            StorageFull: the disk is full; nothing partial is left.
            StoreError: the object store failed or refused; nothing partial is left.
            ExportTooLarge: the file would pass ``JOBRESULTS_EXPORT_MAX_BYTES``; nothing is left.
            CsvTooWide: a CSV would pass ``JOBRESULTS_CSV_MAX_COLUMNS``; nothing is written.
            DatabaseUnavailable: retries ran out.
        """
        files: list[tuple[str, ExportWriter]] = []  # (export id, its file) per attempt
        started = time.perf_counter()

        async def unit(conn: Connection) -> Export:
            begun = utcnow()
            # A locking read first: a concurrent DELETE of the job (which marks the job's exports deleted
            # in its own unit) waits for this unit, or this unit waits for it and finds no job. The read
            # view of the plain read below starts after the lock, so it sees the locked row.
            await lock_job_shared(conn, job_id)
            stored = await JobResultRepository(conn).get(job_id)
            export_id = new_export_id()
            extension, data = await asyncio.to_thread(
                _encode_single, fmt, _row_of(stored), self.settings.csv_max_columns, columns
            )
            file = await self.store.open_writer(export_id, 1, extension, compression, self.owner)
            size, sha256 = await _write_all(file, data, self.settings.export_max_bytes)
            files.append((export_id, file))
            export = await ExportRepository(conn).insert(
                export_id=export_id,
                kind="job",
                format=fmt,
                compression=compression,
                parameters=ExportParameters(job_id=job_id, columns=columns.columns if columns else None),
                state="succeeded",
                requested_by=requested_by,
                rows_written=1,
                bytes=size,
                sha256=sha256,
                file_name=download_name(export_id, extension, compression),
                object_key=self._object_key(file),
                created_at=begun,
                started_at=begun,
                finished_at=(finished := utcnow()),
                attempts=1,
                expires_at=finished + self.retention,
            )
            if on_recorded is not None:
                await on_recorded(conn, export)
            return export

        try:
            export = await self.db.run(emitting(unit, lambda done: export_event(done, state="succeeded")))
        except BaseException as exc:
            # A file goes only when its record is known not to exist: a retried attempt's always (it
            # was rolled back, or its lost COMMIT was found not to have landed), the last one's unless
            # its COMMIT's outcome is unknown (then its record may exist, and needs its file).
            in_doubt = isinstance(exc, (CommitOutcomeUnknown, asyncio.CancelledError))
            for _, file in files[:-1] if in_doubt else files:
                with contextlib.suppress(StoreError):
                    await file.remove()
            if in_doubt and files:
                log.warning("export.file_kept_commit_in_doubt", export_id=files[-1][0])
            if not isinstance(exc, JobResultNotFound):
                _count("job", fmt, "failed")
            raise
        _count("job", fmt, "succeeded", rows=1, size=export.bytes or 0, seconds=time.perf_counter() - started)
        for export_id, file in files:  # attempts that were rolled back and retried
            if export_id != export.export_id:
                with contextlib.suppress(StoreError):
                    await file.remove()
        log.info("export.finished", export_id=export.export_id, kind="job", format=fmt, bytes=export.bytes)
        return export

    # --- range exports -----------------------------------------------------------------------

    async def enqueue_range(
        self,
        parameters: ExportParameters,
        fmt: Format,
        compression: Compression,
        requested_by: str | None,
        *,
        on_recorded: RecordedHook | None = None,
    ) -> Export:
        """Record a queued range export and wake this process's worker.

        ``on_recorded`` runs inside the unit, after the record is inserted (see :data:`RecordedHook`).

        Raises:
            TooManyPendingExports: ``requested_by`` has ``exports_max_pending_per_key`` range exports
                queued or running already.
        """

        async def unit(conn: Connection) -> Export:
            export = await ExportRepository(conn).enqueue(
                export_id=new_export_id(),
                format=fmt,
                compression=compression,
                parameters=parameters,
                requested_by=requested_by,
                max_pending=self.settings.exports_max_pending_per_key,
            )
            if on_recorded is not None:
                await on_recorded(conn, export)
            return export

        export = await self.db.run(unit)
        self._wake.set()
        return export

    async def run_next(self) -> bool:
        """Claim one claimable range export and run it to the end; False if there was none."""
        # No commit token on every poll: a claim whose COMMIT is lost raises CommitOutcomeUnknown (the
        # loop pauses), and an export it may have claimed is claimed again once its lease expires.
        export = await self.db.run(
            lambda conn: ExportRepository(conn).claim(self.owner, self.lease), verify_commit=False
        )
        if export is None:
            return False
        log.info("export.claimed", export_id=export.export_id, attempt=export.attempts, owner=self.owner)
        await self._run_claimed(export)
        return True

    async def run_now(
        self,
        parameters: ExportParameters,
        fmt: Format,
        compression: Compression,
        requested_by: str | None,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> Export:
        """Record a range export already claimed by this process and run it here (the CLI's path).

        The row is inserted as ``running`` under this process's lease, so no background worker of a
        running service takes it; if this process dies, the lease expires and a service finishes it.

        Raises:
            StorageFull: the disk is full (the export is recorded as failed).
            ExportCancelled: it was cancelled through the API while it ran (no file is left).
        """
        now = utcnow()
        export = await self.db.run(
            lambda conn: ExportRepository(conn).insert(
                export_id=new_export_id(),
                kind="range",
                format=fmt,
                compression=compression,
                parameters=parameters,
                state="running",
                requested_by=requested_by,
                started_at=now,
                attempts=1,
                lease_owner=self.owner,
                lease_until=now + self.lease,
            )
        )
        started = time.perf_counter()
        try:
            rows, size = await self.write_range(export, progress=progress)
        except StorageFull:
            await self._settle(export, "fail", STORAGE_FULL_MESSAGE)
            raise
        except (StoreError, ExportTooLarge, CsvTooWide) as exc:
            await self._settle(export, "fail", str(exc))
            raise
        except ExportCancelled:
            raise  # cancelled through the API meanwhile: nothing to settle, no file left
        except BaseException:
            await asyncio.shield(self._settle(export, "fail", INTERNAL_ERROR_MESSAGE))
            raise
        _count("range", fmt, "succeeded", rows=rows, size=size, seconds=time.perf_counter() - started)
        return await self.db.run(lambda conn: ExportRepository(conn).get(export.export_id), transaction=False)

    async def count_rows(self, parameters: ExportParameters) -> int:
        """How many job results a range export with these parameters covers now."""
        return await self.db.run(
            lambda conn: JobResultStream(conn).count(
                parameters.created_from, parameters.created_to, None, filter_of(parameters)
            ),
            transaction=False,
        )

    async def _run_claimed(self, export: Export) -> None:
        started = time.perf_counter()
        try:
            rows, size = await self.write_range(export)
        except ExportCancelled:
            log.info("export.cancelled", export_id=export.export_id, kind="range")
        except LeaseLost:
            log.warning("export.lease_lost", export_id=export.export_id)
        except StorageFull:
            log.error("export.storage_full", export_id=export.export_id)
            await self._settle(export, "fail", STORAGE_FULL_MESSAGE)
        except (ExportTooLarge, CsvTooWide) as exc:
            log.warning("export.too_large", export_id=export.export_id, error=type(exc).__name__)
            await self._settle(export, "fail", str(exc))
        except StoreError as exc:
            if exc.transient and export.attempts < self.settings.export_max_attempts:
                log.warning("export.requeued", export_id=export.export_id, error=type(exc).__name__)
                await self._settle(export, "requeue", "")
            else:
                log.error("export.store_failed", export_id=export.export_id, error=type(exc).__name__)
                await self._settle(export, "fail", str(exc))
        except asyncio.CancelledError:
            # Shutting down: hand the export back so another worker needn't wait for the lease.
            await asyncio.shield(self._settle(export, "requeue", ""))
            raise
        except Exception as exc:
            if _caused_by_database(exc):
                await self._database_failed(export, exc)
            else:
                log.exception("export.failed", export_id=export.export_id)
                await self._settle(export, "fail", INTERNAL_ERROR_MESSAGE)
        else:
            _count("range", export.format, "succeeded", rows=rows, size=size, seconds=time.perf_counter() - started)
            log.info("export.finished", export_id=export.export_id, kind="range", rows=rows, bytes=size)

    async def _database_failed(self, export: Export, exc: BaseException) -> None:
        """A transient database error: requeue the export, or fail it once its attempts ran out."""
        if export.attempts >= self.settings.export_max_attempts:
            await self._settle(export, "fail", "the database was unavailable; request the export again")
        else:
            log.warning("export.requeued", export_id=export.export_id, error=type(exc).__name__)
            await self._settle(export, "requeue", "")

    async def _settle(self, export: Export, action: str, error: str) -> None:
        async def unit(conn: Connection) -> bool:
            repo = ExportRepository(conn)
            return await (
                repo.fail(export, self.owner, error, retention=self.retention)
                if action == "fail"
                else repo.requeue(export, self.owner)
            )

        try:
            done = await self.db.run(
                emitting(
                    unit,
                    lambda done: (
                        export_event(export, state="failed", error=error) if done and action == "fail" else None
                    ),
                )
            )
            if done and action == "fail":
                self._announce(export.export_id)
        except Exception:
            # The lease will expire and another worker will claim the export again.
            log.exception("export.settle_failed", export_id=export.export_id, action=action)

    async def write_range(self, export: Export, *, progress: Callable[[int], None] | None = None) -> tuple[int, int]:
        """Stream the export's rows into its file and mark it succeeded; returns ``(rows, bytes)``.

        Raises:
            LeaseLost: another worker owns the export now; our file was discarded.
            StorageFull: the disk is full; our file was discarded.
            StoreError: the object store failed; our upload was aborted.
            ExportTooLarge: the file would pass ``JOBRESULTS_EXPORT_MAX_BYTES``; it was discarded.
        """
        if self.store.kind == "local":
            self._remove_stale_temp_files(export.export_id)
        params = export.parameters
        filters = filter_of(params)
        chunk_rows, chunk_bytes = self.settings.export_chunk_rows, self.settings.export_chunk_bytes
        file: ExportWriter | None = None
        spool: CsvSpool | None = None
        rows_written = 0
        conn: Connection = await self.db.acquire()
        try:
            async with conn.cursor() as cur:
                await cur.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT")
            stream = JobResultStream(conn)
            now = utcnow()  # one clock for both passes: a result expiring in between is in neither or both
            columns: list[str] | None = None
            # Chosen columns were checked when the export was requested; parsed again here.
            chosen = parse_columns(params.columns) if params.columns is not None else None
            renew_at = asyncio.get_running_loop().time() + self._renew_every
            if export.format == "csv" and chosen is None:
                # Pass 1: the union of the result columns, for the header row; the rows are kept in
                # a spool file, so the database is read once. Chosen columns are the header already.
                spool = CsvSpool(
                    CsvFlattener(self.settings.csv_max_columns),
                    str(self.directory) if self.store.kind == "local" else None,
                )
                chunks = stream.chunks(
                    params.created_from, params.created_to, None, chunk_rows, chunk_bytes, filters, now=now
                )
                async with contextlib.aclosing(_in_threads(chunks, spool.add)) as added:
                    async for _ in added:
                        renew_at = await self._renew_if_due(export, 0, renew_at)
                await asyncio.to_thread(spool.rewind)
                columns = spool.flattener.columns()
            writer = make_writer(
                export.format,
                single=False,
                csv_columns=columns,
                columns=chosen,
            )
            file = await self.store.open_writer(
                export.export_id, max(export.attempts, 1), writer.extension, export.compression, self.owner
            )
            await file.write(writer.begin())
            if spool is not None:
                assert isinstance(writer, CsvWriter)
                positions = spool.flattener.positions()
                while (encoded := await asyncio.to_thread(_encode_spooled, writer, spool, positions)) is not None:
                    rows_written = await self._written(export, file, encoded, rows_written, progress)
                    renew_at = await self._renew_if_due(export, rows_written, renew_at)
            else:
                chunks = stream.chunks(
                    params.created_from, params.created_to, None, chunk_rows, chunk_bytes, filters, now=now
                )
                async with contextlib.aclosing(_in_threads(chunks, partial(_encode_chunk, writer))) as encoded_chunks:
                    async for encoded in encoded_chunks:
                        rows_written = await self._written(export, file, encoded, rows_written, progress)
                        renew_at = await self._renew_if_due(export, rows_written, renew_at)
            await file.write(writer.end())
            await conn.commit()
        except BaseException:
            conn.close()  # a half-read server-side cursor leaves the connection unusable
            if file is not None:
                await file.discard()
            raise
        finally:
            self.db.release(conn)
            if spool is not None:
                spool.close()
        size = await self._finish(export, file, writer.extension, rows_written)
        return rows_written, size

    async def _written(
        self,
        export: Export,
        file: ExportWriter,
        encoded: tuple[int, bytes],
        rows_written: int,
        progress: Callable[[int], None] | None,
    ) -> int:
        """Write one encoded chunk and check the size limit; returns the rows written so far."""
        count, data = encoded
        await file.write(data)
        _check_size(file, self.settings.export_max_bytes)
        rows_written += count
        if progress is not None:
            progress(rows_written)
        return rows_written

    async def _renew_if_due(self, export: Export, rows_written: int, renew_at: float) -> float:
        now = asyncio.get_running_loop().time()
        if now < renew_at:
            return renew_at
        renewed = await self.db.run(
            lambda conn: ExportRepository(conn).renew(export, self.owner, self.lease, rows_written), transaction=False
        )
        if not renewed:
            current = await self.db.run(lambda conn: ExportRepository(conn).get(export.export_id), transaction=False)
            if current.state in ("cancelled", "deleted"):
                raise ExportCancelled(export.export_id)
            raise LeaseLost(export.export_id)
        return now + self._renew_every

    def _object_key(self, file: ExportWriter) -> str | None:
        return None if self.store.kind == "local" else file.key

    async def _finish(self, export: Export, file: ExportWriter, extension: str, rows_written: int) -> int:
        """Complete the file (rename or upload) and mark the export succeeded, under the export's row lock.

        The file's key is recorded by the same conditional UPDATE (state, lease owner and attempt in its
        ``WHERE``) that marks the export succeeded: if it changes no row, the lease was lost.
        """
        committed: list[tuple[int, str]] = []

        async def unit(conn: Connection) -> None:
            repo = ExportRepository(conn)
            if not await repo.lock_owned(export, self.owner):
                if (await repo.get(export.export_id)).state in ("cancelled", "deleted"):
                    raise ExportCancelled(export.export_id)  # the cancel won the race: nothing is renamed
                raise LeaseLost(export.export_id)
            committed.append(await file.commit())
            size, sha256 = committed[0]
            if size > self.settings.export_max_bytes:
                raise ExportTooLarge(self.settings.export_max_bytes)
            recorded = await repo.succeed(
                export,
                self.owner,
                rows_written=rows_written,
                size=size,
                sha256=sha256,
                file_name=download_name(export.export_id, extension, export.compression),
                object_key=self._object_key(file),
                retention=self.retention,
            )
            if not recorded:
                raise LeaseLost(export.export_id)

        unit_and_event = emitting(
            unit,
            lambda _: export_event(
                export, state="succeeded", rows_written=rows_written, size=committed[0][0], sha256=committed[0][1]
            ),
        )
        try:
            await self.db.run(unit_and_event, retry=False)
        except BaseException as exc:
            if isinstance(exc, (CommitOutcomeUnknown, asyncio.CancelledError)) and committed:
                pass  # the export may be recorded succeeded: keep its file (a requeued run replaces it)
            else:
                with contextlib.suppress(StoreError):
                    if committed:
                        await file.remove()
                    else:
                        await file.discard()
            raise
        self._announce(export.export_id)
        return committed[0][0]

    # --- deletion and cancellation ------------------------------------------------------------

    async def delete_export(self, export_id: str, visible_to: str | None, *, cancel_only: bool = False) -> Export:
        """``DELETE /v1/exports/{id}``: cancel a queued or running export, delete a finished one.

        In one unit under the export's row lock: queued/running -> ``cancelled`` (a worker running it
        stops at its next lease renewal, within about a second, and leaves no file; the conditional
        ``UPDATE`` that would mark it succeeded changes no row); succeeded (expired too) or failed ->
        ``deleted``; cancelled or deleted stay as they are (idempotent). The file of a deleted export is
        removed after the COMMIT; if that fails or the process dies first, the purge removes it.
        With ``cancel_only`` (``POST .../cancel``) a succeeded, failed or deleted export is refused.
        ``visible_to``: with visibility ``own``, the only requester whose exports may be touched.

        Returns the record as committed.

        Raises:
            ExportNotFound: no such export, or another requester's (visibility ``own``).
            ExportNotCancellable: ``cancel_only`` and the export already finished; ``str()`` names its state.
            DatabaseUnavailable: retries ran out.
        """
        changes: list[str] = []

        async def unit(conn: Connection) -> Export:
            changes.clear()
            repo = ExportRepository(conn)
            export = await repo.lock(export_id)
            if visible_to is not None and export.requested_by != visible_to:
                raise ExportNotFound(export_id)
            if export.state in PENDING_STATES:
                await repo.cancel(export, retention=self.retention)
                changes.append("cancelled")
            elif cancel_only:
                if export.state != "cancelled":
                    raise ExportNotCancellable(export.visible_state(utcnow()))
            elif export.state in FINISHED_STATES:
                await repo.mark_deleted(export, retention=self.retention)
                changes.append("deleted")
                return export
            return await repo.get(export_id) if changes else export

        before = await self.db.run(unit)
        if changes:
            self._announce(export_id)  # long-polling waiters: it left queued/running (or is gone)
        if changes == ["cancelled"]:
            EXPORTS.labels(before.kind, before.format, "cancelled").inc()
            log.info("export.cancel_requested", export_id=export_id)
            return before
        if changes == ["deleted"]:
            EXPORT_DELETIONS.labels(before.kind, "request").inc()
            log.info("export.deleted", export_id=export_id)
            await self.remove_deleted_files([before])
            return await self.db.run(lambda conn: ExportRepository(conn).get(export_id), transaction=False)
        return before

    async def job_exports_deleted(self, exports: Sequence[Export]) -> None:
        """After a job's DELETE committed: count its cascaded exports and remove their files."""
        for export in exports:
            EXPORT_DELETIONS.labels(export.kind, "job_deleted").inc()
        log.info("export.deleted_with_job", count=len(exports))
        await self.remove_deleted_files(exports)

    async def remove_deleted_files(self, exports: Sequence[Export]) -> None:
        """Remove the files of exports just marked ``deleted`` (after their COMMIT) and record it.

        A failure is logged and left to the purge (the record's ``purge_at`` is still due).
        """
        for export in exports:
            try:
                if export.stored_key:
                    await self.store.remove(export.stored_key)
                await self._record_file_removed(export)
            except (StoreError, DatabaseUnavailable, CommitOutcomeUnknown) as exc:
                log.warning("export.file_removal_deferred", export_id=export.export_id, error=type(exc).__name__)

    async def _record_file_removed(self, export: Export) -> None:
        await self.db.run(lambda conn: ExportRepository(conn).file_removed(export), transaction=False)

    def _announce(self, export_id: str) -> None:
        """Tell the long-poll registry (after the COMMIT) that the export is settled."""
        if self.on_settled is not None:
            try:
                self.on_settled(export_id)
            except Exception:  # noqa: BLE001 - waiters also learn it from their poll
                log.warning("export.announce_failed", export_id=export_id)

    # --- housekeeping and the worker loop -----------------------------------------------------

    def _remove_stale_temp_files(self, export_id: str) -> None:
        for path, temp_export_id, owner, _age in temp_files(self.directory):
            if temp_export_id == export_id and owner != self.owner:
                path.unlink(missing_ok=True)

    async def remove_crash_leftovers(self) -> int:
        """Remove what crashed or superseded attempts left in the store; returns how many were removed.

        ``local``: a temporary file is kept only while its export is running under a live lease of the
        owner named in the file, or (single-job exports, recorded only at COMMIT) while it is younger
        than the query timeout plus a minute. ``s3``: see :meth:`remove_lost_objects`.
        """
        if self.store.kind != "local":
            return await self.remove_lost_objects()
        temps = await asyncio.to_thread(temp_files, self.directory)
        if not temps:
            return 0
        holders = await self.db.run(
            lambda conn: ExportRepository(conn).lease_holders(sorted({t[1] for t in temps})), transaction=False
        )
        now = utcnow()
        removed = 0
        for path, export_id, owner, age in temps:
            holder = holders.get(export_id)
            if holder is None:
                stale = age > self.settings.query_timeout_s + 60
            else:
                state, lease_owner, lease_until = holder
                stale = not (state == "running" and lease_owner == owner and lease_until and lease_until > now)
            if stale:
                path.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.info("export.temp_files_removed", count=removed)
        return removed

    async def remove_lost_objects(self) -> int:
        """Delete the objects of attempts that lost (``s3``); returns how many were deleted.

        An object is kept while it is the one its export recorded, or belongs to the attempt now running,
        or (single-job exports, recorded only at COMMIT) has no export row yet and is younger than the
        query timeout plus a minute. Multipart uploads that fail in this process are aborted by the
        uploader; those of a killed process are left to the bucket's ``AbortIncompleteMultipartUpload``
        lifecycle rule (obstore cannot list them).
        """
        objects = await self.store.list_attempts()
        if not objects:
            return 0
        states = await self.db.run(
            lambda conn: ExportRepository(conn).attempt_states(sorted({o.export_id for o in objects})),
            transaction=False,
        )
        now = datetime.now(UTC)
        grace = timedelta(seconds=self.settings.query_timeout_s + 60)
        removed = 0
        for obj in objects:
            known = states.get(obj.export_id)
            if known is None:
                stale = now - obj.modified > grace
            else:
                state, attempts, object_key = known
                if state == "succeeded":
                    stale = obj.key != object_key
                elif state == "running":
                    stale = obj.attempt < attempts
                else:  # failed, or queued again: no attempt of it is in flight
                    stale = True
            if stale:
                await self.store.remove(obj.key)
                removed += 1
        if removed:
            log.info("export.lost_objects_removed", count=removed)
        return removed

    def start(self) -> None:
        """Start the background worker loop (idempotent)."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="export-worker")

    async def stop(self) -> None:
        """Stop the worker; a running export is handed back to the queue."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _sweep(self) -> None:
        try:
            await self.remove_crash_leftovers()
        except Exception as exc:  # noqa: BLE001 - logged; the loop tries again later
            log.warning("export.cleanup_failed", error=type(exc).__name__)

    async def _loop(self) -> None:
        await self._sweep()
        loop = asyncio.get_running_loop()
        sweep_at = loop.time() + STORE_SWEEP_EVERY_S
        failures = 0
        while True:
            if loop.time() >= sweep_at:
                await self._sweep()
                sweep_at = loop.time() + STORE_SWEEP_EVERY_S
            try:
                ran = await self.run_next()
                failures = 0
            except DatabaseUnavailable as exc:
                # Expected while the database is down or not migrated: one line, growing pauses.
                failures += 1
                if failures == 1:
                    log.warning("export.worker_waiting_for_database", error=str(exc))
                ran = False
            except Exception:
                failures += 1
                log.exception("export.worker_error")
                ran = False
            if not ran:
                pause = min(self.settings.export_poll_s * 2 ** min(failures, 5), 30.0)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), pause)
