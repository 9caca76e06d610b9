"""The unit of work's database discipline, against a real MySQL or MariaDB server.

Every pooled connection goes back clean (committed or rolled back), a connection whose query was
cancelled, timed out or lost is closed and never reused, sessions are utf8mb4 and UTC, and only
transient errors (1213, 1205, 2006, 2013) are retried, from BEGIN, at most 3 times, then 503.

``tests/conftest.py`` puts stamina in testing mode (3 attempts, no waits) for the whole session.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pymysql
import pytest
from litestar.testing import AsyncTestClient

from config.settings import Settings
from repositories.database import (
    CR_SERVER_GONE_ERROR,
    CR_SERVER_LOST,
    ER_DUP_ENTRY,
    ER_LOCK_DEADLOCK,
    ER_LOCK_WAIT_TIMEOUT,
    Connection,
    Database,
    DatabaseUnavailable,
    QueryTimeout,
    SQLText,
    error_code,
)
from service.app import create_app
from tests.support.database import connect

EVENT_TIMEOUT_S = 10.0
"""Upper bound for any wait on a peer unit, so a broken test fails instead of hanging."""


async def _query(conn: Connection, sql: str, args: object = None) -> list[tuple[Any, ...]]:
    async with conn.cursor() as cur:
        await cur.execute(sql, args)
        return list(await cur.fetchall())


async def _connection_id(conn: Connection) -> int:
    ((cid,),) = await _query(conn, "SELECT CONNECTION_ID()")
    return int(cid)


@pytest.fixture
async def scratch_table(db: Database) -> AsyncIterator[str]:
    """A two-row InnoDB table ``t_scratch_<random>`` (ids 1 and 2, v = 0); dropped afterwards."""
    name = f"t_scratch_{uuid.uuid4().hex[:10]}"

    async def create(conn: Connection) -> None:
        await _query(conn, f"CREATE TABLE {name} (id INT PRIMARY KEY, v INT NOT NULL) ENGINE=InnoDB")
        await _query(conn, f"INSERT INTO {name} (id, v) VALUES (1, 0), (2, 0)")

    await db.run(create, transaction=False)
    try:
        yield name
    finally:

        async def drop(conn: Connection) -> None:
            await _query(conn, f"DROP TABLE IF EXISTS {name}")

        await db.run(drop, transaction=False)


@pytest.fixture
async def own_db(settings: Settings) -> AsyncIterator[Database]:
    """A private pool, for tests that change session variables or shrink the pool."""
    database = await Database.open(settings)
    try:
        yield database
    finally:
        await database.close()


async def _rows(db: Database, table: str) -> dict[int, int]:
    rows = await db.run(lambda conn: _query(conn, f"SELECT id, v FROM {table} ORDER BY id"), transaction=False)
    return {int(r[0]): int(r[1]) for r in rows}


def _assert_pool_clean(db: Database) -> None:
    """No free connection is closed or inside a transaction; nothing is left checked out."""
    assert not db.pool._used
    for conn in db.pool._free:
        assert not conn.closed
        assert not conn.get_transaction_status()


# --- session settings ---------------------------------------------------------------------------


async def test_pooled_connection_is_utf8mb4_and_utc(db: Database) -> None:
    rows = await db.run(
        lambda conn: _query(
            conn,
            "SELECT @@session.time_zone, @@character_set_connection, @@character_set_client, "
            "@@character_set_results, @@autocommit",
        ),
        transaction=False,
    )
    time_zone, cs_connection, cs_client, cs_results, autocommit = rows[0]
    assert time_zone == "+00:00"
    assert cs_connection == "utf8mb4"
    assert cs_client == "utf8mb4"
    assert cs_results == "utf8mb4"
    assert autocommit == 1
    # A 4-byte character survives the round trip (it would not on 3-byte utf8).
    ((echo,),) = await db.run(lambda conn: _query(conn, "SELECT %s", ("\U0001f680 ok",)), transaction=False)
    assert echo == "\U0001f680 ok"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "plain",
        "quote ' double \" back \\ slash",
        "nul \x00 lf \n cr \r tab \t ctrl-z \x1a",
        "%s %(name)s %% percent signs",
        "\\' \\\\' '' \\\\\\",
        "\U0001f680 é ü \u2028",
        '{"json": "with \\"escapes\\" and \\\\u0000", "n": [1, 2.5]}',
    ],
)
async def test_sql_text_parameters_round_trip(db: Database, text: str) -> None:
    # SQLText (large documents) is escaped by our own function, not PyMySQL's: the server must read
    # back exactly the text that was sent, specials included.
    ((echo,),) = await db.run(lambda conn: _query(conn, "SELECT %s", (SQLText(text),)), transaction=False)
    assert echo == text


async def test_pool_recycles_before_wait_timeout(db: Database) -> None:
    ((wait_timeout,),) = await db.run(lambda conn: _query(conn, "SELECT @@session.wait_timeout"))
    assert 0 < db.settings.pool_recycle_s < int(wait_timeout)
    assert db.pool._recycle == db.settings.pool_recycle_s


async def test_idle_connection_older_than_recycle_is_reopened(settings: Settings) -> None:
    database = await Database.open(msgspec.structs.replace(settings, pool_recycle_s=1, pool_max_size=1))
    try:
        first = await database.run(_connection_id, transaction=False)
        await asyncio.sleep(1.2)
        second = await database.run(_connection_id, transaction=False)
        assert second != first
        # The reopened session still gets the init command.
        ((tz,),) = await database.run(lambda conn: _query(conn, "SELECT @@session.time_zone"))
        assert tz == "+00:00"
    finally:
        await database.close()


# --- commit / rollback --------------------------------------------------------------------------


async def test_unit_commits_and_returns_its_result(db: Database, scratch_table: str) -> None:
    async def unit(conn: Connection) -> str:
        await _query(conn, f"UPDATE {scratch_table} SET v = 7 WHERE id = 1")
        assert conn.get_transaction_status()  # inside BEGIN ... COMMIT
        return "done"

    assert await db.run(unit) == "done"
    assert await _rows(db, scratch_table) == {1: 7, 2: 0}
    _assert_pool_clean(db)


@pytest.mark.parametrize(
    ("failing_sql", "expected_exc", "expected_code"),
    [
        ("INSERT INTO {t} (id, v) VALUES (1, 99)", pymysql.err.IntegrityError, ER_DUP_ENTRY),
        ("SELEKT nonsense FROM {t}", pymysql.err.ProgrammingError, 1064),
    ],
    ids=["duplicate-key-1062", "syntax-error-1064"],
)
async def test_non_transient_error_is_not_retried_and_rolls_back(
    db: Database,
    scratch_table: str,
    failing_sql: str,
    expected_exc: type[Exception],
    expected_code: int,
) -> None:
    entered = 0
    used: list[Connection] = []

    async def unit(conn: Connection) -> None:
        nonlocal entered
        entered += 1
        used.append(conn)
        await _query(conn, f"UPDATE {scratch_table} SET v = 5 WHERE id = 2")
        await _query(conn, f"INSERT INTO {scratch_table} (id, v) VALUES (3, 3)")
        await _query(conn, failing_sql.format(t=scratch_table))

    with pytest.raises(expected_exc) as info:
        await db.run(unit)
    assert error_code(info.value) == expected_code
    assert entered == 1
    # The writes made before the error were rolled back ...
    assert await _rows(db, scratch_table) == {1: 0, 2: 0}
    # ... and the connection went back to the pool open, outside any transaction.
    (conn,) = used
    assert not conn.closed
    assert conn in db.pool._free
    assert not conn.get_transaction_status()
    _assert_pool_clean(db)


async def test_application_error_rolls_back_and_is_not_retried(db: Database, scratch_table: str) -> None:
    entered = 0

    async def unit(conn: Connection) -> None:
        nonlocal entered
        entered += 1
        await _query(conn, f"UPDATE {scratch_table} SET v = 1 WHERE id = 1")
        raise LookupError("domain failure")

    with pytest.raises(LookupError):
        await db.run(unit)
    assert entered == 1
    assert await _rows(db, scratch_table) == {1: 0, 2: 0}
    _assert_pool_clean(db)


# --- transient errors: retried from BEGIN -------------------------------------------------------


async def test_real_deadlock_is_retried_from_begin(db: Database, scratch_table: str) -> None:
    a_holds_1 = asyncio.Event()
    b_holds_2 = asyncio.Event()
    entered = {"a": 0, "b": 0}
    errors: list[int | None] = []

    def make_unit(
        name: str, first: int, second: int, mine: asyncio.Event, theirs: asyncio.Event
    ) -> Callable[[Connection], Awaitable[str]]:
        async def unit(conn: Connection) -> str:
            entered[name] += 1
            try:
                await _query(conn, f"UPDATE {scratch_table} SET v = v + 1 WHERE id = %s", (first,))
                mine.set()
                await asyncio.wait_for(theirs.wait(), EVENT_TIMEOUT_S)
                await _query(conn, f"UPDATE {scratch_table} SET v = v + 1 WHERE id = %s", (second,))
            except pymysql.MySQLError as exc:
                errors.append(error_code(exc))
                raise
            return name

        return unit

    results = await asyncio.wait_for(
        asyncio.gather(
            db.run(make_unit("a", 1, 2, a_holds_1, b_holds_2)),
            db.run(make_unit("b", 2, 1, b_holds_2, a_holds_1)),
        ),
        EVENT_TIMEOUT_S * 2,
    )
    assert sorted(results) == ["a", "b"]
    assert errors == [ER_LOCK_DEADLOCK]  # exactly one victim, once
    assert sorted(entered.values()) == [1, 2]  # the victim ran again from BEGIN
    assert sum(entered.values()) == 3
    # Both units committed in full, the victim's first attempt left nothing behind.
    assert await _rows(db, scratch_table) == {1: 2, 2: 2}
    _assert_pool_clean(db)


async def test_lost_connection_is_retried_on_a_new_connection(db: Database, database_url: str) -> None:
    published: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    connections: list[Connection] = []
    connection_ids: list[int] = []
    errors: list[int | None] = []

    async def unit(conn: Connection) -> int:
        connections.append(conn)
        connection_ids.append(await _connection_id(conn))
        if len(connections) == 1:
            published.set_result(connection_ids[0])
            try:
                await _query(conn, "SELECT SLEEP(5)")
            except pymysql.MySQLError as exc:
                errors.append(error_code(exc))
                raise
            raise AssertionError("SLEEP(5) was not interrupted by KILL")
        ((one,),) = await _query(conn, "SELECT 1")
        return int(one)

    async def kill_first_attempt() -> None:
        victim = await asyncio.wait_for(published, EVENT_TIMEOUT_S)
        await asyncio.sleep(0.1)  # let SLEEP(5) start

        def kill() -> None:
            with connect(database_url) as admin, admin.cursor() as cur:
                cur.execute(f"KILL {int(victim)}")

        await asyncio.to_thread(kill)

    loop = asyncio.get_running_loop()
    started = loop.time()
    result, _ = await asyncio.gather(db.run(unit), kill_first_attempt())
    assert result == 1
    assert loop.time() - started < 4  # the SLEEP(5) was cut short, not waited out
    assert len(errors) == 1
    assert errors[0] in {CR_SERVER_LOST, CR_SERVER_GONE_ERROR}
    assert len(connections) == 2
    killed, retried = connections
    assert killed is not retried
    assert connection_ids[1] != connection_ids[0]
    assert killed.closed
    assert killed not in db.pool._free
    assert killed not in db.pool._used
    _assert_pool_clean(db)


async def test_retries_exhausted_raise_database_unavailable(
    own_db: Database, scratch_table: str, database_url: str
) -> None:
    holder = await asyncio.to_thread(connect, database_url)
    try:
        with holder.cursor() as cur:
            cur.execute("BEGIN")
            cur.execute(f"SELECT v FROM {scratch_table} WHERE id = 1 FOR UPDATE")
        entered = 0
        errors: list[int | None] = []

        async def unit(conn: Connection) -> None:
            nonlocal entered
            entered += 1
            await _query(conn, "SET SESSION innodb_lock_wait_timeout = 1")
            try:
                await _query(conn, f"SELECT v FROM {scratch_table} WHERE id = 1 FOR UPDATE")
            except pymysql.MySQLError as exc:
                errors.append(error_code(exc))
                raise

        with pytest.raises(DatabaseUnavailable) as info:
            await own_db.run(unit)
        assert entered == 3
        assert errors == [ER_LOCK_WAIT_TIMEOUT] * 3
        assert error_code(info.value.__cause__) == ER_LOCK_WAIT_TIMEOUT  # type: ignore[arg-type]
        _assert_pool_clean(own_db)
    finally:
        await asyncio.to_thread(holder.close)


# --- timeouts and cancellation: the connection is closed, never reused ---------------------------


async def test_query_timeout_closes_the_connection(settings: Settings) -> None:
    database = await Database.open(msgspec.structs.replace(settings, query_timeout_s=0.3, pool_max_size=1))
    try:
        entered = 0
        used: list[Connection] = []

        async def slow(conn: Connection) -> None:
            nonlocal entered
            entered += 1
            used.append(conn)
            await _query(conn, "SELECT SLEEP(2)")

        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(QueryTimeout):
            await database.run(slow)
        assert loop.time() - started < 1.5
        assert entered == 1  # a timeout is not retried
        (conn,) = used
        assert conn.closed
        assert conn not in database.pool._free
        assert conn not in database.pool._used

        # The next unit on the same pool gets a fresh, working connection.
        after: list[Connection] = []

        async def quick(conn: Connection) -> int:
            after.append(conn)
            ((one,),) = await _query(conn, "SELECT 1")
            return int(one)

        assert await database.run(quick) == 1
        assert after[0] is not conn
        _assert_pool_clean(database)
    finally:
        await database.close()


async def test_cancelled_unit_closes_the_connection(own_db: Database) -> None:
    used: list[Connection] = []
    started = asyncio.Event()

    async def slow(conn: Connection) -> None:
        used.append(conn)
        started.set()
        await _query(conn, "SELECT SLEEP(2)")

    task = asyncio.create_task(own_db.run(slow))
    await asyncio.wait_for(started.wait(), EVENT_TIMEOUT_S)
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (conn,) = used
    assert conn.closed
    assert conn not in own_db.pool._free
    ((one,),) = await own_db.run(lambda c: _query(c, "SELECT 1"))
    assert one == 1
    _assert_pool_clean(own_db)


async def test_waiter_gets_a_connection_after_a_timed_out_unit(settings: Settings) -> None:
    database = await Database.open(
        msgspec.structs.replace(settings, query_timeout_s=0.3, pool_min_size=0, pool_max_size=1)
    )
    try:

        async def slow(conn: Connection) -> None:
            await _query(conn, "SELECT SLEEP(2)")

        slow_task = asyncio.create_task(database.run(slow))
        await asyncio.sleep(0.05)  # slow_task holds the only connection
        waiter = asyncio.create_task(database.run(lambda conn: _query(conn, "SELECT 1")))
        with pytest.raises(QueryTimeout):
            await slow_task
        try:
            assert await asyncio.wait_for(waiter, 1.5) == [(1,)]
        except TimeoutError:
            pytest.fail("the waiting unit never got a connection")
    finally:
        await database.close()


# --- 503 at the API -----------------------------------------------------------------------------


@pytest.fixture
def unreachable_settings(tmp_path: Path) -> Settings:
    return Settings.from_env(
        {},
        database_url="mysql://root:@127.0.0.1:1/test",
        exports_dir=str(tmp_path / "exports"),
        connect_timeout_s=1.0,
        log_level="error",
    )


async def test_unreachable_database_maps_to_503(unreachable_settings: Settings) -> None:
    app = create_app(unreachable_settings)
    async with AsyncTestClient(app=app) as client:
        # A well-formed token: checking it needs the database, which is down.
        client.headers["Authorization"] = "Bearer jr_0123456789ab_" + "A" * 43
        response = await client.get("/v1/job-results/x")
        assert response.status_code == 503
        assert response.headers["content-type"].startswith("application/problem+json")
        assert int(response.headers["retry-after"]) > 0
        body = response.json()
        assert body["status"] == 503
        assert "127.0.0.1" not in response.text  # no connection details leak

        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert "retry-after" in ready.headers

        health = await client.get("/healthz")
        assert health.status_code == 200
