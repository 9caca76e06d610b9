"""The webhook delivery worker: claims due outbox rows with a lease, signs and posts them, records each attempt.

One worker runs in each service process (``JOBRESULTS_WEBHOOKS_WORKER``). A round reads the ids of due
rows, then leases each with a conditional ``UPDATE`` (one affected row: ours), so any replica delivers
and none sends a row another holds. A process killed mid-delivery stops holding its leases; after
``3 x JOBRESULTS_WEBHOOKS_TIMEOUT_S`` another worker claims the row and sends it again. Delivery is
at-least-once: the ``webhook-id`` (the event id) is the same on every attempt, so receivers deduplicate.

Signing follows the Standard Webhooks specification through its reference library
(``standardwebhooks``): ``webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">``.
For a day after a secret rotation, the previous secret signs too (a second ``v1,`` entry).

Retries: after attempt ``n`` fails the row waits ``min(base * 4**(n-1), max)`` seconds, +-20 % jitter,
until ``JOBRESULTS_WEBHOOKS_MAX_ATTEMPTS``; then it is failed, and the endpoint is disabled if that many
attempts in a row failed (no success in between).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from importlib.metadata import PackageNotFoundError, version

import httpcore
import structlog
from standardwebhooks import Webhook as Signer

from config.settings import Settings
from exports.pipeline import new_owner
from observability.metrics import (
    WEBHOOK_DELIVERIES,
    WEBHOOK_DELIVERY_DURATION,
    WEBHOOK_OLDEST_PENDING_AGE,
    WEBHOOK_PENDING,
)
from repositories.database import Connection, Database, DatabaseUnavailable
from repositories.domain import utcnow
from repositories.webhooks import SUBSCRIPTIONS, OutboxMessage, Webhook, WebhookRepository
from service.outbound import GuardedBackend, RefusedDestination, check_url_syntax

log = structlog.get_logger("jobresults.webhooks")

MAX_RESPONSE_BYTES = 4096
"""At most this much of a receiver's answer is read; the rest is dropped with the connection."""
BATCH = 8
"""Most outbox rows one worker claims and delivers at once."""
BACKOFF_FACTOR = 4
JITTER = 0.2
PREVIOUS_SECRET_VALID = timedelta(hours=24)
"""After a rotation, the old secret also signs deliveries for this long."""
_HOUSEKEEPING_EVERY_S = 5.0
_PURGE_EVERY_S = 600.0


def _user_agent() -> str:
    try:
        return f"jobresults-webhooks/{version('jobresults')}"
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "jobresults-webhooks"


USER_AGENT = _user_agent()


def retry_delay(attempts: int, settings: Settings) -> float:
    """Seconds to wait after ``attempts`` failed attempts: exponential (x4) from the base, capped, +-20 %."""
    delay = min(settings.webhooks_retry_base_s * BACKOFF_FACTOR ** (attempts - 1), settings.webhooks_retry_max_s)
    return float(delay) * random.uniform(1 - JITTER, 1 + JITTER)  # noqa: S311 - jitter, not a secret


def signature_headers(endpoint: Webhook, event_id: str, body: str, now: float) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt at Unix time ``now`` (whole seconds are signed)."""
    timestamp = datetime.fromtimestamp(int(now), UTC)
    signatures = [Signer(endpoint.secret).sign(event_id, timestamp, body)]
    until = endpoint.previous_secret_until
    if endpoint.previous_secret and until is not None and until.replace(tzinfo=UTC) > timestamp:
        signatures.append(Signer(endpoint.previous_secret).sign(event_id, timestamp, body))
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(int(now)),
        "webhook-signature": " ".join(signatures),
    }


class Outcome:
    """What one HTTP attempt came to: ``outcome`` label, status code, error text (safe to show), latency."""

    __slots__ = ("error", "latency_s", "outcome", "status")

    def __init__(self, outcome: str, status: int | None, error: str | None, latency_s: float) -> None:
        self.outcome = outcome
        self.status = status
        self.error = error
        self.latency_s = latency_s


class WebhookDelivery:
    """Delivers queued webhook events for one service process; ``owner`` names it in outbox leases."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self.owner = new_owner()
        self.lease = timedelta(seconds=3 * settings.webhooks_timeout_s)
        self.allow_private = settings.webhooks_allow_private
        timeout = settings.webhooks_timeout_s
        self._timeouts = {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl.create_default_context(),
            max_connections=BATCH * 2,
            keepalive_expiry=30.0,
            retries=0,
            network_backend=GuardedBackend(allow_private=settings.webhooks_allow_private),
        )
        self._task: asyncio.Task[None] | None = None
        self._housekeeping_at = 0.0
        self._purge_at = 0.0
        SUBSCRIPTIONS.ttl_s = settings.webhooks_cache_ttl_s

    def start(self) -> None:
        """Start the background delivery loop (idempotent)."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="webhook-delivery")

    async def stop(self) -> None:
        """Stop the loop and close outgoing connections; rows being delivered are left to their leases."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._pool.aclose()

    async def run_once(self) -> int:
        """Claim up to :data:`BATCH` due events and deliver them concurrently; returns how many were claimed."""
        now = utcnow()
        ids = await self.db.run(lambda conn: WebhookRepository(conn).due(now, BATCH), transaction=False)
        claimed: list[OutboxMessage] = []
        for outbox_id in ids:
            message = await self.db.run(self._claimer(outbox_id, now), transaction=False)
            if message is not None:
                claimed.append(message)
        if claimed:
            await asyncio.gather(*(self.deliver(message) for message in claimed))
        return len(claimed)

    def _claimer(self, outbox_id: int, now: datetime) -> Callable[[Connection], Awaitable[OutboxMessage | None]]:
        return lambda conn: WebhookRepository(conn).claim(outbox_id, self.owner, now, self.lease)

    async def deliver(self, message: OutboxMessage) -> None:
        """Send one claimed event once and record the attempt (never raises but for cancellation)."""
        try:
            endpoint = await self.db.run(
                lambda conn: WebhookRepository(conn).get_by_id(message.endpoint_id), transaction=False
            )
            if endpoint is None or not endpoint.enabled:
                await self.db.run(
                    lambda conn: WebhookRepository(conn).settle(
                        message, self.owner, state="failed", next_attempt_at=utcnow(), error="endpoint disabled"
                    )
                )
                return
            result = await self.post(endpoint, message)
            await self._record(endpoint, message, result)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The lease runs out and the event is tried again; nothing was recorded for this attempt.
            log.exception("webhook.delivery_error", event_id=message.event_id)

    async def post(self, endpoint: Webhook, message: OutboxMessage) -> Outcome:
        """POST the event to the endpoint once: no redirects followed, at most 4 KiB of the answer read."""
        body = message.payload.encode()
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            **signature_headers(endpoint, message.event_id, message.payload, time.time()),
        }
        started = time.perf_counter()
        status: int | None = None
        try:
            check_url_syntax(endpoint.url, allow_private=self.allow_private)
            async with asyncio.timeout(self.settings.webhooks_timeout_s):
                async with self._pool.stream(
                    "POST",
                    endpoint.url,
                    headers=list(headers.items()),
                    content=body,
                    extensions={"timeout": self._timeouts},
                ) as response:
                    status = response.status
                    read = 0
                    async for chunk in response.aiter_stream():
                        read += len(chunk)
                        if read >= MAX_RESPONSE_BYTES:
                            break
        except RefusedDestination as exc:
            return Outcome("refused", None, str(exc), time.perf_counter() - started)
        except (TimeoutError, httpcore.TimeoutException):
            error = f"no answer within {self.settings.webhooks_timeout_s:g} s"
            return Outcome("timeout", status, error, time.perf_counter() - started)
        except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as exc:
            detail = str(exc) or type(exc).__name__
            return Outcome("network_error", status, f"connection failed: {detail}"[:255], time.perf_counter() - started)
        latency = time.perf_counter() - started
        if 200 <= status < 300:
            return Outcome("delivered", status, None, latency)
        return Outcome("http_error", status, f"HTTP {status}", latency)

    async def _record(self, endpoint: Webhook, message: OutboxMessage, result: Outcome) -> None:
        WEBHOOK_DELIVERIES.labels(result.outcome).inc()
        WEBHOOK_DELIVERY_DURATION.observe(result.latency_s)
        attempts = message.attempts + 1
        attempted_at = utcnow()
        max_attempts = self.settings.webhooks_max_attempts
        if result.outcome == "delivered":
            state, next_at = "delivered", attempted_at
        elif attempts >= max_attempts:
            state, next_at = "failed", attempted_at
        else:
            state, next_at = "pending", attempted_at + timedelta(seconds=retry_delay(attempts, self.settings))

        async def unit(conn: Connection) -> tuple[bool, bool]:
            repo = WebhookRepository(conn)
            held = await repo.settle(message, self.owner, state=state, next_attempt_at=next_at, error=result.error)
            await repo.record_attempt(
                message,
                outcome=result.outcome,
                status_code=result.status,
                latency_ms=round(result.latency_s * 1000),
                error=result.error,
                attempted_at=attempted_at,
            )
            disabled = False
            if state == "failed":
                reason = f"disabled after {max_attempts} failed delivery attempts in a row; last: {result.error}"
                disabled = await repo.disable_if_failing(endpoint.id, max_attempts, reason)
            return held, disabled

        held, disabled = await self.db.run(unit)
        log.info(
            "webhook.attempt",
            webhook_id=endpoint.webhook_id,
            event_id=message.event_id,
            event_type=message.event_type,
            attempt=attempts,
            outcome=result.outcome,
            status=result.status,
            state=state,
        )
        if not held:
            log.warning("webhook.lease_lost", event_id=message.event_id)
        if disabled:
            SUBSCRIPTIONS.invalidate()
            log.warning("webhook.endpoint_disabled", webhook_id=endpoint.webhook_id, error=result.error)

    async def housekeeping(self, *, purge: bool) -> None:
        """Publish the queue depth and oldest pending age; with ``purge``, delete settled rows past retention."""
        before = utcnow() - timedelta(days=self.settings.webhooks_retention_days)

        async def unit(conn: Connection) -> tuple[int, datetime | None]:
            repo = WebhookRepository(conn)
            if purge:
                await repo.purge(before)
            return await repo.backlog()

        pending, oldest = await self.db.run(unit, transaction=False)
        WEBHOOK_PENDING.set(pending)
        WEBHOOK_OLDEST_PENDING_AGE.set(max((utcnow() - oldest).total_seconds(), 0.0) if oldest else 0.0)

    async def _loop(self) -> None:
        failures = 0
        while True:
            claimed = 0
            try:
                loop_time = asyncio.get_running_loop().time()
                if loop_time >= self._housekeeping_at:
                    self._housekeeping_at = loop_time + _HOUSEKEEPING_EVERY_S
                    purge = loop_time >= self._purge_at
                    if purge:
                        self._purge_at = loop_time + _PURGE_EVERY_S
                    await self.housekeeping(purge=purge)
                claimed = await self.run_once()
                failures = 0
            except DatabaseUnavailable as exc:
                failures += 1
                if failures == 1:
                    log.warning("webhook.worker_waiting_for_database", error=str(exc))
            except Exception:
                failures += 1
                log.exception("webhook.worker_error")
            if not claimed:
                await asyncio.sleep(min(self.settings.webhooks_poll_s * 2 ** min(failures, 5), 30.0))
