"""The aiomysql pool and the unit of work: one connection, one transaction, retried as a whole.

Every connection goes back to the pool clean: committed or rolled back, and closed (never reused)
when a query was cancelled, timed out or lost its server mid-flight.

A COMMIT whose answer is lost (the connection dies while it is in flight) may or may not have
committed. Such a unit is never re-run blind: each write transaction also inserts a random commit
token (table ``commit_tokens``), and before any retry the unit looks its token up on another
connection. If it is there, the unit's result from the attempt that committed is returned; if it is
not, the unit runs again; if that cannot be found out, :class:`CommitOutcomeUnknown` is raised (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeAlias, TypeVar, cast

import aiomysql
import pymysql
import pymysql.constants
import pymysql.converters
import stamina
import stamina.instrumentation
import structlog

from config.settings import Settings
from observability.metrics import (
    DB_POOL_IN_USE,
    DB_POOL_MAX,
    DB_POOL_SIZE,
    DB_POOL_WAITERS,
    DB_RETRIES,
    DB_UNIT_DURATION,
)
from observability.retries import RETRYING_UNIT, log_retry

T = TypeVar("T")
log = structlog.get_logger("jobresults.db")
Connection: TypeAlias = Any
"""An ``aiomysql.Connection`` (aiomysql ships no type hints)."""

ER_LOCK_WAIT_TIMEOUT = 1205
"""MySQL error 1205: lock wait timeout exceeded; the statement (not the transaction) failed."""
ER_LOCK_DEADLOCK = 1213
"""MySQL error 1213: deadlock found; InnoDB rolled the transaction back."""
CR_SERVER_GONE_ERROR = 2006
"""Client error 2006: MySQL server has gone away."""
CR_SERVER_LOST = 2013
"""Client error 2013: lost connection to MySQL server during query."""
ER_DUP_ENTRY = 1062
"""MySQL error 1062: duplicate entry for a unique key."""
ER_NET_PACKET_TOO_LARGE = 1153
"""MySQL error 1153: a statement is larger than the server's ``max_allowed_packet``."""
ER_NO_SUCH_TABLE = 1146
"""MySQL error 1146: table doesn't exist (here: the schema was not migrated)."""
ER_TRANSACTION_ROLLBACK_DURING_COMMIT = 3101
"""MySQL error 3101: Group Replication (InnoDB Cluster) rolled the transaction back at COMMIT
because it conflicted with one certified first on another member; like a deadlock, the whole
transaction can run again. (Galera reports its certification failures as 1213.)"""

TRANSIENT_ERRORS = frozenset(
    {
        ER_LOCK_WAIT_TIMEOUT,
        ER_LOCK_DEADLOCK,
        ER_TRANSACTION_ROLLBACK_DURING_COMMIT,
        CR_SERVER_GONE_ERROR,
        CR_SERVER_LOST,
    }
)
"""Error codes after which the whole transaction is retried from BEGIN; nothing else is retried."""
_CONNECTION_LOST = frozenset({CR_SERVER_GONE_ERROR, CR_SERVER_LOST})

RETRY_ATTEMPTS = 3
RETRY_TIMEOUT_S = 2.0

_BEGIN = ("START TRANSACTION",)
_SNAPSHOT = ("START TRANSACTION WITH CONSISTENT SNAPSHOT",)
_BEGIN_READ_COMMITTED = ("SET TRANSACTION ISOLATION LEVEL READ COMMITTED", "START TRANSACTION")
"""For the commit-token lookup: a locking read under READ COMMITTED takes no gap lock, so it holds up
no concurrent writer while it waits for the lost transaction to end."""

SQL_RECORD_COMMIT = "INSERT INTO commit_tokens (token) VALUES (UNHEX(%(token)s))"
SQL_FIND_COMMIT = "SELECT 1 FROM commit_tokens WHERE token = UNHEX(%(token)s) FOR UPDATE"
SQL_PRUNE_COMMITS = "DELETE FROM commit_tokens WHERE token < UNHEX(%(before)s) ORDER BY token LIMIT %(limit)s"
COMMIT_TOKEN_RETENTION_S = 600.0
"""Tokens are looked up within one unit's retry budget (seconds); older ones are deleted."""
COMMIT_TOKEN_PRUNE_EVERY_S = 60.0
"""At most one prune per process this often, started after a write unit."""
COMMIT_TOKEN_PRUNE_BATCH = 5000
_LOST_COMMIT = "the connection was lost while a COMMIT was in flight, and whether it committed is unknown"

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "sql" / "migrations"


def error_code(exc: BaseException) -> int | None:
    """The MySQL error number of a PyMySQL error (``exc.args[0]``), or None for anything else."""
    if isinstance(exc, pymysql.MySQLError) and exc.args and isinstance(exc.args[0], int):
        return exc.args[0]
    return None


def is_transient(exc: Exception) -> bool:
    """True for the errors a retry can cure (see :data:`TRANSIENT_ERRORS`).

    Deadlock or Galera certification failure 1213, lock wait 1205, Group Replication rollback at
    COMMIT 3101, lost connection 2006/2013.
    """
    # Each scheduled retry is logged as ``db.retry_scheduled`` (observability.retries).
    return error_code(exc) in TRANSIENT_ERRORS


def _count_retry(details: stamina.instrumentation.RetryDetails) -> None:
    DB_RETRIES.labels(str(error_code(details.caused_by))).inc()


# stamina_retries_total per retry, our log line (unit, attempt, error code; stamina's own logs object
# reprs) and our counter.
stamina.instrumentation.set_on_retry_hooks(
    [
        log_retry,
        stamina.instrumentation.PrometheusOnRetryHook,
        _count_retry,
    ]
)


class DatabaseUnavailable(Exception):
    """The database could not be reached, or a transient error outlived its retries (maps to 503)."""


class SchemaNotMigrated(DatabaseUnavailable):
    """A table is missing: ``jobresults migrate`` has not been run against this database (503)."""


class TooLargeForDatabase(Exception):
    """The statement exceeds the server's ``max_allowed_packet`` (MySQL error 1153); maps to 413."""


class QueryTimeout(DatabaseUnavailable):
    """A unit of work took longer than ``query_timeout_s`` (waiting for a connection included)."""


class CommitOutcomeUnknown(DatabaseUnavailable):
    """A COMMIT was in flight when its connection was lost, and whether it landed could not be found out.

    The unit's changes may or may not be stored; it was not run again (maps to 503).
    """


def commit_token(now_s: float | None = None) -> str:
    """A new commit token, in hex: 8 bytes of microseconds since the epoch (big-endian), 8 random bytes.

    Sent as hex and stored with ``UNHEX`` (aiomysql cannot send ``bytes`` parameters with PyMySQL 1.1).
    """
    micros = int((time.time() if now_s is None else now_s) * 1_000_000)
    return micros.to_bytes(8, "big").hex() + secrets.token_hex(8)


def _rolled_back(exc: BaseException) -> bool:
    """True if a COMMIT that failed with ``exc`` is known to have been rolled back.

    Only a deadlock (1213, also Galera's certification conflict) says so. After anything else (a lost
    connection 2006/2013, a killed session, a timeout, a cancellation) the COMMIT may have landed.
    """
    return error_code(exc) == ER_LOCK_DEADLOCK


class _Doubts:
    """A retried unit's attempt whose COMMIT answer was lost, until its token is looked up."""

    __slots__ = ("previous",)

    def __init__(self) -> None:
        self.previous: _Attempt | None = None


class _Attempt:
    """One run of a unit: its commit token, its result once ``work`` returned, and whether its COMMIT is in doubt."""

    __slots__ = ("in_doubt", "result", "token")

    def __init__(self, token: str | None) -> None:
        self.token = token
        self.result: Any = None
        self.in_doubt = False


def _convert_datetime(text: str | bytes) -> datetime | str | bytes:
    """A ``DATETIME`` column value to ``datetime``: ``fromisoformat`` (C) first, PyMySQL's parser otherwise.

    ``YYYY-MM-DD HH:MM:SS[.ffffff]`` is what both servers send; ``fromisoformat`` (C) reads it faster
    than PyMySQL's regex (an export record holds up to four ``DATETIME`` columns).
    """
    try:
        return datetime.fromisoformat(text if isinstance(text, str) else text.decode("ascii"))
    except ValueError:
        parsed: datetime | str | bytes = pymysql.converters.convert_datetime(text)  # zero dates, as PyMySQL reads them
        return parsed


class SQLText:
    """A query parameter holding a (large) string, escaped with :func:`escape_text`: e.g. a JSON document.

    Not a ``str`` subclass on purpose: aiomysql escapes every ``str`` itself, and hands other types to
    PyMySQL's encoder registry, where this type is registered below.
    """

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def escape_text(value: str) -> str:
    """``value`` as a quoted MySQL string literal, escaped exactly as PyMySQL's ``escape_string`` does.

    PyMySQL runs ``str.translate`` with a table of seven characters; seven chained ``str.replace``
    calls (backslash first) produce the same text several times faster. The escapes are MySQL's
    backslash escapes of NUL, LF, CR, Ctrl-Z, both quotes and the backslash itself (MySQL manual,
    "String Literals", table 11.1); like PyMySQL's, they assume ``NO_BACKSLASH_ESCAPES`` is off,
    MySQL's and MariaDB's default.
    """
    escaped = (
        value.replace("\\", "\\\\")
        .replace("\0", "\\0")
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\x1a", "\\Z")
        .replace("'", "\\'")
        .replace('"', '\\"')
    )
    return f"'{escaped}'"


def _escape_sql_text(value: SQLText, mapping: object = None) -> str:
    return escape_text(value.text)


# aiomysql ignores the connection's ``conv`` for encoding and uses PyMySQL's module-level registry.
pymysql.converters.encoders[SQLText] = _escape_sql_text

CONVERSIONS = {**pymysql.converters.conversions, pymysql.constants.FIELD_TYPE.DATETIME: _convert_datetime}
"""PyMySQL's type conversions with the faster ``DATETIME`` reader."""


class Database:
    """An aiomysql pool plus helpers that run units of work on it.

    Build one per process with :meth:`open` and close it with :meth:`close`.
    """

    def __init__(self, pool: aiomysql.Pool, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings
        self._wakeups: set[asyncio.Task[None]] = set()
        self._prunes: set[asyncio.Task[None]] = set()
        self._prune_at = 0.0
        DB_POOL_MAX.set(pool.maxsize)

    @classmethod
    async def open(cls, settings: Settings) -> Database:
        """Create the pool: utf8mb4, session time zone UTC, autocommit on, recycled connections.

        Each session waits at most ``lock_wait_timeout_s`` for a row lock (``innodb_lock_wait_timeout``,
        a session variable on both engines), so a write behind a lock held elsewhere fails with 1205,
        which is retried within the retry budget and then answered 503, well inside the query timeout.

        Raises:
            pymysql.err.OperationalError: the server cannot be reached (e.g. error 2003).
        """
        url = settings.database
        pool = await aiomysql.create_pool(
            minsize=settings.pool_min_size,
            maxsize=settings.pool_max_size,
            pool_recycle=settings.pool_recycle_s,
            host=url.host,
            port=url.port,
            user=url.user,
            password=url.password,
            db=url.database,
            charset="utf8mb4",
            autocommit=True,
            connect_timeout=settings.connect_timeout_s,
            init_command=f"SET time_zone = '+00:00', innodb_lock_wait_timeout = {int(settings.lock_wait_timeout_s)}",
            conv=CONVERSIONS,
        )
        return cls(pool, settings)

    async def close(self) -> None:
        """Close every pooled connection and wait until they are gone."""
        for task in list(self._prunes):
            task.cancel()
        await asyncio.gather(*self._prunes, return_exceptions=True)
        self.pool.close()
        await self.pool.wait_closed()

    async def run(
        self,
        work: Callable[[Connection], Awaitable[T]],
        *,
        transaction: bool = True,
        snapshot: bool = False,
        retry: bool = True,
        verify_commit: bool = True,
    ) -> T:
        """Run ``work(conn)`` on a pooled connection, inside one transaction unless told otherwise.

        With ``snapshot`` the transaction starts with ``START TRANSACTION WITH CONSISTENT SNAPSHOT``,
        so every read in it sees the same snapshot (REPEATABLE READ, the InnoDB default on both
        engines). With ``retry=False`` a transient error is not retried.

        The unit is retried from BEGIN on transient errors (see :data:`TRANSIENT_ERRORS`): at most
        3 attempts within 2 s, with exponential backoff and jitter (stamina).

        A lost COMMIT (the connection failed, timed out or was cancelled while COMMIT was in flight)
        is never re-run blind. With ``verify_commit`` (the default) the transaction also inserts a
        commit token; the token is then looked up on another connection, with a locking read that waits
        for the lost transaction to end: found, and ``work``'s result from that attempt is returned;
        not found, and the unit is retried like any transient error. Without ``verify_commit`` (for
        units that need no answer, e.g. a poll) a lost COMMIT raises :class:`CommitOutcomeUnknown`.
        With ``transaction=False`` there is no COMMIT: each statement commits on its own, and a unit
        that loses its connection is re-run, so such units must be reads or idempotent writes.

        Raises:
            CommitOutcomeUnknown: a COMMIT's answer was lost and whether it landed could not be found out.
            QueryTimeout: the unit took longer than ``query_timeout_s``; its connection was closed.
            SchemaNotMigrated: a table is missing (error 1146).
            TooLargeForDatabase: a statement exceeded ``max_allowed_packet`` (error 1153).
            DatabaseUnavailable: the server is unreachable or the retries ran out.
            Exception: whatever ``work`` raises, after the transaction was rolled back.
        """
        begin = _SNAPSHOT if snapshot else (_BEGIN if transaction else None)
        verify = verify_commit and begin is not None
        started = time.perf_counter()
        outcome = "error"
        try:
            if retry:
                result = await self._run_with_retries(work, begin, verify)
            else:
                result = await self._run_verified(work, begin, verify)
            outcome = "ok"
            if verify:
                self._maybe_prune()
            return result
        except TimeoutError as exc:
            raise QueryTimeout(f"unit of work exceeded {self.settings.query_timeout_s} s") from exc
        except pymysql.err.ProgrammingError as exc:
            if error_code(exc) == ER_NO_SUCH_TABLE:
                raise SchemaNotMigrated("the database schema is not migrated; run `jobresults migrate`") from exc
            raise
        except pymysql.err.OperationalError as exc:
            code = error_code(exc)
            if code == ER_NET_PACKET_TOO_LARGE:
                raise TooLargeForDatabase("statement larger than the server's max_allowed_packet") from exc
            if code in TRANSIENT_ERRORS or code == 2003 or code == 1040:
                raise DatabaseUnavailable(f"database unavailable (error {code})") from exc
            raise
        finally:
            DB_UNIT_DURATION.labels("transaction" if begin else "read", outcome).observe(time.perf_counter() - started)

    async def _run_with_retries(
        self, work: Callable[[Connection], Awaitable[T]], begin: tuple[str, ...] | None, verify: bool
    ) -> T:
        """Attempts of ``work`` under stamina; after a lost COMMIT, first find out whether it landed.

        The first attempt runs before stamina is entered, which saves building its retry state on
        every unit that succeeds at once (nearly all). If it fails with a transient error, that
        error is raised again inside ``stamina.retry_context`` as its first attempt, so stamina
        counts it, runs the retry hooks (log line, metric) and waits exactly as if it had run there;
        its 2 s budget starts from that first failure.
        """
        doubts = _Doubts()
        named = RETRYING_UNIT.set(work)  # the retry log line names the unit
        try:
            try:
                return await self._attempt(work, begin, verify, doubts)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                first: Exception | None = exc
            async for retrying in stamina.retry_context(
                on=is_transient, attempts=RETRY_ATTEMPTS, timeout=RETRY_TIMEOUT_S, wait_initial=0.05
            ):
                with retrying:
                    if first is not None:
                        failure, first = first, None
                        raise failure
                    return await self._attempt(work, begin, verify, doubts)
        except Exception as exc:
            if doubts.previous is not None:  # retries ran out, or the lookup failed for good
                raise CommitOutcomeUnknown(_LOST_COMMIT) from exc
            raise
        finally:
            RETRYING_UNIT.reset(named)
        raise AssertionError("stamina.retry_context ended without an outcome")  # pragma: no cover

    async def _attempt(
        self, work: Callable[[Connection], Awaitable[T]], begin: tuple[str, ...] | None, verify: bool, doubts: _Doubts
    ) -> T:
        """One attempt of a retried unit; ``doubts.previous`` carries an attempt whose COMMIT was lost.

        Raises:
            Exception: a transient error (the caller retries; a lost COMMIT is looked up first on the
                next attempt), or any other error of ``work`` (final), or ``CommitOutcomeUnknown``.
        """
        if doubts.previous is not None:
            if await self._landed(doubts.previous):
                return cast(T, doubts.previous.result)
            doubts.previous = None
        attempt = _Attempt(commit_token() if verify else None)
        try:
            return await self._run_once(work, begin, attempt)
        except Exception as exc:
            if not attempt.in_doubt:
                raise
            if not verify or isinstance(exc, TimeoutError):
                raise CommitOutcomeUnknown(_LOST_COMMIT) from exc
            doubts.previous = attempt
            if is_transient(exc):
                raise  # the next attempt looks the token up first
            failure = exc
        # Not transient, so no next attempt: look the token up now.
        if await self._landed(attempt):
            return cast(T, attempt.result)
        doubts.previous = None
        raise failure  # it did not commit: the error stands

    async def _run_verified(
        self, work: Callable[[Connection], Awaitable[T]], begin: tuple[str, ...] | None, verify: bool
    ) -> T:
        """One attempt of ``work``; after a lost COMMIT, find out (once) whether it landed."""
        attempt = _Attempt(commit_token() if verify else None)
        try:
            return await self._run_once(work, begin, attempt)
        except Exception as exc:
            if not attempt.in_doubt:
                raise
            landed: bool | None = None
            if verify and not isinstance(exc, TimeoutError):
                with contextlib.suppress(Exception):
                    landed = await self._landed(attempt)
            if landed:
                return cast(T, attempt.result)
            if landed is False:
                raise  # it did not commit: the error stands
            raise CommitOutcomeUnknown(_LOST_COMMIT) from exc

    async def _landed(self, attempt: _Attempt) -> bool:
        """Whether ``attempt``'s transaction committed: its token is stored (waits for it to end).

        Raises:
            pymysql.MySQLError: the lookup failed (transient ones are retried by the caller).
        """

        async def find(conn: Connection) -> bool:
            async with conn.cursor() as cur:
                await cur.execute(SQL_FIND_COMMIT, {"token": attempt.token})
                return await cur.fetchone() is not None

        landed = await self._run_once(find, _BEGIN_READ_COMMITTED, _Attempt(None))
        log.warning("db.commit_in_doubt", landed=landed)
        return landed

    async def _run_once(
        self, work: Callable[[Connection], Awaitable[T]], begin: tuple[str, ...] | None, attempt: _Attempt
    ) -> T:
        async with asyncio.timeout(self.settings.query_timeout_s):
            conn: Connection = await self.acquire()
            committing = False
            try:
                if begin is not None:
                    async with conn.cursor() as cur:
                        for statement in begin:
                            await cur.execute(statement)
                result = await work(conn)
                if begin is not None:
                    if attempt.token is not None:
                        async with conn.cursor() as cur:
                            await cur.execute(SQL_RECORD_COMMIT, {"token": attempt.token})
                    attempt.result = result
                    committing = True
                    await conn.commit()
                return result
            except BaseException as exc:
                attempt.in_doubt = committing and not _rolled_back(exc)
                await _discard_or_rollback(conn, exc)
                raise
            finally:
                self.release(conn)

    def _maybe_prune(self) -> None:
        """Start a background prune of old commit tokens, at most every :data:`COMMIT_TOKEN_PRUNE_EVERY_S`."""
        now = time.monotonic()
        if now < self._prune_at:
            return
        self._prune_at = now + COMMIT_TOKEN_PRUNE_EVERY_S
        task = asyncio.get_running_loop().create_task(self._prune_quietly())
        self._prunes.add(task)
        task.add_done_callback(self._prunes.discard)

    async def _prune_quietly(self) -> None:
        try:
            await self.prune_commit_tokens()
        except Exception as exc:  # noqa: BLE001 - the next prune catches up; the tokens only take space
            log.info("db.commit_tokens_prune_failed", error=type(exc).__name__, code=error_code(exc))

    async def prune_commit_tokens(self, older_than_s: float = COMMIT_TOKEN_RETENTION_S) -> int:
        """Delete commit tokens older than ``older_than_s`` seconds; returns how many were deleted.

        Deletes in batches of :data:`COMMIT_TOKEN_PRUNE_BATCH` rows, each batch its own transaction.

        Raises:
            DatabaseUnavailable: the database could not be reached.
        """
        before = commit_token(time.time() - older_than_s)[:16] + "0" * 16
        deleted = 0

        async def prune(conn: Connection) -> int:
            async with conn.cursor() as cur:
                return int(await cur.execute(SQL_PRUNE_COMMITS, {"before": before, "limit": COMMIT_TOKEN_PRUNE_BATCH}))

        while True:
            batch = await self.run(prune, transaction=False, retry=False)
            deleted += batch
            if batch < COMMIT_TOKEN_PRUNE_BATCH:
                return deleted

    async def acquire(self) -> Connection:
        """A connection from the pool (wait for one if all are in use); give it back with :meth:`release`."""
        pool = self.pool
        if not pool.freesize:  # may wait: publish the figures now (the last release published them otherwise)
            self._observe_pool()
        try:
            return await pool.acquire()
        finally:
            self._observe_pool()

    def _observe_pool(self) -> None:
        """Publish this process's pool figures (summed over workers by the ``livesum`` gauges)."""
        pool = self.pool
        DB_POOL_SIZE.set(pool.size)
        DB_POOL_IN_USE.set(pool.size - pool.freesize)
        DB_POOL_WAITERS.set(len(getattr(pool._cond, "_waiters", None) or ()))

    def release(self, conn: Connection) -> None:
        """Give ``conn`` back to the pool, waking a task that waits for a connection.

        aiomysql's ``Pool.release`` only notifies waiters when the connection comes back open; a
        closed one frees a slot too, so without this a waiter on a full pool would hang forever.
        """
        self.pool.release(conn)
        self._observe_pool()
        if conn.closed:
            task = asyncio.get_running_loop().create_task(self.pool._wakeup())
            self._wakeups.add(task)
            task.add_done_callback(self._wakeups.discard)


async def _discard_or_rollback(conn: Connection, exc: BaseException) -> None:
    """Leave ``conn`` clean: roll back after a server-side error, close it after anything else.

    A connection whose query was cancelled or timed out may still have a result in flight, so it
    is closed rather than reused; so is one that lost its server (2006/2013).
    """
    if isinstance(exc, pymysql.MySQLError) and error_code(exc) not in _CONNECTION_LOST:
        with contextlib.suppress(Exception):  # a failed rollback leaves the connection unusable
            await asyncio.shield(conn.rollback())
            return
    conn.close()


async def fetch_applied_migrations(conn: Connection) -> set[str]:
    """Ids of the migrations yoyo has applied (table ``_yoyo_migration``); empty if none."""
    async with conn.cursor() as cur:
        try:
            await cur.execute("SELECT migration_id FROM _yoyo_migration")
        except pymysql.err.ProgrammingError:
            return set()
        rows: list[tuple[Any, ...]] = await cur.fetchall()
    return {row[0] for row in rows}


def expected_migrations() -> set[str]:
    """Ids of the migrations shipped with this build (``sql/migrations/*.sql``, rollbacks excluded)."""
    return {
        path.name.removesuffix(".sql")
        for path in MIGRATIONS_DIR.glob("*.sql")
        if not path.name.endswith(".rollback.sql")
    }
