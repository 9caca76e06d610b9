"""Test set-up: a real MySQL or MariaDB server, a fresh database per test session, the app in-process.

The server comes from testcontainers (image ``mysql:8.4``) when a Docker engine answers, else from
``JOBRESULTS_TEST_DATABASE_URL`` (e.g. ``mysql://root:@127.0.0.1:3306/test``). Either way the suite
creates its own database ``jr_test_<random>``, migrates it with ``jobresults migrate``'s code, and
drops it at the end, so nothing else on the server is touched.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest
import stamina
from litestar import Litestar
from litestar.testing import AsyncTestClient

from config.settings import Settings
from repositories.database import Database
from service.app import create_app
from tests.support.database import ALL_SCOPES, connect, fresh_database, make_token
from tests.support.servers import Server, Servers

__all__ = ["ALL_SCOPES", "REALDATA", "REDIS_URL", "connect", "fresh_database", "make_token"]

REALDATA = Path(os.environ.get("JOBRESULTS_REALDATA") or Path(__file__).resolve().parents[2] / "shared" / "realdata")
"""Real job-result documents (../shared/realdata beside the checkout, or JOBRESULTS_REALDATA)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that starts real services (the ``servers`` fixture) as ``slow``."""
    for item in items:
        if "servers" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


def _docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        client.ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """URL of a real MySQL/MariaDB server with rights to create databases."""
    url = os.environ.get("JOBRESULTS_TEST_DATABASE_URL")
    if url:
        yield url
        return
    if not _docker_answers():
        pytest.exit(
            "no database: set JOBRESULTS_TEST_DATABASE_URL=mysql://root:@127.0.0.1:3306/test "
            "or run a Docker engine for testcontainers",
            returncode=2,
        )
    from testcontainers.mysql import MySqlContainer

    with MySqlContainer("mysql:8.4", username="root", password="test", dbname="test") as mysql:
        host = mysql.get_container_host_ip()
        port = mysql.get_exposed_port(3306)
        yield f"mysql://root:test@{host}:{port}/test"


@pytest.fixture(scope="session")
def database_url(server_url: str) -> Iterator[str]:
    """A fresh, migrated database for this test session; dropped afterwards."""
    with fresh_database(server_url, "jr_test") as url:
        yield url


REDIS_URL = os.environ.get("JOBRESULTS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
"""A real Redis for rate-limit counters shared by Granian workers (JOBRESULTS_TEST_REDIS_URL)."""


@pytest.fixture(scope="session")
def api_token(database_url: str) -> str:
    """A token with every scope, in the session database."""
    return make_token(database_url)


@pytest.fixture(scope="session")
def auth_headers(api_token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_token}"}


@pytest.fixture(scope="session", autouse=True)
def _fast_retries() -> Iterator[None]:
    stamina.set_testing(True, attempts=3)
    yield
    stamina.set_testing(False)


@pytest.fixture(scope="session")
def settings(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings of the session app: the session database, no background export worker.

    Without a worker nothing in the session database changes behind a test's back: a queued range
    export stays queued. Tests of the worker use ``worker_client`` (a database of its own).
    """
    return Settings.from_env(
        {},
        database_url=database_url,
        exports_dir=str(tmp_path_factory.mktemp("exports")),
        pool_min_size=1,
        pool_max_size=4,
        log_level="warning",
        export_poll_s=0.1,
        export_worker=False,
        webhooks_worker=False,
        purge_worker=False,
        # Rate limits have their own tests; the rest of the suite must not trip over 10/s.
        rate_limit_per_ip="100000/second",
    )


@pytest.fixture
def exports_dir(tmp_path: Path) -> Path:
    """An export directory of this test's own (for apps and services a test builds itself)."""
    return tmp_path / "exports"


@pytest.fixture(scope="session")
def app(settings: Settings) -> Litestar:
    return create_app(settings)


@pytest.fixture(scope="session")
async def client(app: Litestar, auth_headers: dict[str, str]) -> AsyncIterator[AsyncTestClient[Litestar]]:
    async with AsyncTestClient(app=app) as test_client:
        test_client.headers.update(auth_headers)
        yield test_client


@pytest.fixture(scope="module")
async def worker_client(
    settings: Settings, server_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[AsyncTestClient[Litestar]]:
    """An in-process app whose background export worker runs, on a database and directory of its own.

    One per test module: the worker claims only the range exports this module's tests queue.
    """
    with fresh_database(server_url, "jr_worker") as url:
        worker_settings = msgspec.structs.replace(
            settings, database_url=url, exports_dir=str(tmp_path_factory.mktemp("worker-exports")), export_worker=True
        )
        async with AsyncTestClient(app=create_app(worker_settings)) as test_client:
            test_client.headers.update({"Authorization": f"Bearer {make_token(url)}"})
            yield test_client


@pytest.fixture(scope="session")
async def db(settings: Settings) -> AsyncIterator[Database]:
    database = await Database.open(settings)
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
def job_id() -> str:
    """A job id no other test uses."""
    return f"t-{uuid.uuid4().hex}"


@pytest.fixture
def engine(server_url: str) -> str:
    """'mariadb' or 'mysql', from the server's version string."""
    with connect(server_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT VERSION()")
        (version,) = cur.fetchone()
    return "mariadb" if "mariadb" in str(version).lower() else "mysql"


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    """Starts real ``jobresults serve`` processes for this test; kills their process groups afterwards.

    Their output is printed at teardown, so pytest shows it when the test failed.
    """
    running = Servers(tmp_path)
    try:
        yield running
    finally:
        running.close()
        running.dump_logs()


@pytest.fixture
def server(servers: Servers, database_url: str) -> Server:
    """A running ``jobresults serve`` on the session database: 2 Granian workers sharing Redis, info logs.

    Like the session app it runs no export, webhook or purge worker (tests of the workers use databases of
    their own).
    """
    return servers.start(
        database_url,
        workers=2,
        redis_url=REDIS_URL,
        log_level="info",
        export_worker=False,
        webhooks_worker=False,
        purge_worker=False,
    )


@pytest.fixture(scope="session", autouse=True)
def _no_exports_in_the_checkout() -> Iterator[None]:
    """Fail the session if a test wrote export files into the checkout (the default ``./data/exports``)."""
    default = Path(Settings.from_env({}, database_url="mysql://u@h/d").exports_dir).resolve()
    existed = default.exists()
    yield
    assert existed or not default.exists(), f"a test wrote {default}: give its app an exports_dir"
