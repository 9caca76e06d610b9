"""API v1: exports of one job or a time range to json, ndjson or csv files, and their download."""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal, cast

import msgspec
import structlog
from litestar import Controller, Request, Response, delete, get, post
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency
from litestar.enums import MediaType
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import HeaderParameter, JSONBody, PathParameter, QueryParameter
from litestar.response import Stream

from exports.columns import MAX_COLUMNS, ColumnSelection, InvalidColumn, parse_columns
from exports.files import StorageFull
from exports.formats import CsvTooWide
from exports.pipeline import STORAGE_FULL_MESSAGE, ExportNotCancellable, ExportService, ExportTooLarge
from exports.store import ExportStore, ObjectMissing, StoreError
from exports.waits import PENDING_STATES, ExportWaits, TooManyWaiters
from repositories.database import Database
from repositories.domain import (
    JOB_ID_RULE,
    Compression,
    ExportKind,
    ExportState,
    Format,
    JobResultNotFound,
    JobStatus,
    Scope,
    format_timestamp,
    parse_timestamp,
    utcnow,
)
from repositories.exports import (
    Export,
    ExportNotFound,
    ExportParameters,
    ExportRepository,
    TooManyPendingExports,
    label_terms,
)
from repositories.job_results import JobResultRepository
from service.controllers.job_results import checked_job_id, entity_tags, require_json_body
from service.idempotency import (
    Claim,
    IdempotencyKeys,
    Rendered,
    checked_key,
    json_body,
    request_hash,
    run_idempotent,
)
from service.json_fidelity import check_document
from service.labels import MAX_FILTER_TERMS, build_filter
from service.methods import is_head
from service.openapi import file_response
from service.problems import ApiError, problem_responses

log = structlog.get_logger("jobresults.exports")

EXPORT_ID = re.compile(r"[0-9a-f]{32}")
MEDIA_TYPES = {
    "json": "application/json",
    "ndjson": "application/x-ndjson",
    "csv": "text/csv",
}  # Litestar appends "; charset=utf-8" to text/*
EXPORT_WRITE_SCOPES: tuple[Scope, ...] = ("exports:write", "results:read")
"""Creating an export needs both: an export hands out job results, so it needs the right to read them."""
WAIT_MAX_S = 60
"""The longest ``wait`` of ``GET /v1/exports/{export_id}`` (seconds)."""
PENDING_RETRY_AFTER_S = 5
"""``Retry-After`` of a range export refused because its key has too many queued or running."""
GONE_STATES = ("expired", "deleted")
"""States whose content is 410 Gone: it existed and is no longer served."""
_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)")


Columns = Annotated[
    list[str],
    msgspec.Meta(
        min_length=1,
        max_length=MAX_COLUMNS,
        description=(
            "Only these columns, in this order: result paths in the CSV header notation (keys joined by `.`; "
            "inside a key `.` is written `\\.` and `\\` is written `\\\\`), or `\\labels.<key>` for a label. "
            "Each at most 1,024 characters and 64 keys, no empty key, no entry twice, 100,000 characters in "
            "all. csv: the header is `job_id,status,created_at` and these; json/ndjson: `result` holds just "
            "these paths. Leave out for every column."
        ),
        examples=[["summary.failed", "metrics.duration_ms"]],
    ),
]


def checked_columns(columns: list[str] | None) -> ColumnSelection | None:
    """``columns`` of an export request, parsed; None when not given.

    Raises:
        ApiError: 400 ``invalid-column`` naming the first invalid entry and the rule it breaks (also
            as the one entry of ``errors``, named ``columns``).
    """
    if columns is None:
        return None
    try:
        return parse_columns(columns)
    except InvalidColumn as exc:
        detail = str(exc)
        errors = [{"name": "columns", "source": "body", "message": detail}]
        raise ApiError(400, detail, slug="invalid-column", errors=errors) from None


class JobExportRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``POST /v1/job-results/{job_id}/exports``."""

    format: Format
    compression: Compression = "none"
    columns: Columns | None = None


LabelFilter = Annotated[
    list[str],
    msgspec.Meta(
        max_length=MAX_FILTER_TERMS,
        description=(
            "Label terms, as the `label` query parameter of the job result listing: `key:value` (split at the "
            "first `:`) or `key` (any value); values of one key ORed, keys ANDed; at most 8 keys, 32 terms."
        ),
        examples=[["branch:main", "tool:pytest", "tool:jest"]],
    ),
]


class RangeExportRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``POST /v1/exports``: results with ``created_from <= created_at < created_to`` (RFC 3339).

    ``status``, ``label`` and ``job_id_prefix`` narrow the range exactly as the listing's query
    parameters of the same names do (``service/labels.py``).
    """

    format: Format
    created_from: str
    created_to: str
    compression: Compression = "none"
    status: JobStatus | Annotated[list[JobStatus], msgspec.Meta(min_length=1)] | None = None
    label: LabelFilter | None = None
    job_id_prefix: str | None = None
    columns: Columns | None = None


class ExportRecord(msgspec.Struct, omit_defaults=True):
    """An export: what it covers, its state and progress, and where to download it once it succeeded."""

    export_id: str
    kind: ExportKind
    format: Format
    compression: Compression
    state: ExportState
    rows_written: int
    created_at: str
    job_id: str | None = None
    created_from: str | None = None
    created_to: str | None = None
    status: str | list[str] | None = None
    label: list[str] | None = None
    job_id_prefix: str | None = None
    columns: list[str] | None = None
    bytes: int | None = None
    sha256: str | None = None
    error: str | None = None
    requested_by: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    expires_at: str | None = None
    """When the export expires (its content is then 410 Gone): ``JOBRESULTS_EXPORT_RETENTION_DAYS`` after it
    finished; absent while it is queued or running."""
    content_url: str | None = None

    @classmethod
    def build(cls, export: Export, now: datetime | None = None) -> ExportRecord:
        """From a stored export; ``state`` as of ``now`` (naive UTC, default now): see :meth:`Export.visible_state`."""
        params = export.parameters
        state = export.visible_state(now or utcnow())
        return cls(
            export_id=export.export_id,
            kind=export.kind,
            format=export.format,
            compression=export.compression,
            state=state,
            rows_written=export.rows_written,
            created_at=format_timestamp(export.created_at),
            job_id=params.job_id,
            created_from=format_timestamp(params.created_from) if params.created_from else None,
            created_to=format_timestamp(params.created_to) if params.created_to else None,
            status=params.status,
            label=params.label,
            job_id_prefix=params.job_id_prefix,
            columns=list(params.columns) if params.columns is not None else None,
            bytes=export.bytes,
            sha256=export.sha256,
            error=export.error,
            requested_by=export.requested_by,
            started_at=format_timestamp(export.started_at) if export.started_at else None,
            finished_at=format_timestamp(export.finished_at) if export.finished_at else None,
            expires_at=format_timestamp(export.expires_at) if export.expires_at else None,
            content_url=f"/v1/exports/{export.export_id}/content" if state == "succeeded" else None,
        )


class ExportPage(msgspec.Struct):
    """A page of exports, newest first; pass ``next_cursor`` as ``cursor`` for the next page."""

    items: list[ExportRecord]
    next_cursor: str | None


def requested_by(request: Request[Any, Any, Any]) -> str:
    """Who asked for an export: ``key:<key_id>``, or ``ip:<address>`` when authentication is off."""
    key_id = request.scope["state"].get("api_key_id")
    if key_id:
        return f"key:{key_id}"
    client = request.client
    return f"ip:{client.host}" if client else "ip:unknown"


async def json_body_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Litestar guard (runs before the body is parsed): the body is JSON as PUT takes it.

    It must be declared JSON (else 415) and be JSON that PUT would accept too: duplicate keys are
    refused (422) the same way, not last-wins.
    """
    request = cast("Request[Any, Any, Any]", connection)
    require_json_body(request)
    check_document(await request.body())


def _storage_full() -> ApiError:
    return ApiError(507, STORAGE_FULL_MESSAGE, slug="insufficient-storage")


def _store_failed(exc: StoreError) -> ApiError:
    """503 with the store error's safe message (it never names keys, hosts or credentials)."""
    return ApiError(503, str(exc), slug="export-store-unavailable", headers={"Retry-After": "5"})


def _visible_to(request: Request[Any, Any, Any]) -> str | None:
    """With ``JOBRESULTS_EXPORTS_VISIBILITY=own``, the ``requested_by`` a caller may see; else None (all)."""
    if request.app.state.settings.exports_visibility == "own":
        return requested_by(request)
    return None


def _not_found(export_id: str) -> ApiError:
    """404 ``export-not-found``; the id is echoed only when it has the form of one (no arbitrary input)."""
    if EXPORT_ID.fullmatch(export_id):
        return ApiError(404, f"no export with id {export_id!r}", slug="export-not-found")
    return ApiError(404, "no such export: export ids are 32 lowercase hexadecimal characters", slug="export-not-found")


async def _get_export(db: Database, export_id: str, request: Request[Any, Any, Any]) -> Export:
    """The export, or 404 if it does not exist or (visibility ``own``) another key requested it."""
    not_found = _not_found(export_id)
    if not EXPORT_ID.fullmatch(export_id):
        raise not_found
    try:
        export = await db.run(lambda conn: ExportRepository(conn).get(export_id), transaction=False)
    except ExportNotFound:
        raise not_found from None
    owner = _visible_to(request)
    if owner is not None and export.requested_by != owner:
        raise not_found
    return export


async def _delete_or_cancel(
    request: Request[Any, Any, Any], exports: ExportService, export_id: str, *, cancel_only: bool
) -> Export:
    not_found = _not_found(export_id)
    if not EXPORT_ID.fullmatch(export_id):
        raise not_found
    try:
        return await exports.delete_export(export_id, _visible_to(request), cancel_only=cancel_only)
    except ExportNotFound:
        raise not_found from None
    except ExportNotCancellable as exc:
        raise ApiError(
            409,
            f"the export is {exc}; only a queued or running export can be cancelled (DELETE deletes a finished one)",
            slug="export-finished",
        ) from None


async def _wait_for_export(request: Request[Any, Any, Any], db: Database, export_id: str, wait_s: int) -> Export:
    """The export once it left ``queued``/``running``, or after ``wait_s`` seconds as it is then.

    Two reads (at the start, and after a wake-up or at the deadline) and no connection held between.
    The client hanging up ends the wait (:class:`ClientGone`, logged as 499).

    Raises:
        ApiError: 404 (as :func:`_get_export`), 503 ``too-many-waiters``.
        ClientGone: the client disconnected.
    """
    waits: ExportWaits = request.app.state.export_waits
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    try:
        with waits.waiting(export_id) as waiter:
            watcher = asyncio.ensure_future(_until_disconnect(request))
            try:
                export = await _get_export(db, export_id, request)
                while export.state in PENDING_STATES:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    woken = await waiter.wait(remaining, watcher)
                    export = await _get_export(db, export_id, request)
                    if not woken:
                        break
                return export
            finally:
                watcher.cancel()
    except TooManyWaiters as exc:
        raise ApiError(
            503,
            f"this server holds {exc.limit} waiting requests already (JOBRESULTS_EXPORT_WAIT_MAX); "
            "retry, or read the export without wait",
            slug="too-many-waiters",
            headers={"Retry-After": "1"},
        ) from None


async def _until_disconnect(request: Request[Any, Any, Any]) -> None:
    """Return when the client disconnects (ASGI ``http.disconnect``); the request has no body to read."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


IDEMPOTENCY_KEY_DESCRIPTION = (
    "Optional, 1-255 printable ASCII characters, scoped to the API key, kept 24 h (Stripe's semantics). "
    "The same key with the same request (method, path, raw body) answers the first response again "
    "(`Idempotent-Replayed: true`) and the export runs once; with another request, 422 "
    "`idempotency-key-reused`; while the first is running, 409 `idempotency-key-in-use`. 2xx and 4xx "
    "answers (other than 409/429) are kept; after a 5xx, 409 or 429 the key may be used again."
)


async def _idempotency(request: Request[Any, Any, Any], header: str | None) -> Claim | Response[bytes] | None:
    """The request's claim on its Idempotency-Key, its replayed response, or None without a key.

    Raises:
        ApiError: 400 (invalid key), 409 (in use), 422 (reused with another request).
    """
    key = checked_key(request) if header is not None else None
    if key is None:
        return None
    keys: IdempotencyKeys = request.app.state.idempotency
    digest = request_hash(request.method, request.url.path, await request.body())
    return await keys.begin(requested_by(request), key, digest)


def _created(status: int, export: Export) -> Rendered:
    """The response to a POST that recorded ``export``: ``(status, headers, body)``."""
    headers = {"Location": f"/v1/exports/{export.export_id}", "Content-Type": "application/json"}
    return status, headers, json_body(ExportRecord.build(export))


def _response(rendered: Rendered) -> Response[bytes]:
    status, headers, body = rendered
    return Response(
        content=body,
        status_code=status,
        headers={name: value for name, value in headers.items() if name != "Content-Type"},
        media_type=headers["Content-Type"],
    )


class JobExportController(Controller):
    """``POST /v1/job-results/{job_id}/exports``: export one job's result synchronously."""

    path = "/v1/job-results"
    tags = ["exports"]  # noqa: RUF012 - Litestar reads this class attribute

    @post(
        "/{job_id:str}/exports",
        opt={"scope": EXPORT_WRITE_SCOPES},
        summary="Export one job's result to a file",
        description=(
            "Synchronous: 201 with the export record once the file is complete and recorded. Reading the job "
            "and recording the export happen in one transaction on one snapshot. Takes `Idempotency-Key`."
        ),
        status_code=201,
        responses=problem_responses(400, 401, 403, 404, 409, 415, 422, 429, 503, 507),
        guards=[json_body_guard],
    )
    async def export_job(
        self,
        request: Request[Any, Any, Any],
        exports: NamedDependency[ExportService],
        job_id: Annotated[str, PathParameter(description=JOB_ID_RULE)],
        data: JSONBody[JobExportRequest],
        idempotency_key: Annotated[
            str | None, HeaderParameter(name="Idempotency-Key", description=IDEMPOTENCY_KEY_DESCRIPTION)
        ] = None,
    ) -> Response[ExportRecord]:
        """Write the job's result as ``format`` and return the export record."""
        checked_job_id(job_id)
        columns = checked_columns(data.columns)
        claim = await _idempotency(request, idempotency_key)
        if isinstance(claim, Response):
            return cast("Response[ExportRecord]", claim)  # the stored response, replayed

        def render(export: Export) -> Rendered:
            return _created(201, export)

        async def work() -> Response[bytes]:
            try:
                export = await exports.export_job(
                    job_id,
                    data.format,
                    data.compression,
                    requested_by(request),
                    columns=columns,
                    on_recorded=claim.recorder(render) if claim is not None else None,
                )
            except JobResultNotFound:
                raise ApiError(404, f"no job result with job_id {job_id!r}", slug="job-result-not-found") from None
            except StorageFull:
                raise _storage_full() from None
            except StoreError as exc:
                raise _store_failed(exc) from None
            except ExportTooLarge as exc:
                raise ApiError(507, str(exc), slug="export-too-large") from None
            except CsvTooWide as exc:
                raise ApiError(422, str(exc), slug="csv-too-wide") from None
            return _response(render(export))

        return await run_idempotent(request, claim, work)


class ExportController(Controller):
    """``/v1/exports``: range exports, export records and their content."""

    path = "/v1/exports"
    tags = ["exports"]  # noqa: RUF012 - Litestar reads this class attribute

    @post(
        "/",
        opt={"scope": EXPORT_WRITE_SCOPES},
        summary="Export a time range of job results to a file (asynchronous)",
        description=(
            "202 Accepted with `Location: /v1/exports/{export_id}`. The export runs in the background, "
            "survives restarts, and is done when its state is `succeeded` (or `failed`). A key may have "
            "`JOBRESULTS_EXPORTS_MAX_PENDING_PER_KEY` (default 10) range exports queued or running; "
            "one more is 429 with `Retry-After`. Workers take range exports round-robin across keys. "
            "`status` (one or a list), `label` and `job_id_prefix` select jobs as the listing's filters do; "
            "the export record shows them. Takes `Idempotency-Key`: the queued export and the key's stored "
            "answer are recorded in one transaction."
        ),
        status_code=202,
        responses=problem_responses(400, 401, 403, 409, 415, 422, 429, 503),
        guards=[json_body_guard],
    )
    async def create_range_export(
        self,
        request: Request[Any, Any, Any],
        exports: NamedDependency[ExportService],
        data: JSONBody[RangeExportRequest],
        idempotency_key: Annotated[
            str | None, HeaderParameter(name="Idempotency-Key", description=IDEMPOTENCY_KEY_DESCRIPTION)
        ] = None,
    ) -> Response[ExportRecord]:
        """Queue a range export."""
        lower = parse_timestamp(data.created_from, "created_from")
        upper = parse_timestamp(data.created_to, "created_to")
        if lower is not None and upper is not None and lower >= upper:
            raise ApiError(400, "created_from must be earlier than created_to", slug="invalid-request")
        columns = checked_columns(data.columns)
        statuses = [data.status] if isinstance(data.status, str) else data.status
        filters = build_filter(data.label, statuses, data.job_id_prefix)
        parameters = ExportParameters(
            created_from=lower,
            created_to=upper,
            status=data.status if isinstance(data.status, str) else list(filters.statuses) or None,
            label=label_terms(filters) or None,
            job_id_prefix=filters.job_id_prefix,
            columns=columns.columns if columns is not None else None,
        )
        claim = await _idempotency(request, idempotency_key)
        if isinstance(claim, Response):
            return cast("Response[ExportRecord]", claim)  # the stored response, replayed

        def render(export: Export) -> Rendered:
            return _created(202, export)

        async def work() -> Response[bytes]:
            try:
                export = await exports.enqueue_range(
                    parameters,
                    data.format,
                    data.compression,
                    requested_by(request),
                    on_recorded=claim.recorder(render) if claim is not None else None,
                )
            except TooManyPendingExports as exc:
                raise ApiError(
                    429,
                    f"this key has {exc.limit} range exports queued or running, the most allowed "
                    "(JOBRESULTS_EXPORTS_MAX_PENDING_PER_KEY); retry when one has finished",
                    slug="too-many-pending-exports",
                    headers={"Retry-After": str(PENDING_RETRY_AFTER_S)},
                ) from None
            return _response(render(export))

        return await run_idempotent(request, claim, work)

    @get(
        "/{export_id:str}",
        opt={"scope": "exports:read"},
        summary="Read an export's state and progress",
        description=(
            "With `wait=N` (whole seconds, 0..60), a long poll: the answer comes as soon as the export is "
            "no longer `queued` or `running` (whichever replica finished it), or after N seconds with its "
            "state then. The waiting request holds no database connection. Each process holds at most "
            "`JOBRESULTS_EXPORT_WAIT_MAX` (1000) waiting requests; one more is 503 `too-many-waiters` "
            "with `Retry-After`."
        ),
        responses=problem_responses(400, 401, 403, 404, 429, 503),
    )
    async def get_export(
        self,
        request: Request[Any, Any, Any],
        db: NamedDependency[Database],
        export_id: Annotated[str, PathParameter(description="Export id.")],
        wait: Annotated[
            int,
            QueryParameter(
                ge=0,
                le=WAIT_MAX_S,
                description=("Long poll: wait up to this many seconds (0..60) for the export to leave queued/running."),
            ),
        ] = 0,
    ) -> ExportRecord:
        """State, progress (rows written so far), size, sha256 and, once succeeded, the content URL."""
        if wait == 0:
            return ExportRecord.build(await _get_export(db, export_id, request))
        return ExportRecord.build(await _wait_for_export(request, db, export_id, wait))

    @delete(
        "/{export_id:str}",
        opt={"scope": "exports:write"},
        status_code=200,
        summary="Delete an export, or cancel it while it is queued or running",
        description=(
            "A queued or running export is cancelled (state `cancelled`): a worker running it stops within "
            "about a second and leaves no file. A succeeded (or expired) or failed export is deleted (state "
            "`deleted`): its file or object is removed and its content is 410 Gone from then on. Idempotent: "
            "a cancelled or deleted export is answered 200 with its record, unchanged. The record stays "
            "listable until it expires, then the purge removes it (404). With "
            "`JOBRESULTS_EXPORTS_VISIBILITY=own`, only the key that requested the export may delete it "
            "(404 for others)."
        ),
        responses=problem_responses(401, 403, 404, 429, 503),
    )
    async def delete_export(
        self,
        request: Request[Any, Any, Any],
        exports: NamedDependency[ExportService],
        export_id: Annotated[str, PathParameter(description="Export id.")],
    ) -> ExportRecord:
        """200 with the record as it is now (``cancelled`` or ``deleted``)."""
        return ExportRecord.build(await _delete_or_cancel(request, exports, export_id, cancel_only=False))

    @post(
        "/{export_id:str}/cancel",
        opt={"scope": "exports:write"},
        status_code=200,
        summary="Cancel a queued or running export",
        description=(
            "200 with the record, state `cancelled` (also when it was cancelled already). A worker running it "
            "stops within about a second and leaves no file. 409 if the export already finished (succeeded, "
            "failed, expired or deleted): use `DELETE` to delete a finished export."
        ),
        responses=problem_responses(401, 403, 404, 409, 429, 503),
    )
    async def cancel_export(
        self,
        request: Request[Any, Any, Any],
        exports: NamedDependency[ExportService],
        export_id: Annotated[str, PathParameter(description="Export id.")],
    ) -> ExportRecord:
        """200 with the cancelled record."""
        return ExportRecord.build(await _delete_or_cancel(request, exports, export_id, cancel_only=True))

    @get(
        "/",
        opt={"scope": "exports:read"},
        summary="List exports, newest first",
        responses=problem_responses(400, 401, 403, 429, 503),
    )
    async def list_exports(
        self,
        request: Request[Any, Any, Any],
        db: NamedDependency[Database],
        state_filter: Annotated[
            ExportState | None, QueryParameter(name="state", description="Only exports in this state.")
        ] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=1000, description="Page size, 1..1000.")] = 100,
        cursor: Annotated[str | None, QueryParameter(description="next_cursor of the previous page.")] = None,
    ) -> ExportPage:
        """A page of export records."""
        before_id = _decode_cursor(cursor) if cursor else None
        rows = await db.run(
            lambda conn: ExportRepository(conn).list(
                state=state_filter, before_id=before_id, limit=limit + 1, requested_by=_visible_to(request)
            ),
            transaction=False,
        )
        page = rows[:limit]
        next_cursor = _encode_cursor(page[-1].id) if len(rows) > limit else None
        return ExportPage(items=[ExportRecord.build(export) for export in page], next_cursor=next_cursor)

    @get(
        "/{export_id:str}/content",
        opt={"scope": "exports:read"},
        operation_class=file_response(
            {
                "application/json": "a json export",
                "application/x-ndjson": "an ndjson export",
                "text/csv": "a csv export (UTF-8, RFC 4180)",
                "application/gzip": "any export with compression gzip",
            }
        ),
        summary="Download an export's file",
        description=(
            "Streams the file with `Content-Disposition: attachment` and `ETag` (its sha256). Supports "
            "`Range: bytes=...` (206, or 416), `If-Range` and `If-None-Match`. 409 while the export is not "
            "finished (and for a failed or cancelled one), 410 Gone once it expired or was deleted. gzip "
            "exports are served as `application/gzip` (the file itself is gzip). With "
            "`JOBRESULTS_EXPORTS_DOWNLOAD=redirect`, answers 302 to a presigned URL of the object instead, "
            "valid for `JOBRESULTS_EXPORTS_URL_TTL_S` seconds but never past the export's `expires_at`."
        ),
        responses={
            302: ResponseSpec(data_container=None, description="Found: `Location` is a short-lived presigned URL"),
            206: ResponseSpec(
                data_container=bytes, description="Partial Content", media_type="application/octet-stream"
            ),
            **problem_responses(401, 403, 404, 409, 410, 416, 429, 503),
            304: ResponseSpec(data_container=None, description="Not Modified (If-None-Match)"),
        },
    )
    async def get_content(
        self,
        db: NamedDependency[Database],
        exports: NamedDependency[ExportService],
        request: Request[Any, Any, Any],
        export_id: Annotated[str, PathParameter(description="Export id.")],
        range_header: Annotated[str | None, HeaderParameter(name="Range")] = None,
        if_range: Annotated[str | None, HeaderParameter(name="If-Range")] = None,
        if_none_match: Annotated[str | None, HeaderParameter(name="If-None-Match")] = None,
    ) -> Response[bytes]:
        """The export's file, whole or one byte range (RFC 9110 section 14); 410 once expired or deleted."""
        export = await _get_export(db, export_id, request)
        now = utcnow()
        state = export.visible_state(now)
        if state in GONE_STATES:
            raise _gone(export, state)
        if export.kind == "job" and state == "succeeded" and not await _source_live(db, export, now):
            raise ApiError(
                410,
                "the job result this export was made from expired or was deleted; its content is no longer served",
                slug="export-source-gone",
            )
        if state != "succeeded" or not export.file_name or export.sha256 is None:
            raise ApiError(
                409,
                f"the export is {state}; its content is available once it succeeded",
                slug="export-not-ready",
            )
        settings = request.app.state.settings
        store = exports.store
        key = export.object_key or export.file_name
        etag = f'"{export.sha256}"'
        media_type = "application/gzip" if export.compression == "gzip" else MEDIA_TYPES[export.format]
        headers = {
            "ETag": etag,
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'attachment; filename="{export.file_name}"',
        }
        tags = entity_tags(if_none_match)
        if tags == "*" or (tags and etag in tags):
            not_modified: Response[bytes] = Response(content=b"", status_code=304, headers=headers)
            return not_modified
        if settings.exports_download == "redirect" and export.object_key:
            try:
                # A HEAD follows the redirect with HEAD, which a URL signed for GET refuses (403)
                url = await store.presigned_url(
                    export.object_key,
                    _url_ttl(export, now, settings.exports_url_ttl_s),
                    "HEAD" if is_head(request.scope) else "GET",
                )
            except StoreError as exc:
                raise _store_failed(exc) from None
            # The URL is a bearer secret: it goes in Location only, never into a log line.
            redirect: Response[bytes] = Response(
                content=b"",
                status_code=302,
                headers={"Location": url, "ETag": etag, "Cache-Control": "no-store"},
                media_type=MediaType.TEXT,  # an empty body, not JSON
            )
            return redirect
        try:
            size = await store.size(key)
        except ObjectMissing:
            raise ApiError(404, "the export's file is no longer available", slug="export-file-missing") from None
        except StoreError as exc:
            raise _store_failed(exc) from None
        start, end = 0, size - 1
        status = 200
        if range_header is not None and (if_range is None or if_range.strip() == etag):
            byte_range = _parse_range(range_header, size)
            if byte_range == "ignore":
                byte_range = (0, size - 1)
            if byte_range is None:
                raise ApiError(
                    416,
                    f"Range must be one satisfiable byte range of the {size}-byte file, e.g. bytes=0-1023",
                    slug="range-not-satisfiable",
                    headers={"Content-Range": f"bytes */{size}"},
                )
            if byte_range != (0, size - 1):
                start, end = byte_range
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        headers["Content-Length"] = str(end - start + 1 if size else 0)
        return Stream(  # type: ignore[return-value]
            _read(store, key, start, end + 1), status_code=status, media_type=media_type, headers=headers
        )


async def _source_live(db: Database, export: Export, now: datetime) -> bool:
    """Whether a single-job export's job result still stands: not expired, not deleted and created again.

    Expiry hides a result from every reader at once, before the purge deletes it and marks its exports
    deleted; a download of one of its exports must not outlive it either (nor a result written anew
    over the expired one, which is another result).
    """
    job_id = export.parameters.job_id
    if job_id is None:
        return True
    try:
        meta = await db.run(lambda conn: JobResultRepository(conn).get_meta(job_id, now), transaction=False)
    except JobResultNotFound:
        return False
    return meta.created_at <= export.created_at


def _gone(export: Export, state: str) -> ApiError:
    if state == "deleted":
        return ApiError(410, "the export was deleted; its file is gone", slug="export-deleted")
    expired = format_timestamp(export.expires_at) if export.expires_at else "its expiry"
    return ApiError(410, f"the export expired at {expired}; request a new one", slug="export-expired")


def _url_ttl(export: Export, now: datetime, ttl_s: int) -> int:
    """Seconds a presigned URL may be valid: the setting, but never past the export's ``expires_at``.

    Raises:
        ApiError: 410 when less than a second is left (a URL would outlive the export).
    """
    if export.expires_at is None:
        return ttl_s
    left = int((export.expires_at - now).total_seconds())
    if left < 1:
        raise _gone(export, "expired")
    return min(ttl_s, left)


def _parse_range(header: str, size: int) -> tuple[int, int] | Literal["ignore"] | None:
    """A single ``bytes=`` range as inclusive ``(start, end)``; None if unsatisfiable (416).

    Source: RFC 9110 section 14.2: a Range with another unit, a malformed one, or several ranges
    (not supported here) is ignored ("ignore"), and the whole file is sent with 200.
    """
    text = header.strip()
    if not text.lower().startswith("bytes=") or "," in text:
        return "ignore"
    match = _RANGE.fullmatch("bytes=" + text[6:].strip())
    if match is None:
        return "ignore"
    first, last = match.groups()
    if not first and not last:
        return "ignore"
    if size == 0:
        return None
    if not first:  # suffix: the last N bytes
        length = header_number(last)
        if length == 0:
            return None
        return max(0, size - length), size - 1
    start = header_number(first)
    if last and header_number(last) < start:
        return "ignore"
    if start >= size:
        return None
    end = min(header_number(last), size - 1) if last else size - 1
    return start, end


HEADER_NUMBER_MAX = 2**63 - 1
"""Header numbers are read up to this value (no file is larger); bigger ones count as this value."""


def header_number(digits: str) -> int:
    """A run of ASCII digits from a header as an int, capped at :data:`HEADER_NUMBER_MAX`.

    Never raises on length: CPython refuses to convert strings of more than 4300 digits, and a client
    chooses how many it sends. Leading zeros are dropped before the length is judged.
    """
    significant = digits.lstrip("0")
    if len(significant) > len(str(HEADER_NUMBER_MAX)):
        return HEADER_NUMBER_MAX
    return min(int(significant or "0"), HEADER_NUMBER_MAX)


async def _read(store: ExportStore, key: str, start: int, stop: int) -> AsyncIterator[bytes]:
    """The body: bytes ``[start, stop)`` from the store.

    Headers are sent by then, so a failure can only cut the response short (the client sees fewer bytes
    than Content-Length); it is logged.
    """
    try:
        async for chunk in store.read(key, start, stop):
            yield chunk
    except (ObjectMissing, StoreError) as exc:
        log.warning("export.download_cut_short", error=type(exc).__name__)
        raise


def _encode_cursor(export_pk: int) -> str:
    return base64.urlsafe_b64encode(str(export_pk).encode()).decode().rstrip("=")


def _decode_cursor(value: str) -> int:
    try:
        decoded = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
        if not decoded.isdigit():
            raise ValueError(decoded)
        return int(decoded)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise ApiError(
            400, "cursor is not valid: pass the next_cursor of a previous page unchanged", slug="invalid-request"
        ) from None
