"""Lost COMMITs and lost result streams, through a real TCP proxy between the service and the server.

The proxy (:mod:`tests.mysql_proxy`) relays a COMMIT to the server, lets the server commit, swallows
its answer and cuts the connection: the client gets error 2013 and cannot know whether the
transaction landed. The service must then find out, and answer as the attempt that landed would have
(never a 412/404 from a blind re-run), keep an export file whose record exists, and answer 503 only
when the outcome truly cannot be determined.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from config.settings import DatabaseURL, Settings
from exports.pipeline import ExportService
from repositories.database import (
    COMMIT_TOKEN_RETENTION_S,
    CommitOutcomeUnknown,
    Connection,
    Database,
    DatabaseUnavailable,
    commit_token,
)
from repositories.exports import Export, ExportParameters, ExportRepository
from service.app import create_app
from tests.conftest import connect, fresh_database
from tests.mysql_proxy import MySQLProxy

Client = AsyncTestClient[Litestar]


@pytest.fixture
def proxy(database_url: str) -> Iterator[MySQLProxy]:
    url = DatabaseURL.parse(database_url)
    with MySQLProxy(url.host, url.port) as relay:
        yield relay


@pytest.fixture
def proxied_settings(proxy: MySQLProxy, database_url: str, tmp_path: Path, settings: Settings) -> Settings:
    """The session settings, but through the proxy, with exports in a fresh directory and no worker."""
    url = DatabaseURL.parse(database_url)
    through_proxy = f"mysql://{url.user}:{url.password}@127.0.0.1:{proxy.port}/{url.database}"
    return msgspec.structs.replace(
        settings, database_url=through_proxy, exports_dir=str(tmp_path / "exports"), export_worker=False
    )


@pytest.fixture
async def proxied(proxied_settings: Settings, auth_headers: dict[str, str]) -> AsyncIterator[Client]:
    """The app in-process, talking to the database through the proxy."""
    async with AsyncTestClient(app=create_app(proxied_settings)) as test_client:
        test_client.headers.update(auth_headers)
        yield test_client


def _stored(database_url: str, job_id: str) -> tuple[Any, ...] | None:
    """``(status, version, result_data)`` of the job, read directly (not through the proxy)."""
    with connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT status, version, result_data FROM job_results WHERE job_id = %s", (job_id,))
        return cur.fetchone()  # type: ignore[no-any-return]


def _job_exports(database_url: str, job_id: str) -> list[tuple[str, str, str]]:
    """``(export_id, state, file_name)`` of every single-job export of ``job_id``."""
    with connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT export_id, state, file_name FROM exports "
            "WHERE kind = 'job' AND JSON_UNQUOTE(JSON_EXTRACT(parameters, '$.job_id')) = %s",
            (job_id,),
        )
        return [tuple(row) for row in cur.fetchall()]


# --- create-only PUT, PUT, DELETE --------------------------------------------------------------


async def test_create_only_put_whose_commit_is_lost_answers_201(
    proxied: Client, proxy: MySQLProxy, database_url: str, job_id: str
) -> None:
    proxy.cut_commit("INSERT INTO job_results")
    response = await proxied.put(
        f"/v1/job-results/{job_id}",
        json={"status": "succeeded", "result": {"n": 1}},
        headers={"If-None-Match": "*"},
    )
    assert proxy.commits_cut == 1
    # The first attempt's INSERT committed: it was created, by this very request.
    assert response.status_code == 201, response.text
    stored = _stored(database_url, job_id)
    assert stored is not None
    assert stored[:2] == ("succeeded", 1)
    assert msgspec.json.decode(stored[2]) == {"n": 1}
    # ... and the ETag answered is the stored one.
    again = await proxied.get(f"/v1/job-results/{job_id}")
    assert again.headers["etag"] == response.headers["etag"]


async def test_put_whose_commit_is_lost_is_not_applied_twice(
    proxied: Client, proxy: MySQLProxy, database_url: str, job_id: str
) -> None:
    proxy.cut_commit("INSERT INTO job_results")
    response = await proxied.put(f"/v1/job-results/{job_id}", json={"status": "failed", "result": [1]})
    assert proxy.commits_cut == 1
    assert response.status_code == 201, response.text  # created, not "replaced" by a re-run
    assert _stored(database_url, job_id)[:2] == ("failed", 1)  # type: ignore[index]


async def test_delete_whose_commit_is_lost_answers_204(
    proxied: Client, proxy: MySQLProxy, database_url: str, job_id: str
) -> None:
    created = await proxied.put(f"/v1/job-results/{job_id}", json={"status": "succeeded", "result": {}})
    assert created.status_code == 201, created.text
    proxy.cut_commit("DELETE FROM job_results")
    response = await proxied.delete(f"/v1/job-results/{job_id}")
    assert proxy.commits_cut == 1
    assert response.status_code == 204, response.text  # deleted by this request, not a 404
    assert _stored(database_url, job_id) is None


# --- single-job export ---------------------------------------------------------------------------


async def test_single_job_export_whose_commit_is_lost_keeps_its_file(
    proxied: Client, proxy: MySQLProxy, proxied_settings: Settings, database_url: str, job_id: str
) -> None:
    created = await proxied.put(f"/v1/job-results/{job_id}", json={"status": "succeeded", "result": {"a": 1}})
    assert created.status_code == 201, created.text
    proxy.cut_commit("INSERT INTO exports")
    response = await proxied.post(f"/v1/job-results/{job_id}/exports", json={"format": "json"})
    assert proxy.commits_cut == 1
    assert response.status_code == 201, response.text
    record = response.json()
    # One export was recorded (the first attempt's), and it is the one answered, file included.
    assert _job_exports(database_url, job_id) == [(record["export_id"], "succeeded", _file_of(record))]
    content = await proxied.get(record["content_url"])
    assert content.status_code == 200, content.text
    assert msgspec.json.decode(content.content)["result"] == {"a": 1}
    assert sorted(os.listdir(proxied_settings.exports_path)) == [_file_of(record)]


def _file_of(record: dict[str, Any]) -> str:
    suffix = {"json": "json", "ndjson": "ndjson", "csv": "csv"}[record["format"]]
    return f"{record['export_id']}.{suffix}" + (".gz" if record["compression"] == "gzip" else "")


async def test_unknown_outcome_is_503_and_the_export_file_is_kept(
    proxied: Client, proxy: MySQLProxy, proxied_settings: Settings, database_url: str, job_id: str
) -> None:
    created = await proxied.put(f"/v1/job-results/{job_id}", json={"status": "succeeded", "result": [2]})
    assert created.status_code == 201, created.text
    proxy.cut_commit("INSERT INTO exports", isolate=True)  # the service cannot reach the database to find out
    try:
        response = await proxied.post(f"/v1/job-results/{job_id}/exports", json={"format": "ndjson"})
    finally:
        proxy.listen()
    assert proxy.commits_cut == 1
    assert response.status_code == 503, response.text
    problem = response.json()
    assert problem["type"].endswith("/commit-outcome-unknown")
    assert "may have been" in problem["detail"]
    assert response.headers["retry-after"]
    # It did commit: the record exists, and its file was not removed.
    [(export_id, state, file_name)] = _job_exports(database_url, job_id)
    assert state == "succeeded"
    assert (proxied_settings.exports_path / file_name).is_file()
    content = await proxied.get(f"/v1/exports/{export_id}/content")
    assert content.status_code == 200, content.text


# --- a range export's stream lost mid-read (issue 12, item 17) ------------------------------------


@pytest.fixture(scope="module")
def own_database_url(server_url: str) -> Iterator[str]:
    """A database of this module's own: no other worker may claim (or be claimed instead of) its exports."""
    with fresh_database(server_url, "jr_lost") as url:
        yield url


@pytest.fixture
async def range_exports(
    proxied_settings: Settings, proxy: MySQLProxy, own_database_url: str, job_id: str
) -> AsyncIterator[tuple[ExportService, ExportParameters]]:
    """An export service on the module's database through the proxy, and a range of 200 rows (~2 KB each).

    Each test gets a range of its own (a day picked from its job id) in a database only these tests use.
    """
    url = DatabaseURL.parse(own_database_url)
    settings = msgspec.structs.replace(
        proxied_settings, database_url=f"mysql://{url.user}:{url.password}@127.0.0.1:{proxy.port}/{url.database}"
    )
    start = datetime(2001, 1, 1) + timedelta(days=int(job_id[-4:], 16))
    with connect(own_database_url) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO job_results (job_id, status, result_data, version, created_at, updated_at) "
            "VALUES (%s, 'succeeded', %s, 1, %s, %s)",
            [
                (f"{job_id}-{i}", msgspec.json.encode({"i": i, "pad": "x" * 2000}).decode(), at, at)
                for i in range(200)
                for at in [start + timedelta(seconds=i)]
            ],
        )
    db = await Database.open(settings)
    try:
        yield ExportService(db, settings), ExportParameters(created_from=start, created_to=start + timedelta(hours=1))
    finally:
        await db.close()


async def test_range_export_whose_stream_is_lost_is_requeued(
    range_exports: tuple[ExportService, ExportParameters], proxy: MySQLProxy
) -> None:
    service, parameters = range_exports
    export = await service.enqueue_range(parameters, "ndjson", "none", "tests")
    proxy.cut_stream("FROM job_results FORCE INDEX", after_bytes=100_000)
    assert await service.run_next()
    assert proxy.streams_cut == 1
    requeued = await _export(service, export.export_id)
    assert (requeued.state, requeued.error, requeued.attempts) == ("queued", None, 1)
    assert await service.run_next()
    done = await _export(service, export.export_id)
    assert (done.state, done.rows_written, done.attempts) == ("succeeded", 200, 2)


async def test_range_export_whose_final_commit_is_lost_keeps_its_file(
    range_exports: tuple[ExportService, ExportParameters], proxy: MySQLProxy
) -> None:
    service, parameters = range_exports
    export = await service.enqueue_range(parameters, "json", "gzip", "tests")
    proxy.cut_commit("SET state = 'succeeded'")
    assert await service.run_next()
    assert proxy.commits_cut == 1
    done = await _export(service, export.export_id)
    assert (done.state, done.rows_written, done.attempts) == ("succeeded", 200, 1)
    assert done.file_name is not None
    data = (service.directory / done.file_name).read_bytes()
    assert hashlib.sha256(data).hexdigest() == done.sha256
    assert len(msgspec.json.decode(gzip.decompress(data))) == 200


async def _export(service: ExportService, export_id: str) -> Export:
    return await service.db.run(lambda conn: ExportRepository(conn).get(export_id), transaction=False)


# --- the unit of work itself ---------------------------------------------------------------------


@pytest.fixture
async def proxied_db(proxied_settings: Settings) -> AsyncIterator[Database]:
    database = await Database.open(proxied_settings)
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
def counter_table(database_url: str) -> Iterator[str]:
    """A one-row table ``t_lost_<random>`` (id 1, v 0); dropped afterwards."""
    name = f"t_lost_{uuid.uuid4().hex[:10]}"
    with connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE TABLE {name} (id INT PRIMARY KEY, v INT NOT NULL) ENGINE=InnoDB")
        cur.execute(f"INSERT INTO {name} (id, v) VALUES (1, 0)")
    try:
        yield name
    finally:
        with connect(database_url) as conn, conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {name}")


def _counter(database_url: str, table: str) -> int:
    with connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT v FROM {table} WHERE id = 1")
        return int(cur.fetchone()[0])


def _incrementer(table: str, runs: list[int]) -> Callable[[Connection], Awaitable[int]]:
    """A unit that adds one to the counter and returns which run of it this is (1, 2, ...)."""

    async def unit(conn: Connection) -> int:
        runs.append(len(runs) + 1)
        async with conn.cursor() as cur:
            await cur.execute(f"UPDATE {table} SET v = v + 1 WHERE id = 1")
        return runs[-1]

    return unit


async def test_lost_commit_that_landed_returns_that_attempts_result(
    proxied_db: Database, proxy: MySQLProxy, counter_table: str, database_url: str
) -> None:
    runs: list[int] = []
    proxy.cut_commit(f"UPDATE {counter_table}")
    assert await proxied_db.run(_incrementer(counter_table, runs)) == 1
    assert proxy.commits_cut == 1
    assert runs == [1]  # not run again
    assert _counter(database_url, counter_table) == 1


async def test_lost_commit_that_did_not_land_is_run_again(
    proxied_db: Database, proxy: MySQLProxy, counter_table: str, database_url: str
) -> None:
    runs: list[int] = []
    proxy.cut_commit(f"UPDATE {counter_table}", deliver=False)  # the server rolls back when the link goes
    assert await proxied_db.run(_incrementer(counter_table, runs)) == 2
    assert proxy.commits_cut == 1
    assert runs == [1, 2]
    assert _counter(database_url, counter_table) == 1


async def test_commit_answered_by_a_killed_session_error_is_looked_up(
    proxied_db: Database, proxy: MySQLProxy, counter_table: str, database_url: str
) -> None:
    # MariaDB answers a session killed mid-statement with 1927, which is not retried: the COMMIT may
    # still have landed, so the token is looked up at once instead of the error being passed on.
    runs: list[int] = []
    proxy.cut_commit(f"UPDATE {counter_table}", error=(1927, "Connection was killed"))
    assert await proxied_db.run(_incrementer(counter_table, runs)) == 1
    assert runs == [1]
    assert _counter(database_url, counter_table) == 1


async def test_commit_refused_with_a_deadlock_is_retried_without_a_lookup(
    proxied_db: Database, proxy: MySQLProxy, counter_table: str, database_url: str
) -> None:
    # 1213 at COMMIT (e.g. a Galera certification conflict) means rolled back: the unit runs again,
    # even one without a commit token (whose lost COMMIT would be CommitOutcomeUnknown).
    runs: list[int] = []
    proxy.cut_commit(f"UPDATE {counter_table}", deliver=False, error=(1213, "Deadlock found"))
    assert await proxied_db.run(_incrementer(counter_table, runs), verify_commit=False) == 2
    assert runs == [1, 2]
    assert _counter(database_url, counter_table) == 1


async def test_unit_without_commit_token_is_not_run_again_after_a_lost_commit(
    proxied_db: Database, proxy: MySQLProxy, counter_table: str, database_url: str
) -> None:
    runs: list[int] = []
    proxy.cut_commit(f"UPDATE {counter_table}")
    with pytest.raises(CommitOutcomeUnknown):
        await proxied_db.run(_incrementer(counter_table, runs), verify_commit=False)
    assert runs == [1]
    assert _counter(database_url, counter_table) == 1


@pytest.mark.parametrize("deliver", [True, False])
async def test_unit_without_retries_finds_out_whether_its_lost_commit_landed(
    proxied_db: Database, proxy: MySQLProxy, counter_table: str, database_url: str, deliver: bool
) -> None:
    runs: list[int] = []
    proxy.cut_commit(f"UPDATE {counter_table}", deliver=deliver)
    if deliver:
        assert await proxied_db.run(_incrementer(counter_table, runs), retry=False) == 1
    else:
        with pytest.raises(DatabaseUnavailable) as info:
            await proxied_db.run(_incrementer(counter_table, runs), retry=False)
        assert not isinstance(info.value, CommitOutcomeUnknown)  # it is known not to have committed
    assert runs == [1]
    assert _counter(database_url, counter_table) == (1 if deliver else 0)


async def test_old_commit_tokens_are_pruned(db: Database, database_url: str) -> None:
    old = [commit_token(time.time() - COMMIT_TOKEN_RETENTION_S - 60) for _ in range(3)]
    recent = commit_token()
    with connect(database_url) as conn, conn.cursor() as cur:
        for token in [*old, recent]:
            cur.execute("INSERT INTO commit_tokens (token) VALUES (UNHEX(%s))", (token,))
    assert await db.prune_commit_tokens() >= len(old)
    with connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT LOWER(HEX(token)) FROM commit_tokens WHERE token IN (UNHEX(%s), UNHEX(%s), UNHEX(%s), UNHEX(%s))",
            (*old, recent),
        )
        assert [row[0] for row in cur.fetchall()] == [recent]
