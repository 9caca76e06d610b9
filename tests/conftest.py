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
from contextlib import contextmanager
from pathlib import Path

import msgspec
import pymysql
import pytest
import stamina
from litestar import Litestar
from litestar.testing import AsyncTestClient

from config.settings import DatabaseURL, Settings
from repositories.database import Database
from repositories.migrations import apply_migrations
from service.app import create_app
from service.auth import new_token

REALDATA = Path(os.environ.get("JOBRESULTS_REALDATA") or Path(__file__).resolve().parents[2] / "shared" / "realdata")
"""Real job-result documents (../shared/realdata beside the checkout, or JOBRESULTS_REALDATA)."""


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


def connect(url: str | DatabaseURL) -> pymysql.connections.Connection:
    """A plain autocommit pymysql connection (utf8mb4) for setting up and inspecting test data."""
    parts = DatabaseURL.parse(url) if isinstance(url, str) else url
    return pymysql.connect(
        host=parts.host,
        port=parts.port,
        user=parts.user,
        password=parts.password,
        database=parts.database or None,
        autocommit=True,
        charset="utf8mb4",
    )


@contextmanager
def fresh_database(server_url: str, prefix: str) -> Iterator[str]:
    """Create and migrate ``<prefix>_<random>`` on the server; yield its URL; drop it afterwards."""
    server = DatabaseURL.parse(server_url)
    admin = msgspec.structs.replace(server, database="")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with connect(admin) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name} CHARACTER SET utf8mb4")
    url = f"mysql://{server.user}:{server.password}@{server.host}:{server.port}/{name}"
    try:
        apply_migrations(Settings.from_env({}, database_url=url))
        yield url
    finally:
        with connect(admin) as conn, conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name}")


@pytest.fixture(scope="session")
def database_url(server_url: str) -> Iterator[str]:
    """A fresh, migrated database for this test session; dropped afterwards."""
    with fresh_database(server_url, "jr_test") as url:
        yield url


REDIS_URL = os.environ.get("JOBRESULTS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
"""A real Redis for rate-limit counters shared by Granian workers (JOBRESULTS_TEST_REDIS_URL)."""

ALL_SCOPES = ("results:read", "results:write", "exports:read", "exports:write", "metrics:read")


def make_token(
    database_url: str,
    scopes: tuple[str, ...] = ALL_SCOPES,
    name: str = "tests",
    rate_limit: str | None = "100000/second",
) -> str:
    """Create an API key in the database behind ``database_url``; return its token.

    Test keys carry their own high rate limit (as a load generator's key would), so tests against a
    real server are not held to the 10/s per-IP default; rate-limit tests pass ``rate_limit=None``.
    """
    token, key_id, digest = new_token()
    with connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO api_keys (key_id, name, secret_sha256, scopes, rate_limit, created_at) "
            "VALUES (%s, %s, %s, %s, %s, UTC_TIMESTAMP(6))",
            (key_id, name, digest, " ".join(scopes), rate_limit),
        )
    return token


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
    return Settings.from_env(
        {},
        database_url=database_url,
        exports_dir=str(tmp_path_factory.mktemp("exports")),
        pool_min_size=1,
        pool_max_size=4,
        log_level="warning",
        export_poll_s=0.1,
        # Rate limits have their own tests; the rest of the suite must not trip over 10/s.
        rate_limit_per_ip="100000/second",
    )


@pytest.fixture(scope="session")
def app(settings: Settings) -> Litestar:
    return create_app(settings)


@pytest.fixture(scope="session")
async def client(app: Litestar, auth_headers: dict[str, str]) -> AsyncIterator[AsyncTestClient[Litestar]]:
    async with AsyncTestClient(app=app) as test_client:
        test_client.headers.update(auth_headers)
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
        (version,) = cur.fetchone()  # type: ignore[misc]
    return "mariadb" if "mariadb" in str(version).lower() else "mysql"
