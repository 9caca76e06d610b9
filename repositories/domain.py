"""The domain vocabulary every layer shares: value sets, the job-id rule, UTC time, shared errors.

It imports nothing of the project, so ``repositories/``, ``exports/``, ``service/`` and the CLI may all
import it (it lives in the lowest layer that needs it). Each value set is written once as a
``Literal`` type; its tuple is derived from it (``get_args``), so an API schema, a CLI ``choices``
list and a stored struct cannot drift apart. Timestamps are naive UTC ``datetime`` inside the
service (the form ``DATETIME(6)`` columns hold) and RFC 3339 UTC text outside (RFC 3339, section 5.6).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Literal, get_args

JobStatus = Literal["succeeded", "failed", "cancelled"]
"""Status of a job result, as sent in a PUT and stored."""
STATUSES: tuple[JobStatus, ...] = get_args(JobStatus)
STATUS_CHOICES = " | ".join(f'"{status}"' for status in STATUSES)
"""The statuses as error messages show the allowed values: ``"succeeded" | "failed" | "cancelled"``."""

Format = Literal["json", "ndjson", "csv"]
"""Export file formats."""
FORMATS: tuple[Format, ...] = get_args(Format)

Compression = Literal["none", "gzip"]
"""Export file compressions."""
COMPRESSIONS: tuple[Compression, ...] = get_args(Compression)

ExportKind = Literal["job", "range"]
"""A single-job export (synchronous) or a time-range export (queued)."""
EXPORT_KINDS: tuple[ExportKind, ...] = get_args(ExportKind)

PendingExportState = Literal["queued", "running"]
"""States a DELETE (or ``/cancel``) cancels, and a long-poll waits out."""
PENDING_STATES: tuple[PendingExportState, ...] = get_args(PendingExportState)
FinishedExportState = Literal["succeeded", "failed"]
"""States a DELETE deletes (file and all)."""
FINISHED_STATES: tuple[FinishedExportState, ...] = get_args(FinishedExportState)
StoredExportState = Literal[PendingExportState, FinishedExportState, "cancelled", "deleted"]
"""Export states as stored in ``exports.state``."""
ExportState = Literal[StoredExportState, "expired"]
"""Export states clients see: the stored ones, plus ``expired`` (a succeeded export past ``expires_at``,
computed at read time, never stored)."""
EXPORT_STATES: tuple[ExportState, ...] = get_args(ExportState)

Scope = Literal[
    "results:read",
    "results:write",
    "exports:read",
    "exports:write",
    "metrics:read",
    "webhooks:read",
    "webhooks:write",
]
"""API key scopes."""
SCOPES: tuple[Scope, ...] = get_args(Scope)

EventType = Literal[
    "export.succeeded",
    "export.failed",
    "export.expired",
    "job_result.created",
    "job_result.replaced",
    "job_result.deleted",
]
"""Webhook event types (Standard Webhooks ``type``)."""
EVENT_TYPES: tuple[EventType, ...] = get_args(EventType)
"""Event types a webhook may subscribe to."""

DeliveryOutcome = Literal["delivered", "http_error", "timeout", "network_error", "refused"]
"""Outcome of one webhook delivery attempt."""
DELIVERY_OUTCOMES: tuple[DeliveryOutcome, ...] = get_args(DeliveryOutcome)

JOB_ID_RULE = "job_id must be 1 to 128 characters from A-Z a-z 0-9 . _ : - and start with a letter or digit"
JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


class InvalidParameter(ValueError):
    """A request parameter has a value the API does not accept; the message says what is allowed (400).

    ``name``: the parameter (or body field), when known; the problem's ``errors`` then names it.
    """

    def __init__(self, message: str, name: str | None = None) -> None:
        super().__init__(message)
        self.name = name


class JobResultNotFound(Exception):
    """No job result has this job id."""


def is_valid_job_id(job_id: str) -> bool:
    """True if ``job_id`` follows :data:`JOB_ID_RULE` (ASCII only, so no case folding questions)."""
    return JOB_ID_PATTERN.fullmatch(job_id) is not None


def utcnow() -> datetime:
    """Current UTC time as a naive ``datetime`` (the form ``DATETIME(6)`` columns hold)."""
    return datetime.now(UTC).replace(tzinfo=None)


def format_timestamp(value: datetime) -> str:
    """RFC 3339 UTC with exactly six fractional digits; naive values are taken as UTC."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.isoformat(timespec="microseconds") + "Z"


def parse_timestamp(value: str | None, name: str) -> datetime | None:
    """Parse an RFC 3339 timestamp with an offset into naive UTC; None stays None.

    A '+' sent unencoded in a query string arrives as ' ' and is accepted as '+'.

    Raises:
        InvalidParameter: (400) naming ``name`` and the accepted form.
    """
    if value is None:
        return None
    text = value.strip()
    if len(text) > 19 and text[-6] == " ":
        text = text[:-6] + "+" + text[-5:]
    try:
        parsed = datetime.fromisoformat(text)
        utc = parsed.astimezone(UTC).replace(tzinfo=None) if parsed.tzinfo is not None else None
    except (ValueError, OverflowError):
        utc = None
    if utc is None or len(text) < 20 or text[10] not in "Tt ":
        raise InvalidParameter(
            f"{name} must be an RFC 3339 timestamp with a UTC offset, e.g. 2026-11-29T00:00:00Z "
            "or 2026-11-29T01:00:00+01:00, within years 0001-9999 in UTC",
            name,
        )
    return utc
