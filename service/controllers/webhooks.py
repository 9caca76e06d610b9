"""API v1: webhooks. Register endpoints for events, rotate their signing secrets, read their delivery log."""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import PathParameter, QueryParameter

from repositories.database import Connection, Database
from repositories.domain import EVENT_TYPES, DeliveryOutcome, EventType, format_timestamp, utcnow
from repositories.webhooks import SUBSCRIPTIONS, Attempt, Webhook, WebhookNotFound, WebhookRepository
from service.auth import AnyOf
from service.controllers.exports import requested_by
from service.controllers.job_results import require_json_body
from service.openapi import json_request_body
from service.outbound import MAX_URL_LENGTH, RefusedDestination, check_url
from service.problems import ApiError, problem_responses
from service.schemas import Timestamp
from service.webhook_delivery import PREVIOUS_SECRET_VALID

WEBHOOK_ID = re.compile(r"[0-9a-f]{32}")
_READ = AnyOf(("webhooks:read", "webhooks:write"))
_WRITE = "webhooks:write"
_EVENTS_RULE = "events must be a non-empty list of: " + ", ".join(EVENT_TYPES)
Url = Annotated[
    str, msgspec.Meta(min_length=1, max_length=MAX_URL_LENGTH, description="https URL that receives events.")
]
Description = Annotated[str, msgspec.Meta(max_length=255)]
Events = Annotated[list[EventType], msgspec.Meta(min_length=1, description=_EVENTS_RULE)]


class WebhookCreate(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``POST /v1/webhooks``."""

    url: Url
    events: Events
    description: Description | None = None


class WebhookUpdate(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``PATCH /v1/webhooks/{webhook_id}``: only the fields given change.

    ``enabled: true`` re-enables a disabled endpoint (its failure count starts again);
    ``enabled: false`` disables it, and its undelivered events are dropped.
    """

    url: Url | msgspec.UnsetType = msgspec.UNSET
    events: Events | msgspec.UnsetType = msgspec.UNSET
    description: Description | msgspec.UnsetType | None = msgspec.UNSET
    enabled: bool | msgspec.UnsetType = msgspec.UNSET


class WebhookRecord(msgspec.Struct, omit_defaults=True):
    """A webhook endpoint. ``secret`` (``whsec_`` + base64) appears only in the answers to create and rotate."""

    id: str
    url: str
    events: list[EventType]
    enabled: bool
    created_at: Timestamp
    updated_at: Timestamp
    description: str | None = None
    disabled_reason: str | None = None
    disabled_at: Timestamp | None = None
    created_by: str | None = None
    secret: str | None = None

    @classmethod
    def build(cls, webhook: Webhook, *, with_secret: bool = False) -> WebhookRecord:
        """From a stored endpoint; the secret only when asked."""
        return cls(
            id=webhook.webhook_id,
            url=webhook.url,
            events=list(webhook.events),
            enabled=webhook.enabled,
            created_at=format_timestamp(webhook.created_at),
            updated_at=format_timestamp(webhook.updated_at),
            description=webhook.description,
            disabled_reason=webhook.disabled_reason,
            disabled_at=format_timestamp(webhook.disabled_at) if webhook.disabled_at else None,
            created_by=webhook.created_by,
            secret=webhook.secret if with_secret else None,
        )


class WebhookPage(msgspec.Struct):
    """A page of webhooks, oldest first; pass ``next_cursor`` as ``cursor`` for the next page."""

    items: list[WebhookRecord]
    next_cursor: str | None


class DeliveryAttempt(msgspec.Struct, omit_defaults=True):
    """One delivery attempt of one event to the webhook.

    ``outcome``: ``delivered`` (2xx), ``http_error`` (another status), ``timeout``, ``network_error``
    or ``refused`` (the URL or its address is not allowed). ``latency_ms`` is the attempt's wall time.
    """

    event_id: str
    event_type: EventType
    attempt: int
    outcome: DeliveryOutcome
    latency_ms: int
    attempted_at: Timestamp
    status_code: int | None = None
    error: str | None = None

    @classmethod
    def build(cls, attempt: Attempt) -> DeliveryAttempt:
        """From a stored attempt."""
        return cls(
            event_id=attempt.event_id,
            event_type=attempt.event_type,
            attempt=attempt.attempt,
            outcome=attempt.outcome,
            latency_ms=attempt.latency_ms,
            attempted_at=format_timestamp(attempt.attempted_at),
            status_code=attempt.status_code,
            error=attempt.error,
        )


class DeliveryPage(msgspec.Struct):
    """A page of delivery attempts, newest first; pass ``next_cursor`` as ``cursor`` for older ones."""

    items: list[DeliveryAttempt]
    next_cursor: str | None


def new_secret() -> str:
    """A signing secret as Standard Webhooks writes it: ``whsec_`` and base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _decode_body(body: bytes, struct: type[msgspec.Struct]) -> Any:
    try:
        return msgspec.json.decode(body, type=struct)
    except msgspec.ValidationError as exc:
        detail = str(exc).replace("`$.", "`")
        if "`events" in detail:
            detail += f"; {_EVENTS_RULE}"
        raise ApiError(400, f"invalid body: {detail}", slug="invalid-body") from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"malformed JSON: {exc}", slug="malformed-json") from None


async def _checked_url(request: Request[Any, Any, Any], url: str) -> str:
    try:
        await check_url(url, allow_private=request.app.state.settings.webhooks_allow_private)
    except RefusedDestination as exc:
        raise ApiError(400, f"url refused: {exc}", slug="webhook-url-refused") from None
    return url


def _unique(events: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(events))


def _encode_cursor(value: int) -> str:
    return base64.urlsafe_b64encode(str(value).encode()).decode().rstrip("=")


def _decode_cursor(value: str) -> int:
    try:
        return int(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode("ascii"))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise ApiError(
            400, "cursor is not valid: pass the next_cursor of a previous page unchanged", slug="invalid-request"
        ) from None


def _not_found(webhook_id: str) -> ApiError:
    return ApiError(404, f"no webhook with id {webhook_id!r}", slug="webhook-not-found")


async def _get(db: Database, webhook_id: str) -> Webhook:
    if not WEBHOOK_ID.fullmatch(webhook_id):
        raise _not_found(webhook_id)
    try:
        return await db.run(lambda conn: WebhookRepository(conn).get(webhook_id), transaction=False)
    except WebhookNotFound:
        raise _not_found(webhook_id) from None


async def _change(db: Database, webhook_id: str, change: Any) -> Webhook:
    """Run ``change(repo, locked webhook)`` in one unit; 404 if there is no such webhook."""
    if not WEBHOOK_ID.fullmatch(webhook_id):
        raise _not_found(webhook_id)

    async def unit(conn: Connection) -> Webhook:
        repo = WebhookRepository(conn)
        result: Webhook = await change(repo, await repo.get(webhook_id, for_update=True))
        return result

    try:
        webhook = await db.run(unit)
    except WebhookNotFound:
        raise _not_found(webhook_id) from None
    SUBSCRIPTIONS.invalidate()
    return webhook


WebhookId = Annotated[str, PathParameter(description="Webhook id (32 hex characters).")]


class WebhookController(Controller):
    """``/v1/webhooks``: endpoints that receive signed events."""

    path = "/v1/webhooks"
    tags = ["webhooks"]  # noqa: RUF012 - Litestar reads this class attribute

    @post(
        "/",
        opt={"scope": _WRITE},
        operation_class=json_request_body(WebhookCreate),
        summary="Register a webhook",
        description=(
            "201 with the webhook and its signing secret, shown only here (and on rotation). The URL must "
            "be https and resolve only to public addresses. " + _EVENTS_RULE + "."
        ),
        status_code=201,
        responses={201: ResponseSpec(data_container=WebhookRecord, description="Created", generate_examples=False)}
        | problem_responses(400, 401, 403, 415, 429, 503),
    )
    async def create_webhook(self, request: Request[Any, Any, Any], db: NamedDependency[Database]) -> Response[Any]:
        """Register ``url`` for ``events``."""
        require_json_body(request)
        data: WebhookCreate = _decode_body(await request.body(), WebhookCreate)
        url = await _checked_url(request, data.url)
        created_by = requested_by(request)
        webhook = await db.run(
            lambda conn: WebhookRepository(conn).create(
                url=url,
                events=_unique(list(data.events)),
                description=data.description,
                secret=new_secret(),
                created_by=created_by,
            )
        )
        SUBSCRIPTIONS.invalidate()
        return Response(
            WebhookRecord.build(webhook, with_secret=True),
            status_code=201,
            headers={"Location": f"{self.path}/{webhook.webhook_id}"},
        )

    @get(
        "/",
        opt={"scope": _READ},
        summary="List webhooks, oldest first",
        responses=problem_responses(400, 401, 403, 429, 503),
    )
    async def list_webhooks(
        self,
        db: NamedDependency[Database],
        limit: Annotated[int, QueryParameter(ge=1, le=1000, description="Page size, 1..1000.")] = 100,
        cursor: Annotated[str | None, QueryParameter(description="next_cursor of the previous page.")] = None,
    ) -> WebhookPage:
        """A page of webhooks (never their secrets)."""
        after = _decode_cursor(cursor) if cursor else 0
        rows = await db.run(lambda conn: WebhookRepository(conn).page(after=after, limit=limit + 1), transaction=False)
        page = rows[:limit]
        return WebhookPage(
            items=[WebhookRecord.build(row) for row in page],
            next_cursor=_encode_cursor(page[-1].id) if len(rows) > limit else None,
        )

    @get(
        "/{webhook_id:str}",
        opt={"scope": _READ},
        summary="Read a webhook",
        description="Its URL, events, and whether it is enabled (with the reason when it was disabled).",
        responses=problem_responses(401, 403, 404, 429, 503),
    )
    async def get_webhook(self, db: NamedDependency[Database], webhook_id: WebhookId) -> WebhookRecord:
        """The webhook (never its secret)."""
        return WebhookRecord.build(await _get(db, webhook_id))

    @patch(
        "/{webhook_id:str}",
        opt={"scope": _WRITE},
        operation_class=json_request_body(WebhookUpdate),
        summary="Change a webhook",
        description=(
            "Only the given fields change. `enabled: true` re-enables a disabled webhook; `enabled: false` "
            "disables it and drops its undelivered events."
        ),
        responses=problem_responses(400, 401, 403, 404, 415, 429, 503),
    )
    async def update_webhook(
        self, request: Request[Any, Any, Any], db: NamedDependency[Database], webhook_id: WebhookId
    ) -> WebhookRecord:
        """Change url, events, description or enabled."""
        require_json_body(request)
        data: WebhookUpdate = _decode_body(await request.body(), WebhookUpdate)
        url = await _checked_url(request, data.url) if isinstance(data.url, str) else None

        async def change(repo: WebhookRepository, current: Webhook) -> Webhook:
            updated = current
            if url is not None:
                updated = msgspec.structs.replace(updated, url=url)
            if not isinstance(data.events, msgspec.UnsetType):
                updated = msgspec.structs.replace(updated, events=_unique(list(data.events)))
            if not isinstance(data.description, msgspec.UnsetType):
                updated = msgspec.structs.replace(updated, description=data.description)
            if data.enabled is True and not current.enabled:
                updated = msgspec.structs.replace(
                    updated, enabled=True, disabled_reason=None, disabled_at=None, failure_streak=0
                )
            elif data.enabled is False and current.enabled:
                updated = msgspec.structs.replace(
                    updated, enabled=False, disabled_reason="disabled through the API", disabled_at=utcnow()
                )
            return await repo.update(updated)

        return WebhookRecord.build(await _change(db, webhook_id, change))

    @delete(
        "/{webhook_id:str}",
        opt={"scope": _WRITE},
        summary="Delete a webhook",
        description="Its undelivered events and its delivery log go with it.",
        responses=problem_responses(401, 403, 404, 429, 503),
    )
    async def delete_webhook(self, db: NamedDependency[Database], webhook_id: WebhookId) -> None:
        """Delete the webhook; 204."""

        async def change(repo: WebhookRepository, current: Webhook) -> Webhook:
            await repo.delete(current)
            return current

        await _change(db, webhook_id, change)

    @post(
        "/{webhook_id:str}/rotate-secret",
        opt={"scope": _WRITE},
        summary="Rotate a webhook's signing secret",
        description=(
            "200 with the new secret, shown only here. For 24 hours deliveries carry a second signature "
            "made with the previous secret, so receivers can switch without losing events."
        ),
        status_code=200,
        responses=problem_responses(401, 403, 404, 429, 503),
    )
    async def rotate_secret(self, db: NamedDependency[Database], webhook_id: WebhookId) -> WebhookRecord:
        """A new signing secret."""
        secret = new_secret()

        async def change(repo: WebhookRepository, current: Webhook) -> Webhook:
            return await repo.rotate_secret(current, secret, PREVIOUS_SECRET_VALID)

        return WebhookRecord.build(await _change(db, webhook_id, change), with_secret=True)

    @get(
        "/{webhook_id:str}/deliveries",
        opt={"scope": _READ},
        summary="Read a webhook's delivery log, newest first",
        description="One item per attempt: event, attempt number, outcome, HTTP status, latency, error.",
        responses=problem_responses(400, 401, 403, 404, 429, 503),
    )
    async def list_deliveries(
        self,
        db: NamedDependency[Database],
        webhook_id: WebhookId,
        limit: Annotated[int, QueryParameter(ge=1, le=1000, description="Page size, 1..1000.")] = 100,
        cursor: Annotated[str | None, QueryParameter(description="next_cursor of the previous page.")] = None,
    ) -> DeliveryPage:
        """A page of delivery attempts."""
        before = _decode_cursor(cursor) if cursor else None
        webhook = await _get(db, webhook_id)
        rows = await db.run(
            lambda conn: WebhookRepository(conn).attempts(webhook.id, before=before, limit=limit + 1),
            transaction=False,
        )
        page = rows[:limit]
        return DeliveryPage(
            items=[DeliveryAttempt.build(row) for row in page],
            next_cursor=_encode_cursor(page[-1].id) if len(rows) > limit else None,
        )
