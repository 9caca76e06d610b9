"""Which methods each route serves: ``HEAD`` wherever ``GET`` is, and one true ``Allow`` header per route.

Litestar answers ``HEAD`` only where a handler declares it, and its automatic ``OPTIONS`` answers can
list fewer methods than the route serves. Here the methods of every route are read once from the
application's route table (:func:`allow_table`); ``OPTIONS`` answers and 405 problems both take their
``Allow`` from it, and :class:`HeadMiddleware` serves ``HEAD`` as a ``GET`` without its body.
"""

from __future__ import annotations

from litestar import Litestar
from litestar.routes import HTTPRoute
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from litestar.utils import normalize_path

HEAD_SCOPE_KEY = "jobresults.head"
"""The ASGI scope key :class:`HeadMiddleware` sets on a ``HEAD`` it serves as a ``GET``."""
METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
ADVERTISED = "advertised"
"""Route handler ``opt`` key: ``False`` for a handler that only explains a mistake (e.g. a 400 for a
missing job id), so its method is served but not listed in ``Allow``."""


def allow_table(app: Litestar) -> dict[str, str]:
    """Route template (``/v1/job-results/{job_id}``) to its ``Allow`` header value.

    A route allows the methods of its handlers (unless ``opt["advertised"]`` is False), ``HEAD``
    wherever it allows ``GET``, and ``OPTIONS``.
    """
    table: dict[str, str] = {}
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        methods = {"OPTIONS"}
        for handler in route.route_handlers:
            if handler.opt.get(ADVERTISED, True):
                methods.update(str(method) for method in handler.http_methods)
        if "GET" in methods:
            methods.add("HEAD")
        ordered = [m for m in METHOD_ORDER if m in methods] + sorted(methods - set(METHOD_ORDER))
        table[route.path_format] = ", ".join(ordered)
    return table


def allow_header(app: Litestar, path: str, path_template: str | None = None) -> str | None:
    """The ``Allow`` value of the route ``path`` matches (its template if known), or None if none does."""
    table: dict[str, str] = app.state.allow
    if path_template is None:
        try:  # every route has an OPTIONS handler, so routing by OPTIONS finds the route of any path
            path_template = app.asgi_router.handle_routing(normalize_path(path), "OPTIONS")[4]
        except Exception:  # noqa: BLE001 - NotFoundException and friends: no route for this path
            return None
    return table.get(path_template)


class HeadMiddleware:
    """ASGI middleware: serve ``HEAD`` as ``GET`` without the body; correct ``Allow`` on ``OPTIONS``.

    A ``HEAD`` request is routed, authorised and rate limited exactly as the ``GET`` would be, and
    gets the same status and headers (``Content-Length`` included, RFC 9110 section 9.3.2); the body
    is dropped, and a streamed body (an export's file) stops after its first chunk.
    """

    def __init__(self, app: ASGIApp, litestar: Litestar) -> None:
        self.app = app
        self.litestar = litestar

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection."""
        method = scope.get("method") if scope["type"] == "http" else None  # type: ignore[comparison-overlap]
        if method not in ("HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        if method == "OPTIONS":
            await self.app(scope, receive, self._options_send(scope, send))
            return
        finished = False

        async def head_send(message: Message) -> None:
            nonlocal finished
            if message["type"] == "http.response.start":
                await send(message)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                finished = True
            elif message["type"] == "http.response.body" and message.get("more_body", False):
                raise _HeadDone  # stop a streamed body: nobody reads it
            # A single body message is dropped; the response was finished at its start.

        scope["method"] = "GET"  # type: ignore[typeddict-unknown-key]
        scope[HEAD_SCOPE_KEY] = True  # type: ignore[literal-required]
        try:
            await self.app(scope, receive, head_send)
        except Exception:
            if not finished:
                raise
        finally:
            scope["method"] = "HEAD"  # type: ignore[typeddict-unknown-key]

    def _options_send(self, scope: Scope, send: Send) -> Send:
        async def options_send(message: Message) -> None:
            if message["type"] == "http.response.start" and 200 <= message["status"] < 300:
                allow = allow_header(self.litestar, scope["path"], scope.get("path_template"))
                if allow is not None:
                    headers = [(n, v) for n, v in message.get("headers", ()) if n.lower() != b"allow"]
                    message["headers"] = [*headers, (b"allow", allow.encode("latin-1"))]
            await send(message)

        return options_send


def is_head(scope: Scope) -> bool:
    """True when the request is a ``HEAD`` served as a ``GET`` by :class:`HeadMiddleware`."""
    return bool(scope.get(HEAD_SCOPE_KEY))


class _HeadDone(Exception):
    """Raised into the application to stop a streamed body after a HEAD response was sent."""
