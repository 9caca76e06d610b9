"""The Litestar application factory: ``granian --interface asgi --factory service.app:create_app``."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import msgspec
import pymysql
import structlog
from litestar import Litestar
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import Provide
from litestar.handlers.base import BaseRouteHandler
from litestar.static_files import create_static_files_router

from config.settings import Settings
from exports.pipeline import ExportService
from exports.waits import ExportWaits
from observability.logging import configure_logging
from observability.requests import RequestObservabilityMiddleware
from repositories.database import Database
from service.auth import Authenticator, authorize
from service.controllers.batch import post_job_results_batch
from service.controllers.exports import ExportController, JobExportController
from service.controllers.health import healthz, metrics, readyz
from service.controllers.job_results import JobResultController
from service.controllers.webhooks import WebhookController
from service.export_purge import purge_tasks
from service.idempotency import IdempotencyKeys
from service.methods import HeadMiddleware, allow_table
from service.openapi import APP_STATIC_DIR, SWAGGER_STATIC_PATH, RawJSONSchemaPlugin, openapi_config, swagger_static_dir
from service.problems import EXCEPTION_HANDLERS
from service.purge import PurgeRunner
from service.query import check_query
from service.rate_limit import RateLimiter, UnroutedRateLimitMiddleware, parse_networks
from service.security_headers import SecurityHeadersMiddleware
from service.webhook_delivery import WebhookDelivery

log = structlog.get_logger("jobresults.app")


def _version() -> str:
    try:
        return version("jobresults")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0.0.0"


def _provide_db(state: State) -> Database:
    db: Database = state.db
    return db


def _limits_storage(redis_url: str | None) -> str:
    """The ``limits`` storage URI: async Redis when configured, else this process's memory."""
    if redis_url is None:
        return "async+memory://"
    return "async+" + redis_url


async def _guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """The app-wide guard: :func:`authorize`, then :func:`check_query`.

    One guard rather than two because Litestar copies the route handler for every guard it calls.
    """
    await authorize(connection, handler)
    await check_query(connection, handler)


def _provide_exports(state: State) -> ExportService:
    exports: ExportService = state.exports
    return exports


def create_app(settings: Settings | None = None) -> Litestar:
    """Build the app. Settings come from the environment unless given (tests pass their own).

    Raises:
        config.settings.SettingsError: a ``JOBRESULTS_*`` variable is missing or invalid.
    """
    settings = settings or Settings.from_env()
    configure_logging(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        settings.exports_path.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            db = await Database.open(settings)
        except pymysql.err.OperationalError as exc:
            # Start anyway: /readyz reports 503 until the database answers; connections open on demand.
            log.warning("db.unreachable_at_startup", error=str(exc), database=settings.database.redacted())
            db = await Database.open(msgspec.structs.replace(settings, pool_min_size=0))
        app.state.db = db
        app.state.authenticator = Authenticator(db, settings.auth_cache_ttl_s)
        app.state.trusted_proxies = parse_networks(settings.trusted_proxies)
        app.state.rate_limiter = (
            RateLimiter(_limits_storage(settings.redis_url), settings.rate_limit_per_ip, settings.rate_limit_per_key)
            if settings.rate_limit_enabled
            else None
        )
        idempotency = IdempotencyKeys(db, settings.query_timeout_s)
        app.state.idempotency = idempotency
        waits = ExportWaits(db, settings)
        waits.start()
        app.state.export_waits = waits
        exports = ExportService(db, settings, on_settled=waits.settled)
        app.state.exports = exports
        if settings.export_worker:
            exports.start()
        webhooks = WebhookDelivery(db, settings)
        app.state.webhooks = webhooks
        if settings.webhooks_worker:
            webhooks.start()
        purge = PurgeRunner(db, settings, tasks=purge_tasks(exports.store, settings))
        app.state.purge = purge
        if settings.purge_worker:
            purge.start()
        # Everything built so far (modules, routes, pools) lives as long as the process: collect once,
        # then move it out of the cycle collector's reach (gc.freeze, Python docs), so a full collection
        # scans only what requests allocated since, which keeps gen-2 pauses short.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await purge.stop()
            await exports.stop()
            await waits.stop()
            await idempotency.close()
            await webhooks.stop()
            if app.state.rate_limiter is not None:
                await app.state.rate_limiter.close()
            await db.close()

    route_handlers: list[object] = [
        healthz,
        readyz,
        metrics,
        JobResultController,
        post_job_results_batch,
        JobExportController,
        ExportController,
        WebhookController,
    ]
    if settings.docs_enabled:
        route_handlers.append(
            create_static_files_router(
                path=SWAGGER_STATIC_PATH,
                directories=[APP_STATIC_DIR, swagger_static_dir()],
                include_in_schema=False,
            )
        )
    app = Litestar(
        route_handlers=route_handlers,  # type: ignore[arg-type]
        lifespan=[lifespan],
        dependencies={
            "db": Provide(_provide_db, sync_to_thread=False),
            "exports": Provide(_provide_exports, sync_to_thread=False),
        },
        exception_handlers=EXCEPTION_HANDLERS,
        guards=[_guard],
        openapi_config=openapi_config(_version()) if settings.docs_enabled else None,
        plugins=[RawJSONSchemaPlugin()],
        request_max_body_size=settings.max_body_bytes,
        state=State({"settings": settings}),
        debug=False,
        logging_config=None,  # observability.logging already routes every logger into one JSON stream
    )
    app.state.allow = allow_table(app)
    # Outermost layer, around routing and error handling, so every response is logged and counted.
    app.asgi_handler = RequestObservabilityMiddleware(
        SecurityHeadersMiddleware(
            UnroutedRateLimitMiddleware(HeadMiddleware(app.asgi_handler, app), app.state),
            hsts_max_age_s=settings.hsts_max_age_s,
        )
    )
    return app
