"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Request, Response, get
from litestar.di import NamedDependency

from observability.metrics import render
from repositories.database import Database, expected_migrations, fetch_applied_migrations
from service.problems import problem_response, problem_responses
from service.schemas import Health

READY_TIMEOUT_S = 1.0
"""``/readyz`` reports 503 if the database takes longer than this to answer (seconds)."""


@get("/healthz", tags=["health"], security=[{}], summary="Liveness: the process is up (no database call)", cache=False)
async def healthz() -> Health:
    """Always 200 while the process serves requests."""
    return Health(status="ok")


@get(
    "/readyz",
    tags=["health"],
    summary=(
        "Readiness: the database, the export store (and Redis, when configured) answer within 1 s, "
        "the schema is current"
    ),
    security=[{}],
    responses=problem_responses(503),
)
async def readyz(request: Request[Any, Any, Any], db: NamedDependency[Database]) -> Response[Health]:
    """200 when ready, else 503 with the reason."""
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            conn = await db.acquire()
            try:
                applied = await fetch_applied_migrations(conn)
            except BaseException:
                conn.close()
                raise
            finally:
                db.release(conn)
    except TimeoutError:
        return _unready(request, "database did not answer within 1 s")
    except Exception:  # noqa: BLE001 - any failure to reach the database means not ready
        return _unready(request, "database unreachable")
    limiter = getattr(request.app.state, "rate_limiter", None)
    if limiter is not None and request.app.state.settings.redis_url:
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                redis_ok = await limiter.storage.check()
        except Exception:  # noqa: BLE001 - any failure to reach Redis means not ready
            redis_ok = False
        if not redis_ok:
            return _unready(request, "the rate-limit store (Redis) is unreachable")
    exports = getattr(request.app.state, "exports", None)
    if exports is not None:
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                await exports.store.check()
        except Exception:  # noqa: BLE001 - any failure to reach the export store means not ready
            return _unready(request, f"the export store ({exports.store.kind}) does not answer")
    missing = expected_migrations() - applied
    if missing:
        return _unready(
            request, f"schema is not current: {len(missing)} migration(s) pending; run `jobresults migrate`"
        )
    return Response(Health(status="ok"))


@get(
    "/metrics",
    opt={"scope": "metrics:read"},
    tags=["health"],
    summary="Prometheus metrics (text format), all workers added up",
    cache=False,
    media_type="text/plain",
    responses=problem_responses(401, 403, 429),
)
async def metrics() -> Response[bytes]:
    """The ``jobresults_*`` metrics (and stamina's and the process's) in Prometheus text format."""
    body, content_type = render()
    # Litestar appends "; charset=utf-8" to text/* itself.
    return Response(content=body, media_type=content_type.replace("; charset=utf-8", ""))


def _unready(request: Request[Any, Any, Any], detail: str) -> Response[Health]:
    problem = problem_response(request, 503, detail, slug="not-ready", headers={"Retry-After": "5"})
    return problem  # type: ignore[return-value]
