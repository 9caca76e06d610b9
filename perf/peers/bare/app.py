"""The ceiling of our own framework: Litestar + Granian + aiomysql + msgspec, no middleware.

It serves the service's one-row GET shape (``GET /v1/job-results/{job_id}``) from the same table with
the same packed-metadata SQL, and nothing else: no auth, rate limit, logs, metrics or security headers.
Served by ``perf/peers/compare.py`` as::

    granian --interface asgi --factory --workers 2 perf.peers.bare.app:create_app

``PEER_DATABASE_URL`` (``mysql://user:pass@host:port/db``) names the database.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import unquote, urlsplit

import aiomysql
import msgspec
from litestar import Litestar, Response, get
from litestar.datastructures import State
from litestar.exceptions import NotFoundException

SQL = (
    "SELECT CONCAT_WS(' ', version, status, created_at, updated_at, job_id), result_data "
    "FROM job_results WHERE job_id = %s"
)


class JobResult(msgspec.Struct):
    """The response shape of the service's GET."""

    job_id: str
    status: str
    result: msgspec.Raw
    created_at: str
    updated_at: str


def _rfc3339(text: str) -> str:
    return text.replace(" ", "T") + "Z"


@get("/v1/job-results/{job_id:str}")
async def get_job_result(job_id: str, state: State) -> Response[JobResult]:
    """One stored result, its JSON passed through."""
    async with state.pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(SQL, (job_id,))
        row = await cur.fetchone()
    if row is None:
        raise NotFoundException()
    meta = row[0].decode() if isinstance(row[0], bytes) else row[0]
    version, status, created, updated, stored_id = meta.split(" ", 4)
    stored = row[1].encode() if isinstance(row[1], str) else row[1]
    body = JobResult(stored_id, status, msgspec.Raw(stored), _rfc3339(created), _rfc3339(updated))
    return Response(body, headers={"ETag": f'"{version}"'})


@get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness."""
    return {"status": "ok"}


def create_app() -> Litestar:
    """The bare app; the pool lives on ``app.state`` for the app's lifetime."""
    url = urlsplit(os.environ["PEER_DATABASE_URL"])

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        pool = await aiomysql.create_pool(
            host=url.hostname,
            port=url.port or 3306,
            user=unquote(url.username or "root"),
            password=unquote(url.password or ""),
            db=url.path.lstrip("/"),
            minsize=1,
            maxsize=6,
            autocommit=True,
            charset="utf8mb4",
        )
        app.state.pool = pool
        try:
            yield
        finally:
            pool.close()
            await pool.wait_closed()

    return Litestar(
        route_handlers=[get_job_result, healthz],
        lifespan=[lifespan],
        openapi_config=None,
        logging_config=None,
    )
