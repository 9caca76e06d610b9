"""API v1: store, read, list and delete job results."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from datetime import datetime
from typing import Annotated, Any, Literal, NoReturn

import msgspec
from litestar import Controller, Request, Response, delete, get, put
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIFormat
from litestar.params import HeaderParameter, PathParameter, QueryParameter

from exports.pipeline import ExportService
from repositories.database import Connection, Database, TooLargeForDatabase
from repositories.domain import (
    JOB_ID_RULE,
    STATUS_CHOICES,
    InvalidParameter,
    JobResultNotFound,
    JobStatus,
    format_timestamp,
    is_valid_job_id,
    parse_timestamp,
    utcnow,
)
from repositories.exports import Export, ExportRepository
from repositories.job_results import (
    Cursor,
    Document,
    EscapedText,
    JobResultMeta,
    JobResultRepository,
    PreconditionFailed,
    etag_of,
    read_max_allowed_packet,
)
from repositories.webhook_events import emitting, job_result_deleted, job_result_event
from service.json_fidelity import MAX_DEPTH, check_document, check_envelope_streaming
from service.labels import MAX_FILTER_TERMS, build_filter, check_labels
from service.openapi import json_request_body
from service.problems import ApiError, problem_responses
from service.schemas import JobResult, JobResultPage, JobResultSummary, JobResultWrite

JSON = "application/json"
_WRITE_DECODER = msgspec.json.Decoder(JobResultWrite)
_CURSOR_DECODER = msgspec.json.Decoder(Cursor)
_ENCODER = msgspec.json.Encoder()
_WRITE_SHAPE = (
    f'expected {{"status": {STATUS_CHOICES}, "result": <any JSON value>, '
    '"labels": {<key>: <string>, ...} (optional), optionally "retention_days": 1..3650 or "pinned": true}'
)
INLINE_CHECK_BYTES = 64 * 1024
"""Bodies up to this size are checked on the event loop (a few milliseconds at worst, whatever their
shape); larger ones in a worker thread, by the streaming check, so the loop keeps serving."""
_ESCAPED_BYTES = (b"\\", b"'", b'"', b"\n", b"\r", b"\0", b"\x1a")
"""Bytes that :func:`repositories.database.escape_text` doubles: one more byte each in the statement."""
_STATEMENT_SLACK = 64
"""At least this many bytes of an INSERT or UPDATE of a job result come on top of the escaped body
(the statement text, minus the escaped envelope ``{"status": ..., "result": ...}``)."""


def require_json_body(request: Request[Any, Any, Any]) -> None:
    """Raise ApiError 415 unless the body is declared as uncompressed JSON."""
    media_type = request.content_type[0]
    if media_type != JSON and not media_type.endswith("+json"):
        raise ApiError(415, f"Content-Type must be {JSON}", slug="unsupported-media-type")
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ApiError(
            415, "Content-Encoding is not supported; send the body uncompressed", slug="unsupported-media-type"
        )


def checked_job_id(job_id: str) -> str:
    """Return ``job_id`` if it follows :data:`JOB_ID_RULE`; else raise ApiError (400)."""
    if not is_valid_job_id(job_id):
        raise ApiError(400, JOB_ID_RULE, slug="invalid-job-id")
    return job_id


def entity_tags(header: str | None, *, weak: bool = True) -> set[str] | Literal["*"] | None:
    """Parse ``If-Match`` / ``If-None-Match`` (RFC 9110 section 13.1) into ``*`` or a set of tags.

    With ``weak`` (If-None-Match: weak comparison) a ``W/`` prefix is dropped; without it (If-Match:
    strong comparison, RFC 9110 section 8.8.3.2) weak tags are left out, so they never match.
    """
    if header is None:
        return None
    header = header.strip()
    if header == "*":
        return "*"
    tags = set()
    for tag in (part.strip() for part in header.split(",")):
        if tag.startswith("W/"):
            if weak:
                tags.add(tag[2:])
        elif tag:
            tags.add(tag)
    return tags


def _encode_cursor(meta: JobResultMeta) -> str:
    raw = _ENCODER.encode(Cursor(created_at=meta.created_at, id=meta.id))
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(value: str) -> Cursor:
    invalid = ApiError(
        400, "cursor is not valid: pass the next_cursor of a previous page unchanged", slug="invalid-request"
    )
    try:
        cursor = _CURSOR_DECODER.decode(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise invalid from None
    if cursor.created_at.tzinfo is not None:
        # We write naive UTC; a UTC offset in a cursor was forged and would be dropped by the driver.
        raise invalid
    return cursor


def _decode_write(body: bytes) -> tuple[JobResultWrite, str]:
    """Decode a small PUT body (at most :data:`INLINE_CHECK_BYTES`): the body and its result as JSON text.

    The whole body is checked for fidelity first (so duplicate keys are refused in the envelope too),
    then decoded into :class:`JobResultWrite` with the result kept raw.

    Raises:
        ApiError: 400 when the body does not fit the API.
        MalformedJSON: 400, not JSON or not UTF-8.
        UnfaithfulJSON: 422, with the JSON path of the offending value.
    """
    check_document(body, max_depth=MAX_DEPTH + 1)  # the envelope is one level
    write = _decode_checked(body)
    _check_labels(write.labels)
    return write, bytes(write.result).decode("utf-8")


def _decode_checked(body: bytes) -> JobResultWrite:
    try:
        return _WRITE_DECODER.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        detail = str(exc).replace("`$.", "`")
        raise ApiError(400, f"invalid body: {detail}; {_WRITE_SHAPE}", slug="invalid-body") from None


def _check_labels(labels: dict[str, str]) -> None:
    """400 ``invalid-labels`` naming the label and the rule it breaks (``service/labels.py``)."""
    try:
        check_labels(labels)
    except InvalidParameter as exc:
        raise ApiError(400, str(exc), slug="invalid-labels") from None


def _decode_large_write(body: bytes, max_packet: int) -> tuple[JobResultWrite, EscapedText]:
    """Decode a large PUT body (blocking: run it in a worker thread); the result comes back escaped.

    The cheap size check comes first: a body whose statement cannot fit the server's
    ``max_allowed_packet`` is refused before the fidelity check runs. The envelope is read from the
    spans the streaming check found, so the body is parsed once.

    Raises:
        TooLargeForDatabase: 413, the statement would pass ``max_packet`` bytes.
        ApiError, MalformedJSON, UnfaithfulJSON: as :func:`_decode_write`.
    """
    escaped_size = len(body) + sum(body.count(byte) for byte in _ESCAPED_BYTES)
    if escaped_size + _STATEMENT_SLACK > max_packet:
        raise TooLargeForDatabase(f"a statement of at least {escaped_size} bytes passes max_allowed_packet")
    text, members = check_envelope_streaming(body, max_depth=MAX_DEPTH + 1)
    if not members and not text.lstrip(" \t\n\r").startswith("{"):
        _invalid_body("Expected `object`")
    # The envelope without the document (small), decoded by the same struct as small bodies, so both
    # paths accept and refuse the same fields with the same messages.
    envelope = ",".join(
        json.dumps(name) + ":" + ("null" if name == "result" else text[start:end])
        for name, (start, end) in members.items()
    )
    fields = _decode_checked(("{" + envelope + "}").encode())
    _check_labels(fields.labels)
    start, end = members["result"]
    result = text[start:end]
    raw = body[start:end] if len(text) == len(body) else result.encode("utf-8")  # ASCII: same offsets
    return msgspec.structs.replace(fields, result=msgspec.Raw(raw)), EscapedText(result)


def _invalid_body(detail: str) -> NoReturn:
    raise ApiError(400, f"invalid body: {detail}; {_WRITE_SHAPE}", slug="invalid-body")


def _large_check_lock(request: Request[Any, Any, Any]) -> asyncio.Lock:
    """One large body is checked at a time per process.

    The check is Python code holding the GIL: threads running it side by side finish no sooner, but
    each one more makes the event loop wait longer for the GIL, and holds one more body's working set.
    """
    state = request.app.state
    lock: asyncio.Lock | None = getattr(state, "large_check_lock", None)
    if lock is None:
        lock = state.large_check_lock = asyncio.Lock()
    return lock


async def _max_allowed_packet(request: Request[Any, Any, Any], db: Database) -> int:
    """The server's ``max_allowed_packet``, read once per process.

    A changed setting shows in new sessions only; the server's own 1153 refusal stays the final word.
    """
    state = request.app.state
    cached: int | None = getattr(state, "max_allowed_packet", None)
    if cached is None:
        cached = await db.run(read_max_allowed_packet, transaction=False)
        state.max_allowed_packet = cached
    return cached


Tags = set[str] | Literal["*"] | None
"""Parsed ``If-Match`` / ``If-None-Match`` (:func:`entity_tags`)."""


async def store_write(
    repo: JobResultRepository,
    job_id: str,
    write: JobResultWrite,
    text: Document,
    match_tags: Tags = None,
    none_match_tags: Tags = None,
    *,
    likely_exists: bool = False,
    default_days: int | None = None,
    now: datetime | None = None,
) -> tuple[JobResultMeta, bool]:
    """Store one checked write inside a unit of work: ``(meta, created)``. PUT and batch items use it.

    ``text`` is ``write.result`` checked for fidelity. ``none_match_tags == "*"`` creates only;
    ``match_tags`` replaces only if the current ETag is among them (RFC 9110 section 13.1.1); other
    ``none_match_tags`` replace only if it is not. The decision is taken under the row lock.
    ``likely_exists`` (an unconditional write to a job id just seen stored) tries the UPDATE first,
    saving the INSERT that would fail. ``now`` (naive UTC; default: the clock now) is the write's one
    clock reading: which rows have expired, the timestamps, and the new ``expires_at`` (from
    ``write``, else ``default_days``: ``JOBRESULTS_RESULT_RETENTION_DAYS``). An expired row that the
    purge has not deleted yet counts as absent.

    Raises:
        PreconditionFailed, JobResultExists: the condition does not hold (412).
    """
    now = now or utcnow()
    expires_at = write.expires_at(now, default_days)
    if none_match_tags == "*":
        return await repo.create(
            job_id, write.status, text, write.labels, expires_at=expires_at, pinned=write.pinned, now=now
        ), True
    if match_tags is not None or none_match_tags:
        try:
            current = await repo.lock_meta(job_id, now)
        except JobResultNotFound:
            if match_tags is not None:
                raise PreconditionFailed(job_id) from None
            return await repo.create(
                job_id, write.status, text, write.labels, expires_at=expires_at, pinned=write.pinned, now=now
            ), True
        if match_tags not in (None, "*") and etag_of(current) not in match_tags:
            raise PreconditionFailed(job_id)
        if isinstance(none_match_tags, set) and etag_of(current) in none_match_tags:
            raise PreconditionFailed(job_id)
        return await repo.replace(
            job_id, write.status, text, write.labels, expires_at=expires_at, pinned=write.pinned, now=now
        ), False
    if likely_exists:
        try:
            return await repo.replace(
                job_id, write.status, text, write.labels, expires_at=expires_at, pinned=write.pinned, now=now
            ), False
        except JobResultNotFound:
            pass  # deleted (or expired) since it was seen: create it
    return await repo.upsert(
        job_id, write.status, text, write.labels, expires_at=expires_at, pinned=write.pinned, now=now
    )


class JobResultController(Controller):
    """``/v1/job-results``: one JSON document per job id."""

    path = "/v1/job-results"
    tags = ["job results"]  # noqa: RUF012 - Litestar reads this class attribute

    @put(
        "/{job_id:str}",
        opt={"scope": "results:write"},
        operation_class=json_request_body(JobResultWrite),
        summary="Store a job result",
        description=(
            "201 when created, 200 when replaced. `If-None-Match: *` creates only; `If-Match: <etag>` "
            "replaces only if unchanged (412 otherwise). 422 names the JSON path of a value that "
            "cannot be stored faithfully. `labels` replaces all the job's labels (none when absent); "
            "a label that breaks a rule is 400 `invalid-labels` naming it. A PUT replaces everything: "
            "`retention_days` (counted from this write) or `pinned: true` apply only if given again, else "
            "the service default. An expired result counts as absent: a PUT creates it anew (201, version 1)."
        ),
        responses={
            201: ResponseSpec(data_container=JobResult, description="Created"),
            **problem_responses(400, 401, 403, 412, 413, 415, 422, 429, 503),
        },
        status_code=200,
    )
    async def put_job_result(
        self,
        request: Request[Any, Any, Any],
        db: NamedDependency[Database],
        job_id: Annotated[str, PathParameter(description=JOB_ID_RULE)],
        if_match: Annotated[str | None, HeaderParameter(name="If-Match")] = None,
        if_none_match: Annotated[str | None, HeaderParameter(name="If-None-Match")] = None,
    ) -> Response[JobResult]:
        """Create or replace the job result of ``job_id``."""
        checked_job_id(job_id)
        require_json_body(request)
        body = await request.body()
        text: Document
        if len(body) <= INLINE_CHECK_BYTES:
            write, text = _decode_write(body)
        else:
            max_packet = await _max_allowed_packet(request, db)
            async with _large_check_lock(request):
                write, text = await asyncio.to_thread(_decode_large_write, body, max_packet)
        match_tags = entity_tags(if_match, weak=False)
        none_match_tags = entity_tags(if_none_match)
        default_days: int | None = request.app.state.settings.result_retention_days

        async def unit(conn: Connection) -> tuple[JobResultMeta, bool]:
            # One clock reading per attempt: expiry of the old row, the new expires_at and the timestamps.
            now = utcnow()
            return await store_write(
                JobResultRepository(conn),
                job_id,
                write,
                text,
                match_tags,
                none_match_tags,
                now=now,
                default_days=default_days,
            )

        meta, created = await db.run(emitting(unit, job_result_event))
        headers = {"ETag": etag_of(meta)}
        if created:
            headers["Location"] = f"{self.path}/{job_id}"
        return Response(
            content=JobResult.build(meta, write.result, write.labels),
            status_code=201 if created else 200,
            headers=headers,
        )

    @get(
        "/{job_id:str}",
        opt={"scope": "results:read"},
        summary="Read a job result",
        description=(
            "`If-None-Match` with the current ETag gives 304. The result comes back as stored. 404 once "
            "it expired, even before the purge deleted it."
        ),
        responses={304: ResponseSpec(data_container=None, description="Not Modified")}
        | problem_responses(400, 401, 403, 404, 429, 503),
    )
    async def get_job_result(
        self,
        db: NamedDependency[Database],
        job_id: Annotated[str, PathParameter(description=JOB_ID_RULE)],
        if_none_match: Annotated[str | None, HeaderParameter(name="If-None-Match")] = None,
    ) -> Response[JobResult]:
        """The stored job result; its JSON passes through as stored, never decoded."""
        checked_job_id(job_id)
        row = await db.run(lambda conn: JobResultRepository(conn).get(job_id, utcnow()), transaction=False)
        etag = etag_of(row.meta)
        tags = entity_tags(if_none_match)
        if tags == "*" or (tags and etag in tags):
            not_modified: Response[Any] = Response(content=b"", status_code=304, headers={"ETag": etag})
            return not_modified
        return Response(content=JobResult.build(row.meta, row.result, row.labels), headers={"ETag": etag})

    @get(
        "/",
        opt={"scope": "results:read"},
        summary="List job results by time range",
        description=(
            "Half-open range `created_from <= created_at < created_to` (RFC 3339, any offset), oldest "
            "first, keyset-paginated: pass `next_cursor` back as `cursor`. Items carry metadata only "
            "unless `include=result`; then a page also ends before its documents would pass "
            "`JOBRESULTS_LIST_MAX_BYTES` (8 MiB by default) in total, though it always holds at least one "
            "item, and `next_cursor` continues after its last item, so nothing is skipped. Filters (all "
            "ANDed): `label=key:value` (repeatable; values of one key ORed, split at the first `:`), "
            "`label=key` (the label exists), `status` (repeatable, ORed), `job_id_prefix`. At most 8 label "
            "keys and 32 label terms. Expired results are never listed."
        ),
        responses=problem_responses(400, 401, 403, 429, 503),
    )
    async def list_job_results(
        self,
        request: Request[Any, Any, Any],
        db: NamedDependency[Database],
        created_from: Annotated[
            str | None,
            QueryParameter(description="Inclusive lower bound, RFC 3339 with offset.", format=OpenAPIFormat.DATE_TIME),
        ] = None,
        created_to: Annotated[
            str | None,
            QueryParameter(description="Exclusive upper bound, RFC 3339 with offset.", format=OpenAPIFormat.DATE_TIME),
        ] = None,
        status: Annotated[
            list[JobStatus] | None,
            QueryParameter(description="Only these statuses (repeatable, ORed)."),
        ] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=1000, description="Page size, 1..1000.")] = 100,
        cursor: Annotated[str | None, QueryParameter(description="next_cursor of the previous page.")] = None,
        include: Annotated[
            Literal["result"] | None, QueryParameter(description="`result` adds each job's document.")
        ] = None,
        label: Annotated[
            list[str] | None,
            QueryParameter(
                description=(
                    "`key:value` (this label with this value) or `key` (this label, any value); repeatable: "
                    "values of one key are ORed, keys ANDed. At most 8 keys, 32 terms."
                ),
                max_items=MAX_FILTER_TERMS,
            ),
        ] = None,
        job_id_prefix: Annotated[
            str | None, QueryParameter(description="Only job ids starting with this (1 to 128 job id characters).")
        ] = None,
        pinned: Annotated[
            Literal["true", "false"] | None,
            QueryParameter(description="`true`: only pinned results; `false`: only results that are not pinned."),
        ] = None,
        expires_before: Annotated[
            str | None,
            QueryParameter(
                description=(
                    "Only results that expire before this time (RFC 3339 with offset); results that never "
                    "expire are left out."
                ),
                format=OpenAPIFormat.DATE_TIME,
            ),
        ] = None,
    ) -> Response[JobResultPage]:
        """A page of live job results in ``[created_from, created_to)`` that pass the filters."""
        filters = build_filter(label, status, job_id_prefix)
        lower = parse_timestamp(created_from, "created_from")
        upper = parse_timestamp(created_to, "created_to")
        expiring_before = parse_timestamp(expires_before, "expires_before")
        if lower is not None and upper is not None and lower >= upper:
            raise ApiError(400, "created_from must be earlier than created_to", slug="invalid-request")
        after = _decode_cursor(cursor) if cursor is not None else None
        include_result = include == "result"
        max_bytes = request.app.state.settings.list_max_bytes
        page, more = await db.run(
            lambda conn: JobResultRepository(conn).list(
                created_from=lower,
                created_to=upper,
                status=None,
                filters=filters,
                after=after,
                limit=limit,
                include_result=include_result,
                max_bytes=max_bytes,
                pinned=None if pinned is None else pinned == "true",
                expires_before=expiring_before,
                now=utcnow(),
            ),
            transaction=False,
        )
        items = [
            JobResultSummary(
                job_id=row.meta.job_id,
                status=row.meta.status,
                created_at=format_timestamp(row.meta.created_at),
                updated_at=format_timestamp(row.meta.updated_at),
                etag=etag_of(row.meta),
                labels=row.labels,
                expires_at=None if row.meta.expires_at is None else format_timestamp(row.meta.expires_at),
                pinned=row.meta.pinned,
                result=msgspec.Raw(row.result) if include_result else msgspec.UNSET,
            )
            for row in page
        ]
        next_cursor = _encode_cursor(page[-1].meta) if more else None
        return Response(content=JobResultPage(items=items, next_cursor=next_cursor))

    @delete(
        "/{job_id:str}",
        opt={"scope": "results:write"},
        summary="Delete a job result",
        description=(
            "`If-Match: <etag>` deletes only if unchanged (412 otherwise). The job's single-job exports are "
            "deleted with it (state `deleted`, content 410 Gone); range exports keep their data until they "
            "expire or are deleted."
        ),
        responses=problem_responses(400, 401, 403, 404, 412, 429, 503),
    )
    async def delete_job_result(
        self,
        db: NamedDependency[Database],
        exports: NamedDependency[ExportService],
        job_id: Annotated[str, PathParameter(description=JOB_ID_RULE)],
        if_match: Annotated[str | None, HeaderParameter(name="If-Match")] = None,
    ) -> None:
        """Delete the job result and its single-job exports; 204, or 404 if there is none."""
        checked_job_id(job_id)
        match_tags = entity_tags(if_match, weak=False)
        cascaded: list[Export] = []

        async def unit(conn: Connection) -> None:
            now = utcnow()
            repo = JobResultRepository(conn)
            if match_tags is not None:
                try:
                    current = await repo.lock_meta(job_id, now)
                except JobResultNotFound:
                    raise PreconditionFailed(job_id) from None
                if match_tags != "*" and etag_of(current) not in match_tags:
                    raise PreconditionFailed(job_id)
            await repo.delete(job_id, now)
            # In the same unit: the job's exports are deleted with it (files go after the COMMIT).
            cascaded[:] = await ExportRepository(conn).delete_job_exports(job_id, retention=exports.retention)

        await db.run(emitting(unit, lambda _: job_result_deleted(job_id)))
        if cascaded:
            await exports.job_exports_deleted(cascaded)

    @put("/", include_in_schema=False, opt={"scope": "results:write", "advertised": False})
    async def put_without_id(self) -> None:
        """``PUT /v1/job-results/`` names no job: 400 saying what a job id is."""
        raise ApiError(400, JOB_ID_RULE, slug="invalid-job-id")

    @delete("/", include_in_schema=False, opt={"scope": "results:write", "advertised": False})
    async def delete_without_id(self) -> None:
        """``DELETE /v1/job-results/`` names no job: 400 saying what a job id is."""
        raise ApiError(400, JOB_ID_RULE, slug="invalid-job-id")
