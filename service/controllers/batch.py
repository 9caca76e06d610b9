"""API v1: ``POST /v1/job-results:batch``, many job results in one all-or-nothing transaction.

The rule: every item is checked first (the PUT's job-id, body and JSON fidelity checks, plus one
item per job id); if any item is refused, the answer names every refused item and nothing is stored.
Otherwise all items are written in one unit of work (retried as a whole by ``Database.run``), each
through the same code as a PUT (:func:`store_write`), with its webhook event in the same transaction.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, post
from litestar.di import NamedDependency

from repositories.database import Connection, Database
from repositories.domain import JOB_ID_RULE, STATUS_CHOICES, format_timestamp, is_valid_job_id, utcnow
from repositories.job_results import (
    Document,
    EscapedText,
    JobResultExists,
    JobResultMeta,
    JobResultRepository,
    NewJobResult,
    etag_of,
)
from repositories.job_results import PreconditionFailed as StoredPreconditionFailed
from repositories.webhook_events import emitting_each, job_result_event
from service.controllers.job_results import (
    _ESCAPED_BYTES,
    _STATEMENT_SLACK,
    INLINE_CHECK_BYTES,
    Tags,
    _large_check_lock,
    _max_allowed_packet,
    entity_tags,
    require_json_body,
    store_write,
)
from service.json_fidelity import (
    MAX_DEPTH,
    MalformedJSON,
    UnfaithfulJSON,
    check_document,
    check_document_streaming,
)
from service.openapi import json_request_body
from service.problems import ApiError, problem_responses
from service.schemas import (
    BATCH_MAX_ITEMS,
    BatchItem,
    BatchItemResult,
    BatchResult,
    BatchWrite,
    JobResultWrite,
)

BATCH_PATH = "/v1/job-results:batch"


class _Envelope(msgspec.Struct, forbid_unknown_fields=True):
    """The body split into its items, each kept raw (a view of the body, no copy) until checked."""

    items: Annotated[list[msgspec.Raw], msgspec.Meta(min_length=1, max_length=BATCH_MAX_ITEMS)]


class _JobIdPeek(msgspec.Struct):
    """Reads only ``job_id`` from an item, whatever else it holds, to name a refused item."""

    job_id: Any = None


_ENVELOPE_DECODER = msgspec.json.Decoder(_Envelope)
_ITEM_DECODER = msgspec.json.Decoder(BatchItem)
_PEEK_DECODER = msgspec.json.Decoder(_JobIdPeek)
_ENVELOPE_HEAD = re.compile(rb'[ \t\n\r]*\{[ \t\n\r]*"items"[ \t\n\r]*:[ \t\n\r]*\[[ \t\n\r]*')
_ITEM_GAP = re.compile(rb"[ \t\n\r]*,[ \t\n\r]*")
_ENVELOPE_TAIL = re.compile(rb"[ \t\n\r]*\][ \t\n\r]*\}[ \t\n\r]*")
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SHAPE = (
    f'expected {{"items": [{{"job_id": "...", "status": {STATUS_CHOICES}, '
    f'"result": <any JSON value>}}, ...] with 1 to {BATCH_MAX_ITEMS} items'
)
SMALL_ITEM_BYTES = 4096
"""In a worker thread, items up to this size are checked by :func:`check_document` (a few milliseconds
at worst whatever their shape), larger ones by the streaming check."""
_ECHO_LIMIT = 200
"""Characters of a refused item's job id echoed back in ``errors``."""


@dataclass(slots=True)
class CheckedItem:
    """An item that passed every check: its position, the PUT body, the document to store, its condition."""

    index: int
    job_id: str
    write: BatchItem
    document: Document
    match_tags: Tags
    none_match_tags: Tags
    size: int
    """Upper bound of the document's bytes in a statement (escaped)."""


class _Refusals:
    """The refused items of one batch, as ``errors`` entries of the problem."""

    def __init__(self) -> None:
        self.errors: list[dict[str, str | int]] = []
        self.statuses: set[int] = set()

    def add(
        self, index: int, job_id: object, status: int, slug: str, message: str, json_path: str | None = None
    ) -> None:
        entry: dict[str, str | int] = {
            "name": f"items[{index}]",
            "source": "body",
            "index": index,
            "status": status,
            "type": f"tag:jobresults,2026:problem/{slug}",
            "message": message,
        }
        if isinstance(job_id, str):
            entry["job_id"] = job_id if len(job_id) <= _ECHO_LIMIT else job_id[:_ECHO_LIMIT] + "..."
        if json_path is not None:
            entry["json_path"] = json_path
        self.errors.append(entry)
        self.statuses.add(status)

    def raise_if_any(self, total: int) -> None:
        """Raise the batch's ApiError if any item was refused: 413, else 400, else 422 (all fidelity)."""
        if not self.errors:
            return
        status = 413 if 413 in self.statuses else 400 if 400 in self.statuses else 422
        slug = {413: "too-large-for-database", 400: "invalid-batch", 422: "unfaithful-json"}[status]
        detail = (
            f"{len(self.errors)} of {total} items refused (see errors: each names the item by index and "
            "job_id, and why); nothing was stored"
        )
        raise ApiError(status, detail, slug=slug, errors=self.errors)


def _invalid(detail: str) -> ApiError:
    return ApiError(400, f"invalid body: {detail}; {_SHAPE}", slug="invalid-body")


def _split(body: bytes) -> list[bytes]:
    """The items of a batch body, each as its own JSON text; the envelope must be exactly ``{"items": [...]}``.

    Raises:
        ApiError: 400 (not JSON, wrong shape, no items or more than :data:`BATCH_MAX_ITEMS`); 422 when
        ``items`` appears twice (the PUT refuses duplicate keys anywhere in its body too).
    """
    source = body
    try:
        raws = _ENVELOPE_DECODER.decode(body)
    except msgspec.ValidationError as exc:
        raise _invalid(str(exc)) from None
    except msgspec.DecodeError as exc:
        # msgspec refuses a lone surrogate escape, which the item's own check names (422). Masking
        # every surrogate escape with one of the same length keeps the structure and the offsets.
        if not _SURROGATE.search(body):
            raise ApiError(400, f"malformed JSON: {exc}", slug="malformed-json") from None
        source = _SURROGATE.sub(rb"\\ufffd", body)
        try:
            raws = _ENVELOPE_DECODER.decode(source)
        except (msgspec.ValidationError, msgspec.DecodeError):
            raise ApiError(400, f"malformed JSON: {exc}", slug="malformed-json") from None
    # msgspec keeps the last of duplicate keys: check that the items found are the whole body, in order.
    head = _ENVELOPE_HEAD.match(source)
    pos = head.end() if head else -1
    spans: list[tuple[int, int]] = []
    for number, raw in enumerate(raws.items):
        if pos < 0:
            break
        gap = _ITEM_GAP.match(source, pos) if number else None
        start = gap.end() if gap else pos if number == 0 else -1
        end = start + len(raw)
        pos = end if start >= 0 and source[start:end] == memoryview(raw).tobytes() else -1
        spans.append((start, end))
    if pos < 0 or _ENVELOPE_TAIL.fullmatch(source, pos) is None:
        raise ApiError(
            422,
            "cannot be stored faithfully: $.items: duplicate object key; each key may appear once "
            '(the body must be one object with the single member "items", its name written plainly)',
            slug="unfaithful-json",
            json_path="$.items",
        )
    return [body[start:end] for start, end in spans]


def _escaped_size(data: bytes) -> int:
    return len(data) + sum(data.count(byte) for byte in _ESCAPED_BYTES)


def _job_id_of(raw: bytes) -> object:
    """The ``job_id`` an item names (to name it when refused), or None if it cannot be read."""
    for text in (raw, _SURROGATE.sub(rb"\\ufffd", raw)):
        try:
            return _PEEK_DECODER.decode(text).job_id
        except (msgspec.ValidationError, msgspec.DecodeError):
            continue
    return None


def check_batch(body: bytes, max_packet: int | None, *, in_thread: bool = False) -> list[CheckedItem]:
    """Check a whole batch body; every item's problem is collected before anything is refused.

    Order of the checks, cheapest first: the envelope (1 to 1,000 items); with ``max_packet`` (the
    server's ``max_allowed_packet``), that every item's statement fits it, before any fidelity check
    (issue 12: a body that cannot be stored is refused before the expensive work); then each item
    exactly as a PUT body (fidelity of the whole item, its fields, its job id) and one item per job id.
    ``in_thread`` (blocking work in a worker thread): documents are escaped here, off the event loop,
    and the GIL is given up between items.

    Raises:
        ApiError: 400 for the envelope; for refused items 413, 400 or 422 with ``errors`` naming each.
    """
    raws = _split(body)
    refusals = _Refusals()
    sizes = [_escaped_size(raw) for raw in raws]  # one short C call per item and escaped byte
    if max_packet is not None:
        for index, (raw, size) in enumerate(zip(raws, sizes, strict=True)):
            if size + _STATEMENT_SLACK > max_packet:
                message = f"its statement (at least {size} bytes) passes the database's max_allowed_packet"
                refusals.add(index, _job_id_of(raw), 413, "too-large-for-database", message)
        refusals.raise_if_any(len(raws))
    checked: list[CheckedItem] = []
    first_index: dict[str, int] = {}
    for index, raw in enumerate(raws):
        item = _check_item(index, raw, sizes[index], refusals, in_thread=in_thread)
        if item is not None:
            if (earlier := first_index.setdefault(item.job_id, index)) != index:
                message = f"job_id {item.job_id!r} is also item {earlier}; a batch may name each job once"
                refusals.add(index, item.job_id, 400, "duplicate-job-id", message)
            else:
                checked.append(item)
        if in_thread:
            time.sleep(0)  # let the event loop thread take the GIL between items
    refusals.raise_if_any(len(raws))
    return checked


def _check_item(index: int, data: bytes, size: int, refusals: _Refusals, *, in_thread: bool) -> CheckedItem | None:
    """One item through the PUT's checks; None (and a refusal recorded) if it fails one."""
    root = f"$.items[{index}]"
    raw = data
    # In a thread, items over SMALL_ITEM_BYTES get the streaming check: it gives the GIL up every few
    # milliseconds and is fast on every shape (check_document calls Python per object: seconds for
    # 16 MiB of `{}`), while small items, the common case, are checked 2-3 times faster whole.
    limit = SMALL_ITEM_BYTES if in_thread else INLINE_CHECK_BYTES
    check = check_document if len(data) <= limit else check_document_streaming
    try:
        check(data, root, max_depth=MAX_DEPTH + 1)  # the item's own object is one level, as a PUT's body
    except MalformedJSON as exc:
        refusals.add(index, _job_id_of(raw), 400, "malformed-json", f"malformed JSON: {exc}")
        return None
    except UnfaithfulJSON as exc:
        message = f"cannot be stored faithfully: {exc.path}: {exc.reason}"
        refusals.add(index, _job_id_of(raw), 422, "unfaithful-json", message, json_path=exc.path)
        return None
    try:
        item = _ITEM_DECODER.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        job_id = _job_id_of(raw)
        detail = str(exc).replace("`$.", f"`{root}.").replace("`$`", f"`{root}`")
        if detail.endswith("`$`"):
            detail = detail[:-3] + f"`{root}`"
        if "`$.job_id`" in str(exc) or (isinstance(job_id, str) and not is_valid_job_id(job_id)):
            refusals.add(index, job_id, 400, "invalid-job-id", JOB_ID_RULE)
        else:
            refusals.add(index, job_id, 400, "invalid-body", f"invalid item: {detail}")
        return None
    if not is_valid_job_id(item.job_id):
        refusals.add(index, item.job_id, 400, "invalid-job-id", JOB_ID_RULE)
        return None
    match_tags = entity_tags(item.if_match, weak=False)
    none_match_tags = entity_tags(item.if_none_match)
    text = memoryview(item.result).tobytes().decode("utf-8")  # UTF-8 checked above
    document: Document = EscapedText(text) if in_thread else text
    return CheckedItem(index, item.job_id, item, document, match_tags, none_match_tags, size)


class BatchPreconditionFailed(ApiError):
    """An item's ``if_match`` / ``if_none_match`` does not hold: 412 naming it; the batch rolls back."""

    def __init__(self, item: CheckedItem) -> None:
        message = "the stored job result does not match the item's if_match / if_none_match"
        super().__init__(
            412,
            f"item {item.index} (job_id {item.job_id!r}): {message}; nothing was stored",
            slug="precondition-failed",
            errors=[
                {
                    "name": f"items[{item.index}]",
                    "source": "body",
                    "index": item.index,
                    "job_id": item.job_id,
                    "status": 412,
                    "type": "tag:jobresults,2026:problem/precondition-failed",
                    "message": message,
                }
            ],
        )


def _written(item: CheckedItem, meta: JobResultMeta, created: bool) -> BatchItemResult:
    return BatchItemResult(
        index=item.index,
        job_id=meta.job_id,
        outcome="created" if created else "replaced",
        status=meta.status,
        version=meta.version,
        etag=etag_of(meta),
        created_at=format_timestamp(meta.created_at),
        updated_at=format_timestamp(meta.updated_at),
    )


MULTI_ROW_FIELDS = ("status", "result", "labels", "retention_days", "pinned")
"""The PUT body fields :meth:`JobResultRepository.create_many` stores. While the PUT body has exactly
these, new rows without a condition are inserted with multi-row statements; a PUT body with more
fields sends every item through :func:`store_write` (correct, one round trip or more per item) until
``create_many`` stores the new fields too."""
MULTI_ROW_BYTES = 4 * 1024 * 1024
"""Escaped document bytes per multi-row ``INSERT`` at most (half ``max_allowed_packet`` when that is less)."""
MULTI_ROW_ROWS = 500
"""Rows per multi-row ``INSERT`` at most."""


async def _create_new_rows(
    repo: JobResultRepository, fresh: list[CheckedItem], max_packet: int | None, now: datetime, default_days: int | None
) -> dict[int, tuple[JobResultMeta, bool]]:
    """Insert ``fresh`` (items without a condition whose job id was not stored) with multi-row ``INSERT``s.

    Returns, by item index, what was created. A statement that meets a job id created meanwhile
    (1062) inserts nothing, and its items are left to :func:`store_write`.
    """
    if JobResultWrite.__struct_fields__ != MULTI_ROW_FIELDS or len(fresh) < 2:
        return {}
    budget = MULTI_ROW_BYTES if max_packet is None else min(MULTI_ROW_BYTES, max_packet // 2)
    done: dict[int, tuple[JobResultMeta, bool]] = {}
    start = 0
    while start < len(fresh):
        end, size = start, 0
        while end < len(fresh) and end - start < MULTI_ROW_ROWS and (end == start or size + fresh[end].size <= budget):
            size += fresh[end].size
            end += 1
        chunk = fresh[start:end]
        start = end
        try:
            metas = await repo.create_many(
                [
                    NewJobResult(
                        job_id=item.job_id,
                        status=item.write.status,
                        result=item.document,
                        labels=item.write.labels,
                        expires_at=item.write.expires_at(now, default_days),
                        pinned=item.write.pinned,
                    )
                    for item in chunk
                ],
                now,
            )
        except JobResultExists:
            continue
        done.update((item.index, (meta, True)) for item, meta in zip(chunk, metas, strict=True))
    return done


@post(
    BATCH_PATH,
    opt={"scope": "results:write"},
    operation_class=json_request_body(BatchWrite),
    tags=["job results"],
    summary="Store many job results at once (all or nothing)",
    description=(
        f"1 to {BATCH_MAX_ITEMS} items, the body at most `JOBRESULTS_MAX_BODY_BYTES` (16 MiB; 413 above). "
        "Each item is a PUT body plus its `job_id` and, optionally, `if_match` / `if_none_match` (as the "
        "PUT's headers). **All or nothing:** every item is checked first, as a PUT would check it; if any "
        "is refused (bad job id or body, a value that cannot be stored faithfully, a job id named twice, a "
        "statement larger than the database accepts) the answer is 400, 422 or 413 with `errors` naming "
        "each refused item (`index`, `job_id`, `status`, `type`, `message`, `json_path`) and nothing is "
        "stored. Otherwise all items are written in one transaction; a failed condition is 412 naming the "
        "item, and nothing is stored. 200 lists every item in request order: `outcome` (`created` or "
        "`replaced`), `version` and `etag`. Each item emits its own `job_result.created` / "
        "`job_result.replaced` webhook event, committed with the batch."
    ),
    responses=problem_responses(400, 401, 403, 412, 413, 415, 422, 429, 503),
    status_code=200,
)
async def post_job_results_batch(request: Request[Any, Any, Any], db: NamedDependency[Database]) -> BatchResult:
    """Check every item, then store them all in one unit of work; see the module docstring."""
    require_json_body(request)
    body = await request.body()
    max_packet: int | None = None
    if len(body) <= INLINE_CHECK_BYTES:
        checked = check_batch(body, None)
    else:
        max_packet = await _max_allowed_packet(request, db)
        async with _large_check_lock(request):
            checked = await asyncio.to_thread(check_batch, body, max_packet, in_thread=True)
    # Rows are written in job id order, so two batches sharing job ids lock them in the same order
    # (no deadlock between them); the answer keeps the request's order.
    in_id_order = sorted(checked, key=lambda item: item.job_id)

    default_days: int | None = request.app.state.settings.result_retention_days

    async def unit(conn: Connection) -> list[tuple[CheckedItem, JobResultMeta, bool]]:
        now = utcnow()  # one clock reading per attempt, for every item
        repo = JobResultRepository(conn)
        plain = [item for item in in_id_order if item.match_tags is None and item.none_match_tags is None]
        taken = await repo.existing([item.job_id for item in plain]) if len(plain) > 1 else set()
        fresh = [item for item in plain if item.job_id not in taken]
        done = await _create_new_rows(repo, fresh, max_packet, now, default_days)
        for item in in_id_order:
            if item.index in done:
                continue
            try:
                done[item.index] = await store_write(
                    repo,
                    item.job_id,
                    item.write,
                    item.document,
                    item.match_tags,
                    item.none_match_tags,
                    likely_exists=item.job_id in taken,
                    default_days=default_days,
                    now=now,
                )
            except (StoredPreconditionFailed, JobResultExists):
                raise BatchPreconditionFailed(item) from None
        return [(item, *done[item.index]) for item in checked]

    written = await db.run(emitting_each(unit, lambda rows: [job_result_event((meta, new)) for _, meta, new in rows]))
    return BatchResult(items=[_written(item, meta, created) for item, meta, created in written])
