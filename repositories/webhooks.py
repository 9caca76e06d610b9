"""Hand-written SQL for webhooks: endpoints, the outbox of events, and the delivery log.

The outbox holds one row per event and subscribed endpoint. :class:`WebhookOutbox` writes those rows
on the connection of the unit of work that makes the change, so they commit or roll back with it.
A delivery worker claims a due row with a conditional ``UPDATE`` (its owner and lease expiry in the
``SET``, "nobody else holds a live lease" in the ``WHERE``; one affected row means it is ours), so any
replica delivers and no two send the same row at once. Never opens or ends transactions.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import msgspec

from repositories.database import Connection
from repositories.domain import DeliveryOutcome, EventType, utcnow


class WebhookNotFound(Exception):
    """No webhook has this id."""


class Webhook(msgspec.Struct, frozen=True):
    """A webhook endpoint. Timestamps are naive UTC; ``events`` is a tuple of :data:`EVENT_TYPES`."""

    id: int
    webhook_id: str
    url: str
    description: str | None
    events: tuple[EventType, ...]
    secret: str
    previous_secret: str | None
    previous_secret_until: datetime | None
    enabled: bool
    disabled_reason: str | None
    disabled_at: datetime | None
    failure_streak: int
    created_by: str | None
    created_at: datetime
    updated_at: datetime


class OutboxMessage(msgspec.Struct, frozen=True):
    """A claimed outbox row: one event for one endpoint. ``payload`` is the exact body to send."""

    id: int
    event_id: str
    endpoint_id: int
    event_type: EventType
    payload: str
    attempts: int
    created_at: datetime


class Attempt(msgspec.Struct, frozen=True):
    """One delivery attempt as recorded in the log; ``latency_ms`` is wall time of the HTTP exchange."""

    id: int
    event_id: str
    event_type: EventType
    attempt: int
    outcome: DeliveryOutcome
    status_code: int | None
    latency_ms: int
    error: str | None
    attempted_at: datetime


_ENDPOINT_COLUMNS = (
    "id, webhook_id, url, description, events, secret, previous_secret, previous_secret_until, enabled, "
    "disabled_reason, disabled_at, failure_streak, created_by, created_at, updated_at"
)
SQL_ENDPOINT_INSERT = (
    "INSERT INTO webhook_endpoints (webhook_id, url, description, events, secret, enabled, failure_streak, "
    "created_by, created_at, updated_at) VALUES (%(webhook_id)s, %(url)s, %(description)s, %(events)s, "
    "%(secret)s, TRUE, 0, %(created_by)s, %(now)s, %(now)s)"
)
SQL_ENDPOINT_GET = f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE webhook_id = %(webhook_id)s"  # noqa: S608
SQL_ENDPOINT_GET_BY_ID = f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE id = %(id)s"  # noqa: S608
SQL_ENDPOINT_LIST = (
    f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE id > %(after)s ORDER BY id LIMIT %(limit)s"  # noqa: S608
)
SQL_ENDPOINT_UPDATE = (
    "UPDATE webhook_endpoints SET url = %(url)s, description = %(description)s, events = %(events)s, "
    "enabled = %(enabled)s, disabled_reason = %(disabled_reason)s, disabled_at = %(disabled_at)s, "
    "failure_streak = %(failure_streak)s, updated_at = %(now)s WHERE id = %(id)s"
)
SQL_ENDPOINT_ROTATE = (
    "UPDATE webhook_endpoints SET previous_secret = secret, previous_secret_until = %(previous_until)s, "
    "secret = %(secret)s, updated_at = %(now)s WHERE id = %(id)s"
)
SQL_ENDPOINT_DELETE = "DELETE FROM webhook_endpoints WHERE id = %(id)s"
SQL_SUBSCRIPTIONS = "SELECT id, events FROM webhook_endpoints WHERE enabled = TRUE"
SQL_OUTBOX_DELETE_FOR = "DELETE FROM webhook_outbox WHERE endpoint_id = %(id)s"
SQL_ATTEMPTS_DELETE_FOR = "DELETE FROM webhook_attempts WHERE endpoint_id = %(id)s"
SQL_OUTBOX_INSERT = (
    "INSERT INTO webhook_outbox (event_id, endpoint_id, event_type, payload, state, attempts, next_attempt_at, "
    "created_at) VALUES (%s, %s, %s, %s, 'pending', 0, %s, %s)"
)
SQL_OUTBOX_DUE = (
    "SELECT o.id FROM webhook_outbox o JOIN webhook_endpoints e ON e.id = o.endpoint_id "
    "WHERE o.state = 'pending' AND o.next_attempt_at <= %(now)s AND (o.lease_until IS NULL OR o.lease_until < %(now)s) "
    "AND e.enabled = TRUE ORDER BY o.next_attempt_at, o.id LIMIT %(limit)s"
)
SQL_OUTBOX_CLAIM = (
    "UPDATE webhook_outbox SET lease_owner = %(owner)s, lease_until = %(lease_until)s "
    "WHERE id = %(id)s AND state = 'pending' AND next_attempt_at <= %(now)s "
    "AND (lease_until IS NULL OR lease_until < %(now)s)"
)
SQL_OUTBOX_GET = (
    "SELECT id, event_id, endpoint_id, event_type, payload, attempts, created_at FROM webhook_outbox "
    "WHERE id = %(id)s AND lease_owner = %(owner)s"
)
SQL_OUTBOX_SETTLE = (
    "UPDATE webhook_outbox SET state = %(state)s, attempts = attempts + 1, next_attempt_at = %(next_attempt_at)s, "
    "last_error = %(error)s, finished_at = %(finished_at)s, lease_owner = NULL, lease_until = NULL "
    "WHERE id = %(id)s AND lease_owner = %(owner)s AND state = 'pending'"
)
SQL_OUTBOX_FAIL_PENDING = (
    "UPDATE webhook_outbox SET state = 'failed', last_error = %(error)s, finished_at = %(now)s, "
    "lease_owner = NULL, lease_until = NULL WHERE endpoint_id = %(id)s AND state = 'pending'"
)
SQL_OUTBOX_BACKLOG = "SELECT COUNT(*), MIN(created_at) FROM webhook_outbox WHERE state = 'pending'"
SQL_OUTBOX_PURGE = (  # a settled row's next_attempt_at is when it settled; (state, next_attempt_at) is indexed
    "DELETE FROM webhook_outbox WHERE state IN ('delivered', 'failed') AND next_attempt_at < %(before)s LIMIT 1000"
)
SQL_ATTEMPTS_PURGE = "DELETE FROM webhook_attempts WHERE attempted_at < %(before)s LIMIT 1000"
SQL_ATTEMPT_INSERT = (
    "INSERT INTO webhook_attempts (endpoint_id, outbox_id, event_id, event_type, attempt, outcome, status_code, "
    "latency_ms, error, attempted_at) VALUES (%(endpoint_id)s, %(outbox_id)s, %(event_id)s, %(event_type)s, "
    "%(attempt)s, %(outcome)s, %(status_code)s, %(latency_ms)s, %(error)s, %(attempted_at)s)"
)
SQL_ATTEMPTS_LIST = (
    "SELECT id, event_id, event_type, attempt, outcome, status_code, latency_ms, error, attempted_at "
    "FROM webhook_attempts WHERE endpoint_id = %(endpoint_id)s AND id < %(before)s ORDER BY id DESC LIMIT %(limit)s"
)
SQL_STREAK_RESET = "UPDATE webhook_endpoints SET failure_streak = 0 WHERE id = %(id)s AND failure_streak <> 0"
SQL_STREAK_ADD = "UPDATE webhook_endpoints SET failure_streak = failure_streak + 1 WHERE id = %(id)s"
SQL_DISABLE = (
    "UPDATE webhook_endpoints SET enabled = FALSE, disabled_reason = %(reason)s, disabled_at = %(now)s, "
    "updated_at = %(now)s WHERE id = %(id)s AND enabled = TRUE AND failure_streak >= %(streak)s"
)
_MAX_ID = 2**63


def new_webhook_id() -> str:
    """A random webhook id: 32 lowercase hex characters (128 bits)."""
    return secrets.token_hex(16)


def new_event_id() -> str:
    """A random event id, the ``webhook-id`` header: ``msg_`` and 32 hex characters."""
    return "msg_" + secrets.token_hex(16)


def _endpoint(row: Sequence[Any]) -> Webhook:
    return Webhook(
        id=row[0],
        webhook_id=row[1],
        url=row[2],
        description=row[3],
        events=tuple(e for e in row[4].split(",") if e),
        secret=row[5],
        previous_secret=row[6],
        previous_secret_until=row[7],
        enabled=bool(row[8]),
        disabled_reason=row[9],
        disabled_at=row[10],
        failure_streak=row[11],
        created_by=row[12],
        created_at=row[13],
        updated_at=row[14],
    )


class WebhookRepository:
    """Reads and writes webhook endpoints, outbox rows and delivery attempts on one connection."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    async def _execute(self, sql: str, params: Mapping[str, Any] | Sequence[Any]) -> int:
        async with self.conn.cursor() as cur:
            affected: int = await cur.execute(sql, params)
        return affected

    async def _fetch(self, sql: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        async with self.conn.cursor() as cur:
            await cur.execute(sql, params)
            rows: list[tuple[Any, ...]] = await cur.fetchall()
        return rows

    # --- endpoints ---------------------------------------------------------------------------

    async def create(
        self, *, url: str, events: Sequence[str], description: str | None, secret: str, created_by: str | None
    ) -> Webhook:
        """Insert an enabled endpoint and return it (with its new ``webhook_id``)."""
        webhook_id = new_webhook_id()
        await self._execute(
            SQL_ENDPOINT_INSERT,
            {
                "webhook_id": webhook_id,
                "url": url,
                "description": description,
                "events": ",".join(events),
                "secret": secret,
                "created_by": created_by,
                "now": utcnow(),
            },
        )
        return await self.get(webhook_id)

    async def get(self, webhook_id: str, *, for_update: bool = False) -> Webhook:
        """The endpoint named ``webhook_id`` (row-locked with ``for_update``).

        Raises:
            WebhookNotFound: there is none.
        """
        rows = await self._fetch(SQL_ENDPOINT_GET + (" FOR UPDATE" if for_update else ""), {"webhook_id": webhook_id})
        if not rows:
            raise WebhookNotFound(webhook_id)
        return _endpoint(rows[0])

    async def get_by_id(self, endpoint_id: int) -> Webhook | None:
        """The endpoint with primary key ``endpoint_id``, or None once deleted."""
        rows = await self._fetch(SQL_ENDPOINT_GET_BY_ID, {"id": endpoint_id})
        return _endpoint(rows[0]) if rows else None

    async def page(self, *, after: int, limit: int) -> list[Webhook]:
        """Endpoints with primary key above ``after``, in key order, at most ``limit``."""
        return [_endpoint(row) for row in await self._fetch(SQL_ENDPOINT_LIST, {"after": after, "limit": limit})]

    async def update(self, webhook: Webhook) -> Webhook:
        """Write ``webhook``'s url, description, events and enabled state; returns the stored row.

        Disabling fails the endpoint's pending events (they are not delivered later).
        """
        now = utcnow()
        await self._execute(
            SQL_ENDPOINT_UPDATE,
            {
                "id": webhook.id,
                "url": webhook.url,
                "description": webhook.description,
                "events": ",".join(webhook.events),
                "enabled": webhook.enabled,
                "disabled_reason": webhook.disabled_reason,
                "disabled_at": webhook.disabled_at,
                "failure_streak": webhook.failure_streak,
                "now": now,
            },
        )
        if not webhook.enabled:
            await self._execute(SQL_OUTBOX_FAIL_PENDING, {"id": webhook.id, "error": "endpoint disabled", "now": now})
        return await self.get(webhook.webhook_id)

    async def rotate_secret(self, webhook: Webhook, secret: str, previous_valid: timedelta) -> Webhook:
        """Make ``secret`` the signing secret; the old one also signs for ``previous_valid`` more."""
        now = utcnow()
        await self._execute(
            SQL_ENDPOINT_ROTATE,
            {"id": webhook.id, "secret": secret, "previous_until": now + previous_valid, "now": now},
        )
        return await self.get(webhook.webhook_id)

    async def delete(self, webhook: Webhook) -> None:
        """Delete the endpoint, its undelivered events and its delivery log."""
        await self._execute(SQL_OUTBOX_DELETE_FOR, {"id": webhook.id})
        await self._execute(SQL_ATTEMPTS_DELETE_FOR, {"id": webhook.id})
        await self._execute(SQL_ENDPOINT_DELETE, {"id": webhook.id})

    async def subscriptions(self) -> list[tuple[int, tuple[str, ...]]]:
        """``(endpoint primary key, event types)`` of every enabled endpoint."""
        rows = await self._fetch(SQL_SUBSCRIPTIONS, {})
        return [(row[0], tuple(row[1].split(","))) for row in rows]

    # --- outbox ------------------------------------------------------------------------------

    async def due(self, now: datetime, limit: int) -> list[int]:
        """Ids of outbox rows due for delivery (to enabled endpoints, no live lease), oldest first."""
        return [row[0] for row in await self._fetch(SQL_OUTBOX_DUE, {"now": now, "limit": limit})]

    async def claim(self, outbox_id: int, owner: str, now: datetime, lease: timedelta) -> OutboxMessage | None:
        """Lease one due outbox row to ``owner``; None if someone else got it first or it is not due."""
        claimed = await self._execute(
            SQL_OUTBOX_CLAIM, {"id": outbox_id, "owner": owner, "now": now, "lease_until": now + lease}
        )
        if claimed != 1:
            return None
        rows = await self._fetch(SQL_OUTBOX_GET, {"id": outbox_id, "owner": owner})
        if not rows:
            return None
        row = rows[0]
        return OutboxMessage(
            id=row[0],
            event_id=row[1],
            endpoint_id=row[2],
            event_type=row[3],
            payload=row[4],
            attempts=row[5],
            created_at=row[6],
        )

    async def settle(
        self, message: OutboxMessage, owner: str, *, state: str, next_attempt_at: datetime, error: str | None
    ) -> bool:
        """Record an attempt's result on the outbox row we lease; False if the lease was lost.

        ``state`` is ``pending`` (retry at ``next_attempt_at``), ``delivered`` or ``failed``.
        """
        settled = await self._execute(
            SQL_OUTBOX_SETTLE,
            {
                "id": message.id,
                "owner": owner,
                "state": state,
                "next_attempt_at": next_attempt_at,
                "error": error,
                "finished_at": None if state == "pending" else utcnow(),
            },
        )
        return settled == 1

    async def backlog(self) -> tuple[int, datetime | None]:
        """How many outbox rows are pending, and when the oldest of them was created."""
        rows = await self._fetch(SQL_OUTBOX_BACKLOG, {})
        count, oldest = rows[0]
        return int(count), oldest

    async def purge(self, before: datetime) -> int:
        """Delete settled outbox rows and attempts older than ``before`` (at most 1000 of each)."""
        removed = await self._execute(SQL_OUTBOX_PURGE, {"before": before})
        return removed + await self._execute(SQL_ATTEMPTS_PURGE, {"before": before})

    # --- delivery log ------------------------------------------------------------------------

    async def record_attempt(
        self,
        message: OutboxMessage,
        *,
        outcome: str,
        status_code: int | None,
        latency_ms: int,
        error: str | None,
        attempted_at: datetime,
    ) -> None:
        """Append one attempt to the delivery log, and keep the endpoint's failure streak."""
        await self._execute(
            SQL_ATTEMPT_INSERT,
            {
                "endpoint_id": message.endpoint_id,
                "outbox_id": message.id,
                "event_id": message.event_id,
                "event_type": message.event_type,
                "attempt": message.attempts + 1,
                "outcome": outcome,
                "status_code": status_code,
                "latency_ms": latency_ms,
                "error": error,
                "attempted_at": attempted_at,
            },
        )
        await self._execute(SQL_STREAK_RESET if outcome == "delivered" else SQL_STREAK_ADD, {"id": message.endpoint_id})

    async def disable_if_failing(self, endpoint_id: int, min_streak: int, reason: str) -> bool:
        """Disable the endpoint if its last ``min_streak`` attempts all failed; fails its pending events."""
        now = utcnow()
        disabled = await self._execute(
            SQL_DISABLE, {"id": endpoint_id, "streak": min_streak, "reason": reason[:255], "now": now}
        )
        if disabled:
            await self._execute(SQL_OUTBOX_FAIL_PENDING, {"id": endpoint_id, "error": "endpoint disabled", "now": now})
        return disabled == 1

    async def attempts(self, endpoint_id: int, *, before: int | None, limit: int) -> list[Attempt]:
        """The endpoint's delivery attempts, newest first, with ids below ``before``, at most ``limit``."""
        rows = await self._fetch(
            SQL_ATTEMPTS_LIST, {"endpoint_id": endpoint_id, "before": before or _MAX_ID, "limit": limit}
        )
        return [
            Attempt(
                id=row[0],
                event_id=row[1],
                event_type=row[2],
                attempt=row[3],
                outcome=row[4],
                status_code=row[5],
                latency_ms=row[6],
                error=row[7],
                attempted_at=row[8],
            )
            for row in rows
        ]


class SubscriptionCache:
    """The per-process view of which enabled endpoints subscribe to which event types.

    Kept per database (host, port, schema: tests run several in one process). Reloaded (one
    ``SELECT`` on the caller's connection) at most once per ``ttl_s``; changes made through this
    process's API clear it at once, changes made elsewhere show within ``ttl_s``.
    """

    def __init__(self, ttl_s: float = 5.0) -> None:
        self.ttl_s = ttl_s
        self._cached: dict[tuple[Any, ...], tuple[float, dict[str, tuple[int, ...]]]] = {}

    def invalidate(self) -> None:
        """Forget the cached subscriptions; the next emit reloads them."""
        self._cached.clear()

    async def endpoints_for(self, conn: Connection, event_type: str) -> tuple[int, ...]:
        """Primary keys of the enabled endpoints that subscribe to ``event_type``."""
        key = (conn.host, conn.port, conn.db)
        cached = self._cached.get(key)
        if cached is None or time.monotonic() >= cached[0]:
            by_type: dict[str, list[int]] = {}
            for endpoint_id, events in await WebhookRepository(conn).subscriptions():
                for event in events:
                    by_type.setdefault(event, []).append(endpoint_id)
            cached = (time.monotonic() + self.ttl_s, {event: tuple(ids) for event, ids in by_type.items()})
            self._cached[key] = cached
        return cached[1].get(event_type, ())


SUBSCRIPTIONS = SubscriptionCache()
"""The per-process subscription cache used by :class:`WebhookOutbox` (``ttl_s`` set at app start-up)."""

_PAYLOAD_ENCODER = msgspec.json.Encoder()


class WebhookOutbox:
    """Writes events into the outbox on the connection of the unit of work that makes the change.

    Call :meth:`emit` inside that unit: the event is committed or rolled back with the change.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    async def emit(self, event_type: EventType, data: Mapping[str, Any]) -> str | None:
        """Queue ``event_type`` with ``data`` for every enabled endpoint subscribed to it.

        The body sent is ``{"type", "timestamp", "data"}`` (Standard Webhooks). Costs nothing when the
        cached subscriptions say nobody listens (a cache reload is one small ``SELECT``), else one
        multi-row ``INSERT``. Returns the event id, or None when nobody subscribes.
        """
        endpoint_ids = await SUBSCRIPTIONS.endpoints_for(self.conn, event_type)
        if not endpoint_ids:
            return None
        now = utcnow()
        event_id = new_event_id()
        payload = _PAYLOAD_ENCODER.encode(
            {"type": event_type, "timestamp": now.isoformat(timespec="microseconds") + "Z", "data": data}
        ).decode()
        rows = [(event_id, endpoint_id, event_type, payload, now, now) for endpoint_id in endpoint_ids]
        async with self.conn.cursor() as cur:
            await cur.executemany(SQL_OUTBOX_INSERT, rows)
        return event_id
