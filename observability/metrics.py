"""Prometheus metrics (prometheus-client), correct across Granian workers.

``jobresults serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before the workers start,
so every worker writes its samples there and ``/metrics`` (served by any worker) adds them all up
(prometheus-client's multiprocess mode). Gauges use ``livesum``: the sum over live workers.
Names follow the Prometheus naming conventions (base units, ``_total`` for counters).
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})
"""The methods of RFC 9110 and RFC 5789 that are counted under their own name."""
OTHER_METHOD = "other"
"""``method`` label of every request whose method is not in :data:`HTTP_METHODS`."""
UNMATCHED_ROUTE = "unmatched"
"""``route`` label of requests that matched no route (404, 405), so random paths cannot add series."""


def http_labels(method: str, path_template: str | None) -> tuple[str, str]:
    """The bounded ``(method, route)`` label values of a request.

    ``method`` is the request method if it is one of :data:`HTTP_METHODS`, else ``other``; ``route``
    is the template of the route that served the request, else ``unmatched``. Every HTTP metric takes
    its labels from here, so no client can add a series by inventing a method or a path.
    """
    return (method if method in HTTP_METHODS else OTHER_METHOD), (path_template or UNMATCHED_ROUTE)


HTTP_REQUESTS = Counter(
    "jobresults_http_requests_total",
    "HTTP requests by method, route template and status.",
    ["method", "route", "status"],
)
HTTP_DURATION = Histogram(
    "jobresults_http_request_duration_seconds",
    "Time from request start to the last response byte, by method and route template.",
    ["method", "route"],
    buckets=_LATENCY_BUCKETS,
)
HTTP_IN_FLIGHT = Gauge("jobresults_http_requests_in_flight", "Requests being served now.", multiprocess_mode="livesum")
DB_POOL_SIZE = Gauge("jobresults_db_pool_connections", "Open pooled connections.", multiprocess_mode="livesum")
DB_POOL_IN_USE = Gauge(
    "jobresults_db_pool_connections_in_use", "Pooled connections checked out.", multiprocess_mode="livesum"
)
DB_POOL_MAX = Gauge(
    "jobresults_db_pool_connections_max", "Most connections the pools may open.", multiprocess_mode="livesum"
)
DB_POOL_WAITERS = Gauge(
    "jobresults_db_pool_waiters", "Units of work waiting for a free connection.", multiprocess_mode="livesum"
)
DB_UNIT_DURATION = Histogram(
    "jobresults_db_query_duration_seconds",
    "Time of one database unit of work (a transaction or a single read), retries included.",
    ["kind", "outcome"],
    buckets=_LATENCY_BUCKETS,
)
DB_RETRIES = Counter(
    "jobresults_db_retries_total", "Units of work retried after a transient MySQL error, by error code.", ["code"]
)
RATE_LIMITED = Counter("jobresults_rate_limited_requests_total", "Requests refused with 429.", ["scope"])
EXPORTS = Counter(
    "jobresults_exports_total",
    "Exports finished, by kind, format and state (succeeded, failed, cancelled).",
    ["kind", "format", "state"],
)
EXPORT_DELETIONS = Counter(
    "jobresults_export_deletions_total",
    "Exports deleted, by kind and cause: request (DELETE /v1/exports/{id}) or job_deleted (the cascade).",
    ["kind", "cause"],
)
EXPORT_ROWS = Counter("jobresults_export_rows_total", "Rows written to export files.", ["format"])
EXPORT_BYTES = Counter("jobresults_export_bytes_total", "Bytes of export files written.", ["format"])
EXPORT_DURATION = Histogram(
    "jobresults_export_duration_seconds",
    "Time to produce one export file.",
    ["kind", "format"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600),
)

EXPORT_WAITERS = Gauge(
    "jobresults_export_waiters",
    "Long-polling requests (GET /v1/exports/{id}?wait=N) waiting now.",
    multiprocess_mode="livesum",
)
EXPORT_WAIT_POLLS = Counter(
    "jobresults_export_wait_polls_total",
    "Queries made by the long-poll fallback poller (one per tick and per 1,000 waited exports).",
)
EXPORT_WAIT_WAKEUPS = Counter(
    "jobresults_export_wait_wakeups_total",
    "Waited exports found settled, by source: local (this process settled it), pubsub (Redis), poll.",
    ["source"],
)
IDEMPOTENT_REPLAYS = Counter(
    "jobresults_idempotent_replays_total",
    "POSTs answered with the stored response of an earlier request with the same Idempotency-Key.",
)

WEBHOOK_DELIVERIES = Counter(
    "jobresults_webhook_deliveries_total",
    "Webhook delivery attempts by outcome: delivered, http_error, timeout, network_error, refused.",
    ["outcome"],
)
WEBHOOK_DELIVERY_DURATION = Histogram(
    "jobresults_webhook_delivery_duration_seconds",
    "Time of one webhook delivery attempt (connect, send, answer).",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
WEBHOOK_PENDING = Gauge(
    "jobresults_webhook_events_pending",
    "Webhook events waiting for delivery (the outbox queue depth), as last seen by a delivery worker.",
    multiprocess_mode="livemax",
)
WEBHOOK_OLDEST_PENDING_AGE = Gauge(
    "jobresults_webhook_oldest_pending_age_seconds",
    "Age of the oldest webhook event waiting for delivery (0 when none), as last seen by a delivery worker.",
    multiprocess_mode="livemax",
)

PURGE_ROWS = Counter("jobresults_purge_rows_total", "Rows (or records) the purge deleted, by task.", ["task"])
PURGE_BYTES = Counter(
    "jobresults_purge_bytes_total", "Bytes of data (documents, files) the purge deleted, by task.", ["task"]
)
PURGE_LAG = Gauge(
    "jobresults_purge_lag_seconds",
    "Seconds since the oldest item that is due and not purged yet fell due (0 when none), by task.",
    ["task"],
    multiprocess_mode="livemax",
)


def render() -> tuple[bytes, str]:
    """The current metrics in the Prometheus text format, and its content type.

    In multiprocess mode, the samples of every worker (live or not) are added up.
    """
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
