"""Security headers on every response, 404/405/413/429/500 included (one small ASGI middleware).

The header set follows OWASP's HTTP Headers Cheat Sheet for APIs. API responses get
``Content-Security-Policy: default-src 'none'; frame-ancestors 'none'``; the Swagger UI page gets a
strict policy that allows only this origin's scripts and styles (its assets are served locally).
"""

from __future__ import annotations

from litestar.types import ASGIApp, Message, Receive, Scope, Send

API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
DOCS_PREFIX = "/schema"


def header_table(hsts_max_age_s: int) -> list[tuple[bytes, bytes]]:
    """The headers added to every response; ``hsts_max_age_s`` 0 leaves HSTS out."""
    headers = [
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"no-referrer"),
        (b"cross-origin-resource-policy", b"same-origin"),
    ]
    if hsts_max_age_s > 0:
        headers.append((b"strict-transport-security", f"max-age={hsts_max_age_s}; includeSubDomains".encode()))
    return headers


class SecurityHeadersMiddleware:
    """ASGI middleware adding the security headers to every response.

    It adds :func:`header_table`, the right CSP, and ``Cache-Control: no-store`` on authenticated
    (``/v1`` and ``/metrics``) responses. Headers the application set itself are left alone.
    """

    def __init__(self, app: ASGIApp, *, hsts_max_age_s: int) -> None:
        self.app = app
        self.table = header_table(hsts_max_age_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection, adding the headers to ``http`` responses."""
        if scope["type"] != "http":  # type: ignore[comparison-overlap]
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        csp = DOCS_CSP if path.startswith(DOCS_PREFIX) else API_CSP
        extra = [*self.table, (b"content-security-policy", csp.encode())]
        if path.startswith(("/v1", "/metrics")):
            extra.append((b"cache-control", b"no-store"))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in extra if name not in present]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)
