"""One error contract: domain exceptions and framework errors mapped to RFC 9457 problem details.

5xx details go to the log, never to the response body.
"""

from __future__ import annotations

from typing import Any

import msgspec
import structlog
from litestar import Request, Response
from litestar.exceptions import HTTPException, NotFoundException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.types import ExceptionHandlersMap, Send

from exports.waits import ClientGone
from observability.requests import CLIENT_CLOSED_REQUEST, CLIENT_DISCONNECTED
from repositories.database import CommitOutcomeUnknown, DatabaseUnavailable, SchemaNotMigrated, TooLargeForDatabase
from repositories.domain import JOB_ID_RULE, InvalidParameter, JobResultNotFound
from repositories.job_results import JobResultExists, PreconditionFailed
from service.json_fidelity import MalformedJSON, UnfaithfulJSON
from service.methods import allow_header
from service.schemas import Problem

PROBLEM_MEDIA_TYPE = "application/problem+json"
log = structlog.get_logger("jobresults.errors")

_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    410: "Gone",
    412: "Precondition Failed",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    416: "Range Not Satisfiable",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    499: "Client Closed Request",
    500: "Internal Server Error",
    503: "Service Unavailable",
    507: "Insufficient Storage",
}


class ApiError(Exception):
    """An error raised by a controller that maps directly to a problem response."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        slug: str | None = None,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.slug = slug
        self.headers = headers or {}
        self.extensions = extensions


def problem_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI response entries documenting problem+json bodies for ``statuses``."""
    return {
        status: ResponseSpec(
            data_container=Problem, media_type=PROBLEM_MEDIA_TYPE, description=_TITLES[status], generate_examples=False
        )
        for status in statuses
    }


def problem_response(
    request: Request[Any, Any, Any],
    status: int,
    detail: str | None,
    *,
    slug: str | None = None,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> Response[bytes]:
    """Build an ``application/problem+json`` response.

    ``type`` is a ``tag:`` URI (RFC 4151, as RFC 9457 section 3.1.1 suggests for identifiers that
    are not meant to be dereferenced) naming ``slug``; without a slug, the status's title names it
    (``method-not-allowed``, ``content-too-large``, ...), so every problem has our own type.
    """
    return Response(
        content=problem_body(status, detail, request.url.path, slug=slug, **extensions),
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


def problem_body(
    status: int, detail: str | None, instance: str, *, slug: str | None = None, **extensions: Any
) -> bytes:
    """The JSON text of a problem (see :func:`problem_response`); ``instance`` is the request path."""
    slug = slug or _TITLES.get(status, "error").lower().replace(" ", "-")
    problem = Problem(
        type=f"tag:jobresults,2026:problem/{slug}",
        title=_TITLES.get(status, "Error"),
        status=status,
        detail=detail,
        instance=instance,
        **extensions,
    )
    return msgspec.json.encode(problem)


async def send_api_error(exc: ApiError, path: str, send: Send) -> None:
    """Answer an ASGI request with ``exc`` as problem+json, outside Litestar (for ASGI middleware)."""
    body = problem_body(exc.status, exc.detail, path, slug=exc.slug, **exc.extensions)
    headers = [
        (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
        (b"content-length", str(len(body)).encode()),
        *((name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in exc.headers.items()),
    ]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


INTERNAL_ERROR_DETAIL = "the server failed to handle the request; the X-Request-ID header names it in the server's logs"


def _api_error(request: Request[Any, Any, Any], exc: ApiError) -> Response[bytes]:
    return problem_response(request, exc.status, exc.detail, slug=exc.slug, headers=exc.headers, **exc.extensions)


_PUBLIC_NAMES = {"data": "body", "state_filter": "state"}
"""Handler parameter names as clients know them."""


def _validation_error(request: Request[Any, Any, Any], exc: ValidationException) -> Response[bytes]:
    errors = []
    for item in exc.extra or []:
        if isinstance(item, dict):
            source = item.get("source")
            errors.append(
                {
                    "name": _PUBLIC_NAMES.get(str(item.get("key", "")), str(item.get("key", ""))),
                    "source": str(getattr(source, "value", source) or ""),
                    "message": str(item.get("message", "")),
                }
            )
    detail = "; ".join(f"{e['name']}: {e['message']}" for e in errors) or "the request does not fit the API"
    return problem_response(request, 400, detail, slug="invalid-request", errors=errors or None)


def _client_gone(request: Request[Any, Any, Any]) -> Response[bytes] | None:
    """A 499 problem (never sent: nobody is listening) if the client has disconnected, else None."""
    if not request.scope.get("state", {}).get(CLIENT_DISCONNECTED):
        return None
    log.info("http.client_disconnected", path=request.url.path, method=request.method)
    return problem_response(request, CLIENT_CLOSED_REQUEST, "the client closed the connection", slug="client-closed")


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    if (gone := _client_gone(request)) is not None:
        return gone
    status = exc.status_code
    if isinstance(exc, NotFoundException) and _is_job_result_subpath(request.url.path):
        # /v1/job-results/a/b: a job id with a slash never matches a route; say what is allowed.
        return problem_response(request, 400, JOB_ID_RULE, slug="invalid-job-id")
    if status >= 500:
        log.error("http.server_error", status=status, error=exc.detail)
        return problem_response(request, status, INTERNAL_ERROR_DETAIL if status == 500 else None)
    detail = exc.detail if exc.detail and exc.detail != _TITLES.get(status) else None
    if status == 404 and detail is None:
        detail = "no such resource"
    if status == 413:
        detail = "request body is larger than the configured limit"
    headers = dict(exc.headers or {})
    if status == 405:
        headers = {name: value for name, value in headers.items() if name.lower() != "allow"}
        allowed = allow_header(request.app, request.url.path)
        if allowed:
            headers["Allow"] = allowed
        detail = (
            f"this method is not allowed here; allowed: {allowed}" if allowed else "this method is not allowed here"
        )
    return problem_response(request, status, _bounded(detail), headers=headers or None)


def _bounded(detail: str | None, limit: int = 300) -> str | None:
    """A framework error's detail, cut to ``limit`` characters (it may quote what the client sent)."""
    if detail is None or len(detail) <= limit:
        return detail
    return detail[:limit] + "..."


def _is_job_result_subpath(path: str) -> bool:
    prefix = "/v1/job-results/"
    return path.startswith(prefix) and "/" in path[len(prefix) :].strip("/")


def _invalid_parameter(request: Request[Any, Any, Any], exc: InvalidParameter) -> Response[bytes]:
    if exc.name is None:
        return problem_response(request, 400, str(exc), slug="invalid-request")
    source = "query" if exc.name in request.query_params else "body"
    errors = [{"name": exc.name.removeprefix("--"), "source": source, "message": str(exc)}]
    return problem_response(request, 400, str(exc), slug="invalid-request", errors=errors)


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    if (gone := _client_gone(request)) is not None:
        return gone
    log.exception("http.unhandled_exception", path=request.url.path, method=request.method)
    return problem_response(request, 500, INTERNAL_ERROR_DETAIL)


def _client_gone_while_waiting(request: Request[Any, Any, Any], exc: ClientGone) -> Response[bytes]:
    log.info("http.client_disconnected", path=request.url.path, method=request.method)
    return problem_response(request, CLIENT_CLOSED_REQUEST, "the client closed the connection", slug="client-closed")


def _not_found(request: Request[Any, Any, Any], exc: JobResultNotFound) -> Response[bytes]:
    return problem_response(request, 404, f"no job result with job_id {exc.args[0]!r}", slug="job-result-not-found")


def _precondition(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    if isinstance(exc, JobResultExists):
        detail = "a job result with this job_id already exists (If-None-Match: * allows create only)"
    else:
        detail = "the stored job result does not match the If-Match / If-None-Match condition"
    return problem_response(request, 412, detail, slug="precondition-failed")


COMMIT_OUTCOME_UNKNOWN_DETAIL = (
    "the connection to the database was lost while this change was being committed, and whether it "
    "took effect could not be determined: it may have been applied. Read the resource before retrying"
)


def _unavailable(request: Request[Any, Any, Any], exc: DatabaseUnavailable) -> Response[bytes]:
    log.error("db.unavailable", error=str(exc), cause=repr(exc.__cause__))
    if isinstance(exc, CommitOutcomeUnknown):
        return problem_response(
            request, 503, COMMIT_OUTCOME_UNKNOWN_DETAIL, slug="commit-outcome-unknown", headers={"Retry-After": "1"}
        )
    detail = str(exc) if isinstance(exc, SchemaNotMigrated) else "the database is unavailable; retry later"
    return problem_response(request, 503, detail, slug="database-unavailable", headers={"Retry-After": "1"})


def _too_large(request: Request[Any, Any, Any], exc: TooLargeForDatabase) -> Response[bytes]:
    log.warning("db.packet_too_large", error=str(exc.__cause__))
    return problem_response(
        request,
        413,
        "the document is larger than the database accepts (its max_allowed_packet); "
        "lower JOBRESULTS_MAX_BODY_BYTES or raise max_allowed_packet on the server",
        slug="too-large-for-database",
    )


def _malformed(request: Request[Any, Any, Any], exc: MalformedJSON) -> Response[bytes]:
    return problem_response(request, 400, f"malformed JSON: {exc}", slug="malformed-json")


def _unfaithful(request: Request[Any, Any, Any], exc: UnfaithfulJSON) -> Response[bytes]:
    return problem_response(
        request,
        422,
        f"cannot be stored faithfully: {exc.path}: {exc.reason}",
        slug="unfaithful-json",
        json_path=exc.path,
    )


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    ApiError: _api_error,
    ValidationException: _validation_error,
    InvalidParameter: _invalid_parameter,
    HTTPException: _http_error,
    JobResultNotFound: _not_found,
    JobResultExists: _precondition,
    PreconditionFailed: _precondition,
    DatabaseUnavailable: _unavailable,
    TooLargeForDatabase: _too_large,
    MalformedJSON: _malformed,
    UnfaithfulJSON: _unfaithful,
    ClientGone: _client_gone_while_waiting,
    Exception: _unexpected,
}
"""Exception type to handler; Litestar picks the most specific entry along the MRO."""
