"""Database helpers for tests: one way to connect, fresh databases, API keys made by the product itself."""

from __future__ import annotations

import asyncio
import concurrent.futures
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import msgspec
import pymysql

from config.settings import DatabaseURL, Settings
from repositories.domain import SCOPES
from repositories.migrations import apply_migrations
from service.operator import create_key

ALL_SCOPES = SCOPES
"""Every scope the product knows (test keys that may do anything)."""


def connect(url: str | DatabaseURL, *, database: bool = True) -> pymysql.connections.Connection:
    """A plain autocommit pymysql connection (utf8mb4) for setting up and inspecting test data.

    With ``database=False`` the connection names no default database (server-wide statements such as
    ``SET GLOBAL`` or ``CREATE DATABASE``).
    """
    parts = DatabaseURL.parse(url) if isinstance(url, str) else url
    return pymysql.connect(
        host=parts.host,
        port=parts.port,
        user=parts.user,
        password=parts.password,
        database=(parts.database or None) if database else None,
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


def make_token(
    database_url: str,
    scopes: tuple[str, ...] = ALL_SCOPES,
    name: str = "tests",
    rate_limit: str | None = "100000/second",
) -> str:
    """Create an API key in the database behind ``database_url`` the way ``jobresults keys create`` does.

    Returns the token. Test keys carry their own high rate limit (as a load generator's key would), so
    tests against a real server are not held to the 10/s per-IP default; rate-limit tests pass
    ``rate_limit=None``. Callable from sync and async tests alike: the product's coroutine runs on an
    event loop of its own in a helper thread.
    """
    settings = Settings.from_env({}, database_url=database_url, pool_min_size=0, pool_max_size=1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        token, _key = pool.submit(asyncio.run, create_key(settings, name, scopes, rate_limit)).result()
    return token
