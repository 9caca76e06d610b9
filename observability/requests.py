"""The outermost ASGI layer: request ids, one canonical JSON log line per request, HTTP metrics.

It wraps Litestar's whole handler (routing and error handling included), so 404s, 405s, 413s and
500s are logged and counted with the status the client really got.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import structlog
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from observability.metrics import HTTP_DURATION, HTTP_IN_FLIGHT, HTTP_REQUESTS, http_labels

REQUEST_ID_HEADER = b"x-request-id"
_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")

CLIENT_CLOSED_REQUEST = 499
"""Status logged and counted when the client disconnected before the response was complete (nginx's
convention): outside the 5xx series, because the server did not fail."""
CLIENT_DISCONNECTED = "client_disconnected"
"""Key set in ``scope["state"]`` once the client has disconnected, for error handlers to read."""

log = structlog.get_logger("jobresults.request")


def request_id_of(scope: Scope) -> str:
    """The client's ``X-Request-ID`` if it is 1-128 characters of ``A-Z a-z 0-9 . _ : -``, else a new one."""
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID_HEADER and _SANE_REQUEST_ID.fullmatch(value):
            return value.decode("ascii")
    return os.urandom(16).hex()  # 128 random bits, as uuid4().hex without building a UUID object


class RequestObservabilityMiddleware:
    """ASGI middleware: request id, canonical log line and HTTP metrics for every request.

    It binds ``request_id`` for every log line of the request, echoes it in the ``X-Request-ID``
    response header, writes the canonical ``request`` log line and updates ``jobresults_http_*``.
    The log line holds ``request_id``, ``method`` and ``route`` (the bounded label values of
    :func:`observability.metrics.http_labels`: e.g. ``GET`` and ``/v1/job-results/{job_id}``),
    ``status`` (499 when the client disconnected before the whole response was sent), ``duration_ms``,
    ``client_ip``, ``api_key_id`` (when authentication set ``scope["state"]["api_key_id"]``) and
    ``response_bytes``.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection; only ``http`` scopes are observed."""
        if scope["type"] != "http":  # type: ignore[comparison-overlap]
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = request_id_of(scope)
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        outcome: dict[str, Any] = {"status": 500, "bytes": 0, "complete": False, "disconnected": False}
        header = (REQUEST_ID_HEADER, request_id.encode("ascii"))

        async def observed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                outcome["status"] = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            elif message["type"] == "http.response.body":
                outcome["bytes"] += len(message.get("body", b""))
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                outcome["complete"] = True

        async def observed_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and not outcome["complete"]:
                outcome["disconnected"] = True
                scope.setdefault("state", {})[CLIENT_DISCONNECTED] = True
            return message  # type: ignore[return-value]

        HTTP_IN_FLIGHT.inc()
        try:
            await self.app(scope, observed_receive, observed_send)  # type: ignore[arg-type]
        finally:
            HTTP_IN_FLIGHT.dec()
            seconds = time.perf_counter() - started
            method, route = http_labels(scope["method"], scope.get("path_template"))  # type: ignore[typeddict-item]
            # The client hung up before the whole response was sent: whatever the app answered (often a
            # 500 from a body read cut short), nobody got it, and it is no server error.
            status = CLIENT_CLOSED_REQUEST if outcome["disconnected"] else outcome["status"]
            HTTP_REQUESTS.labels(method, route, str(status)).inc()
            HTTP_DURATION.labels(method, route).observe(seconds)
            client = scope.get("client")
            state = scope.get("state", {})
            log.info(
                "request",
                method=method,
                route=route,
                status=status,
                duration_ms=round(seconds * 1000, 3),
                client_ip=state.get("client_ip") or (client[0] if client else None),
                api_key_id=state.get("api_key_id"),
                response_bytes=outcome["bytes"],
            )
            structlog.contextvars.clear_contextvars()
