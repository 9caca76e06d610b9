"""msgspec types for every request and response body of API v1."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Literal

import msgspec

from repositories.domain import JOB_ID_PATTERN, JobStatus, format_timestamp
from repositories.job_results import JobResultMeta

MAX_RETENTION_DAYS = 3650
"""Longest retention a result or the service default may have (days; 10 years)."""

Timestamp = Annotated[
    str,
    msgspec.Meta(
        description="RFC 3339 timestamp in UTC with microseconds, e.g. 2026-11-29T14:01:46.123456Z",
        examples=["2026-11-29T14:01:46.123456Z"],
    ),
]
ExpiresAt = Annotated[
    str | None,
    msgspec.Meta(
        description=(
            "When the result expires (RFC 3339 UTC); null: never. From then on it is gone for every "
            "reader, before the purge deletes it."
        ),
        examples=["2026-12-29T14:01:46.123456Z"],
    ),
]
JobId = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=JOB_ID_PATTERN.pattern)]
AnyJSON = Annotated[msgspec.Raw, msgspec.Meta(description="Any JSON value, returned as it was stored.")]
Labels = Annotated[
    dict[str, str],
    msgspec.Meta(
        description=(
            "Up to 32 labels. Key: 1 to 63 characters from a-z 0-9 . _ / -, starting with a letter. Value: 0 to "
            "255 characters without control characters (Unicode Cc, U+2028, U+2029)."
        ),
        examples=[{"branch": "main", "tool": "pytest"}],
    ),
]


RetentionDays = Annotated[
    int,
    msgspec.Meta(
        ge=1,
        le=MAX_RETENTION_DAYS,
        description=(
            "Days this result is kept, counted from this write (1..3650); without it, the service's "
            "default (`JOBRESULTS_RESULT_RETENTION_DAYS`, by default forever) at the time of this write."
        ),
    ),
]


class JobResultWrite(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``PUT /v1/job-results/{job_id}``: a full replace, so a field left out takes its default.

    ``retention_days`` and ``pinned: true`` exclude each other (400 when both are given).
    """

    status: JobStatus
    result: AnyJSON
    labels: Labels = msgspec.field(default_factory=dict)
    """Replaces all the job's labels; absent means none (service/labels.py checks the rules)."""
    retention_days: RetentionDays | None = None
    pinned: Annotated[
        bool,
        msgspec.Meta(description="`true` keeps the result until it is deleted or written again without it."),
    ] = False

    def __post_init__(self) -> None:
        """Refuse ``retention_days`` together with ``pinned: true`` (msgspec turns it into a 400)."""
        if self.pinned and self.retention_days is not None:
            raise ValueError("give `retention_days` or `pinned: true`, not both: a pinned result never expires")

    def expires_at(self, now: datetime, default_days: int | None) -> datetime | None:
        """When a result written at ``now`` (naive UTC) with this body expires; None for never.

        Retention counts from the write (as GitHub's artifact retention does), so every write restarts
        the clock: ``now + retention_days``, else ``now + default_days``; never when pinned or when
        neither is set. The default in force at the write applies; a later change of it does not move
        the expiry of results already stored.
        """
        if self.pinned:
            return None
        days = self.retention_days if self.retention_days is not None else default_days
        return None if days is None else now + timedelta(days=days)


class JobResult(msgspec.Struct):
    """A stored job result."""

    job_id: JobId
    status: JobStatus
    result: AnyJSON
    created_at: Timestamp
    updated_at: Timestamp
    expires_at: ExpiresAt
    pinned: bool
    labels: Labels = msgspec.field(default_factory=dict)

    @classmethod
    def build(cls, meta: JobResultMeta, result: bytes | msgspec.Raw, labels: dict[str, str] | None = None) -> JobResult:
        """From stored metadata, the stored JSON text (passed through, never decoded) and the labels."""
        return cls(
            job_id=meta.job_id,
            status=meta.status,
            result=result if isinstance(result, msgspec.Raw) else msgspec.Raw(result),
            created_at=format_timestamp(meta.created_at),
            updated_at=format_timestamp(meta.updated_at),
            expires_at=None if meta.expires_at is None else format_timestamp(meta.expires_at),
            pinned=meta.pinned,
            labels=labels or {},
        )


class JobResultSummary(msgspec.Struct, omit_defaults=True):
    """One item of a job result list; ``result`` only with ``include=result``."""

    job_id: JobId
    status: JobStatus
    created_at: Timestamp
    updated_at: Timestamp
    etag: str
    expires_at: ExpiresAt
    pinned: bool
    labels: Labels
    result: AnyJSON | msgspec.UnsetType = msgspec.UNSET


class JobResultPage(msgspec.Struct):
    """A page of job results, oldest first.

    Pass ``next_cursor`` as ``cursor`` for the next page; it is null on the last page.
    """

    items: list[JobResultSummary]
    next_cursor: str | None


class Health(msgspec.Struct, omit_defaults=True):
    """Liveness or readiness report."""

    status: Literal["ok", "unavailable"]
    detail: str | None = None


class Problem(msgspec.Struct, omit_defaults=True):
    """RFC 9457 problem details (``application/problem+json``)."""

    type: str
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    json_path: str | None = None
    """For 422: JSONPath of the value that cannot be stored faithfully."""
    errors: list[dict[str, str | int]] | None = None
    """For 400: one entry per invalid parameter (``name``, ``source``, ``message``); for a refused batch,
    one per refused item, with its ``index`` and ``job_id`` too (see ``POST /v1/job-results:batch``)."""


BATCH_MAX_ITEMS = 1000
"""Most items in one ``POST /v1/job-results:batch``."""


class BatchItem(JobResultWrite, kw_only=True, forbid_unknown_fields=True):
    """One item of a batch: the job id, the fields of a PUT body, and optionally a PUT's condition."""

    # A subclass of the PUT body: a field added to JobResultWrite is accepted, checked and stored for
    # batch items too, with no batch-specific code.
    job_id: JobId
    if_match: Annotated[
        str | None,
        msgspec.Meta(description="As a PUT's If-Match: replace only if the stored ETag is one of these."),
    ] = None
    if_none_match: Annotated[
        str | None,
        msgspec.Meta(description="As a PUT's If-None-Match: `*` creates only; ETags: not if one of these."),
    ] = None


class BatchWrite(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``POST /v1/job-results:batch``: 1 to 1,000 items, each job id at most once."""

    items: Annotated[list[BatchItem], msgspec.Meta(min_length=1, max_length=BATCH_MAX_ITEMS)]


class BatchItemResult(msgspec.Struct):
    """What a batch did with one item (``index``: its position in the request, from 0)."""

    index: int
    job_id: JobId
    outcome: Literal["created", "replaced"]
    status: JobStatus
    version: int
    etag: str
    created_at: Timestamp
    updated_at: Timestamp


class BatchResult(msgspec.Struct):
    """Answer of ``POST /v1/job-results:batch``: every item stored, in request order."""

    items: list[BatchItemResult]
