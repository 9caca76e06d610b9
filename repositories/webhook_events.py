"""Webhook events: what each event's ``data`` holds, and the hook that queues it inside a unit of work.

A unit that makes a change is wrapped once where it is run, e.g.
``await db.run(emitting(unit, job_result_event))``: the wrapper runs the unit, then writes the event
into the outbox on the same connection, so the event commits or rolls back with the change (and a
retried unit queues it once, in the attempt that commits).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

from repositories.database import Connection
from repositories.domain import EventType, ExportState, format_timestamp
from repositories.exports import Export
from repositories.job_results import JobResultMeta, etag_of
from repositories.webhooks import WebhookOutbox

T = TypeVar("T")
Event = tuple[EventType, Mapping[str, Any]]
"""An event to queue: ``(event type, data)``."""


def emitting(
    unit: Callable[[Connection], Awaitable[T]], event: Callable[[T], Event | None]
) -> Callable[[Connection], Awaitable[T]]:
    """``unit`` followed, on the same connection and transaction, by queuing ``event(result)``.

    ``event`` maps the unit's result to the event to queue, or None for none.
    """

    async def unit_and_event(conn: Connection) -> T:
        result = await unit(conn)
        announced = event(result)
        if announced is not None:
            await WebhookOutbox(conn).emit(*announced)
        return result

    return unit_and_event


def emitting_each(
    unit: Callable[[Connection], Awaitable[T]], events: Callable[[T], Iterable[Event]]
) -> Callable[[Connection], Awaitable[T]]:
    """Like :func:`emitting`, for a unit that makes several changes: queues each of ``events(result)``."""

    async def unit_and_events(conn: Connection) -> T:
        result = await unit(conn)
        outbox = WebhookOutbox(conn)
        for announced in events(result):
            await outbox.emit(*announced)
        return result

    return unit_and_events


def job_result_data(meta: JobResultMeta) -> dict[str, Any]:
    """``data`` of ``job_result.created`` / ``job_result.replaced``: the stored result's metadata.

    The document itself is not sent (it may be megabytes): ``GET /v1/job-results/{job_id}`` reads it.
    """
    return {
        "job_id": meta.job_id,
        "status": meta.status,
        "etag": etag_of(meta),
        "created_at": format_timestamp(meta.created_at),
        "updated_at": format_timestamp(meta.updated_at),
    }


def job_result_event(written: tuple[JobResultMeta, bool]) -> Event:
    """The event of a PUT unit's result ``(meta, created)``."""
    meta, created = written
    return ("job_result.created" if created else "job_result.replaced", job_result_data(meta))


def job_result_deleted(job_id: str) -> Event:
    """The event of a deleted job result: ``data`` is ``{"job_id"}``."""
    return ("job_result.deleted", {"job_id": job_id})


def job_result_expired(job_id: str) -> Event:
    """The event of a result the purge deleted once it expired.

    ``job_result.deleted`` with ``data`` ``{"job_id", "reason": "expired"}``.
    """
    return ("job_result.deleted", {"job_id": job_id, "reason": "expired"})


def export_event(
    export: Export,
    *,
    state: ExportState,
    error: str | None = None,
    rows_written: int | None = None,
    size: int | None = None,
    sha256: str | None = None,
) -> Event:
    """``export.succeeded`` or ``export.failed`` (by ``state``) for ``export``, with its final figures."""
    data: dict[str, Any] = {
        "export_id": export.export_id,
        "kind": export.kind,
        "format": export.format,
        "compression": export.compression,
        "state": state,
        "export_url": f"/v1/exports/{export.export_id}",
    }
    if export.parameters.job_id is not None:
        data["job_id"] = export.parameters.job_id
    if state == "succeeded":
        data["rows_written"] = export.rows_written if rows_written is None else rows_written
        data["bytes"] = export.bytes if size is None else size
        data["sha256"] = export.sha256 if sha256 is None else sha256
        data["content_url"] = f"/v1/exports/{export.export_id}/content"
        return ("export.succeeded", data)
    data["error"] = error
    return ("export.failed", data)


def export_expired(export: Export) -> Event:
    """``export.expired``: the purge removed an expired export's file and record (``export_url`` is gone)."""
    data: dict[str, Any] = {
        "export_id": export.export_id,
        "kind": export.kind,
        "format": export.format,
        "compression": export.compression,
        "state": "expired",
        "expires_at": format_timestamp(export.expires_at) if export.expires_at else None,
    }
    if export.parameters.job_id is not None:
        data["job_id"] = export.parameters.job_id
    return ("export.expired", data)
