"""Galera certification conflicts, on a real 3-node MariaDB Galera cluster (``.ci/cluster``).

Two transactions that write the same row on two different nodes do not block each other: each node
only sees its own row locks. The first to commit wins cluster-wide; the other learns it lost only at
COMMIT, as error 1213 (certification failure, or a brute-force abort by the winner's applier). The
service treats that like an InnoDB deadlock: the whole unit is retried from BEGIN.

Runs only when ``JOBRESULTS_TEST_GALERA_NODES`` lists the nodes' own URLs (comma-separated, e.g.
``$(.ci/cluster node-urls | paste -sd,)``) and ``JOBRESULTS_TEST_DATABASE_URL`` points at the cluster
(through HAProxy), as ``.ci/run`` does.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import pymysql
import pytest
import stamina

from config.settings import DatabaseURL, Settings
from repositories.database import ER_LOCK_DEADLOCK, Connection, Database, DatabaseUnavailable, error_code

NODES = [url.strip() for url in os.environ.get("JOBRESULTS_TEST_GALERA_NODES", "").split(",") if url.strip()]

pytestmark = pytest.mark.skipif(
    len(NODES) < 2, reason="no Galera cluster: set JOBRESULTS_TEST_GALERA_NODES (see .ci/cluster node-urls)"
)

EVENT_TIMEOUT_S = 10.0


async def _query(conn: Connection, sql: str, args: object = None) -> list[tuple[Any, ...]]:
    async with conn.cursor() as cur:
        await cur.execute(sql, args)
        return list(await cur.fetchall())


@pytest.fixture
async def nodes(settings: Settings) -> AsyncIterator[tuple[Database, Database]]:
    """The service's ``Database`` on node 1 and on node 2 directly, both on the session database."""
    name = settings.database.database
    opened = []
    try:
        for url in NODES[:2]:
            node = msgspec.structs.replace(DatabaseURL.parse(url), database=name)
            node_url = f"mysql://{node.user}:{node.password}@{node.host}:{node.port}/{name}"
            opened.append(await Database.open(msgspec.structs.replace(settings, database_url=node_url)))
        yield opened[0], opened[1]
    finally:
        for database in opened:
            await database.close()


@pytest.fixture
async def row_table(db: Database) -> AsyncIterator[str]:
    """A one-row table ``t_galera_<random>`` (id 1, v = 0), created through HAProxy (DDL replicates)."""
    name = f"t_galera_{uuid.uuid4().hex[:10]}"
    await db.run(
        lambda conn: _query(conn, f"CREATE TABLE {name} (id INT PRIMARY KEY, v INT NOT NULL) ENGINE=InnoDB"),
        transaction=False,
    )
    await db.run(lambda conn: _query(conn, f"INSERT INTO {name} (id, v) VALUES (1, 0)"), transaction=False)
    try:
        yield name
    finally:
        await db.run(lambda conn: _query(conn, f"DROP TABLE IF EXISTS {name}"), transaction=False)


async def _value(database: Database, table: str) -> int:
    """Row 1's ``v`` as this node sees it once it has applied every write set committed before."""

    async def read(conn: Connection) -> int:
        await _query(conn, "SET SESSION wsrep_sync_wait = 1")
        ((v,),) = await _query(conn, f"SELECT v FROM {table} WHERE id = 1")
        await _query(conn, "SET SESSION wsrep_sync_wait = 0")
        return int(v)

    return await database.run(read, transaction=False)


class Conflict:
    """Unit A writes row 1 and waits; unit B writes the same row on another node and commits first."""

    def __init__(self, table: str) -> None:
        self.table = table
        self.entered = {"a": 0, "b": 0}
        self.body_errors: list[int | None] = []
        self._a_wrote = asyncio.Event()
        self._b_committed = asyncio.Event()

    async def unit_a(self, conn: Connection) -> None:
        self.entered["a"] += 1
        try:
            await _query(conn, f"UPDATE {self.table} SET v = v + 1 WHERE id = 1")
        except pymysql.MySQLError as exc:
            self.body_errors.append(error_code(exc))
            raise
        if self.entered["a"] == 1:
            self._a_wrote.set()
            await asyncio.wait_for(self._b_committed.wait(), EVENT_TIMEOUT_S)
        # Database.run commits once this returns: the conflict surfaces there.

    async def unit_b(self, conn: Connection) -> None:
        self.entered["b"] += 1
        async with conn.cursor() as cur:
            changed = await cur.execute(f"UPDATE {self.table} SET v = v + 10 WHERE id = 1")
        assert changed == 1

    async def run_b(self, node: Database) -> None:
        """B on ``node``, once A holds its (node-local) row lock; commits before A does."""
        await _value(node, self.table)  # the row's INSERT (through node 1) has reached this node
        await asyncio.wait_for(self._a_wrote.wait(), EVENT_TIMEOUT_S)
        await node.run(self.unit_b)
        self._b_committed.set()


async def test_certification_conflict_surfaces_as_1213_at_commit(
    nodes: tuple[Database, Database], row_table: str
) -> None:
    node1, node2 = nodes
    conflict = Conflict(row_table)

    a_result, b_result = await asyncio.wait_for(
        asyncio.gather(node1.run(conflict.unit_a, retry=False), conflict.run_b(node2), return_exceptions=True),
        EVENT_TIMEOUT_S * 2,
    )
    assert b_result is None  # the first committer wins
    assert isinstance(a_result, DatabaseUnavailable)
    assert a_result.__cause__ is not None
    assert error_code(a_result.__cause__) == ER_LOCK_DEADLOCK
    assert conflict.body_errors == []  # every statement of A succeeded: the 1213 came at COMMIT
    assert conflict.entered == {"a": 1, "b": 1}
    # A's write is gone on every node; B's is everywhere.
    assert await _value(node1, row_table) == 10
    assert await _value(node2, row_table) == 10


@pytest.fixture
def real_backoff() -> Iterator[None]:
    """The service's own retry waits (50 ms, doubling, jitter) instead of the suite's no-wait mode.

    A retry issued at once can lose again to the same winner: until node 1 has applied B's write set,
    A's new attempt still conflicts with it. The backoff is what gives the node that time.
    """
    stamina.set_testing(False)
    yield
    stamina.set_testing(True, attempts=3)


@pytest.mark.usefixtures("real_backoff")
async def test_certification_conflict_is_retried_from_begin(nodes: tuple[Database, Database], row_table: str) -> None:
    node1, node2 = nodes
    conflict = Conflict(row_table)

    await asyncio.wait_for(asyncio.gather(node1.run(conflict.unit_a), conflict.run_b(node2)), EVENT_TIMEOUT_S * 2)
    assert conflict.entered["b"] == 1
    assert conflict.entered["a"] >= 2  # A lost at COMMIT and ran again from BEGIN
    assert conflict.body_errors == []
    # Both committed in full, A's lost attempt left nothing behind: 0 + 10 + 1 on every node.
    assert await _value(node1, row_table) == 11
    assert await _value(node2, row_table) == 11
