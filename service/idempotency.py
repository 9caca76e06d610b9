"""Idempotency-Key on the export POSTs, with Stripe's semantics (https://docs.stripe.com/api/idempotent_requests).

* A key is 1-255 printable ASCII characters (400 otherwise), scoped to the API key (without
  authentication: to the client address), kept 24 hours from its first use.
* The request is identified by SHA-256 of its method, path and raw body: the same key with another
  request is 422 ``idempotency-key-reused``, while the first is running too.
* The first request claims the key (an ``INSERT`` in a unit of its own, see
  :mod:`repositories.idempotency`). A duplicate arriving while it runs gets 409
  ``idempotency-key-in-use`` with ``Retry-After``; once it finished, the stored response (status,
  ``Location``, ``Content-Type`` and body, byte for byte) with ``Idempotent-Replayed: true``.
* What is stored: a 2xx (in the same transaction that records the export, so a key never names an
  export that was rolled back, and an export never lacks its key), and a 4xx the operation itself
  answered (404 unknown job, 422 ``csv-too-wide``). Not stored: 409 and 429 (try again later) and
  every 5xx; the key is released and a retry runs the request again. A request refused before it
  ran (400 bad body or key, 401, 403, 415, rate limits) never claims the key.
* A claim whose request died (the process was killed) is taken over by the next request with the
  same key once it is older than twice ``JOBRESULTS_QUERY_TIMEOUT_S`` plus 30 s; the dead request
  could no longer complete it (every change names the claim token it holds).
* Expiry: a key older than 24 hours is treated as new when it is used again (taken over on claim);
  rows of keys never used again are deleted by a batch ``DELETE`` that each process runs at most
  every 10 minutes, after a claim.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import msgspec
import structlog
from litestar import Request, Response

from observability.metrics import IDEMPOTENT_REPLAYS
from repositories.database import Connection, Database
from repositories.domain import utcnow
from repositories.exports import Export
from repositories.idempotency import IdempotencyRepository, StoredKey
from service.problems import PROBLEM_MEDIA_TYPE, ApiError, problem_body

log = structlog.get_logger("jobresults.idempotency")

HEADER = "Idempotency-Key"
KEY_TTL = timedelta(hours=24)
"""How long a key is kept and replayed (Stripe: keys can be removed after 24 hours)."""
KEY_RULE = "Idempotency-Key must be 1 to 255 printable ASCII characters (space to tilde), sent once"
_KEY = re.compile(r"[\x20-\x7e]{1,255}")
PURGE_EVERY_S = 600.0
"""At most one purge of expired keys per process this often (seconds)."""
PURGE_BATCH = 1000
REPLAYED_HEADER = "Idempotent-Replayed"
STORED_HEADERS = ("Location", "ETag", "Content-Type")
"""Response headers kept with a stored response and sent again on replay."""

Rendered = tuple[int, dict[str, str], bytes]
"""A response as stored: ``(status, headers, body)``."""


def cacheable(status: int) -> bool:
    """Whether a response with ``status`` is stored for replay: 2xx, and 4xx other than 409 and 429."""
    return 200 <= status < 300 or (400 <= status < 500 and status not in (409, 429))


def request_hash(method: str, path: str, body: bytes) -> str:
    """SHA-256 (hex) of ``method``, ``path`` and the raw ``body``: what "the same request" means."""
    digest = hashlib.sha256()
    digest.update(f"{method.upper()}\n{path}\n".encode())
    digest.update(body)
    return digest.hexdigest()


def checked_key(request: Request[Any, Any, Any]) -> str | None:
    """The request's ``Idempotency-Key`` value, or None when it sends none.

    Raises:
        ApiError: 400 ``invalid-idempotency-key`` when the value breaks :data:`KEY_RULE` or is sent twice.
    """
    values = request.headers.getall(HEADER, None) or []
    if not values:
        return None
    if len(values) != 1 or not _KEY.fullmatch(values[0]):
        raise ApiError(400, KEY_RULE, slug="invalid-idempotency-key")
    return values[0]


def replay(stored: StoredKey) -> Response[bytes]:
    """The stored response again, marked ``Idempotent-Replayed: true``."""
    IDEMPOTENT_REPLAYS.inc()
    headers = {name: value for name, value in stored.response_headers.items() if name != "Content-Type"}
    headers[REPLAYED_HEADER] = "true"
    return Response(
        content=stored.response_body or b"",
        status_code=stored.status_code or 200,
        headers=headers,
        media_type=stored.response_headers.get("Content-Type", "application/json"),
    )


class Claim:
    """A request's hold on a key: complete it with the response, or release it."""

    def __init__(self, keys: IdempotencyKeys, owner: str, key: str, token: str) -> None:
        self.keys = keys
        self.owner = owner
        self.key = key
        self.token = token

    def recorder(self, render: Callable[[Export], Rendered]) -> Callable[[Connection, Export], Awaitable[None]]:
        """A hook for the unit that records the export: stores ``render(export)`` in the same transaction.

        Raises (inside the unit, which then rolls back):
            ApiError: 409 when the claim was taken over meanwhile (the request took too long).
        """

        async def record(conn: Connection, export: Export) -> None:
            status, headers, body = render(export)
            if not await IdempotencyRepository(conn).complete(
                owner=self.owner,
                key=self.key,
                claim=self.token,
                export_id=export.export_id,
                status_code=status,
                headers={name: value for name, value in headers.items() if name in STORED_HEADERS},
                body=body,
            ):
                raise _in_use()

        return record

    async def store_problem(self, request: Request[Any, Any, Any], error: ApiError) -> None:
        """Store a 4xx problem the operation answered, so a replay answers it again."""
        body = problem_body(error.status, error.detail, request.url.path, slug=error.slug, **error.extensions)
        headers = {"Content-Type": PROBLEM_MEDIA_TYPE, **error.headers}
        await self.keys.db.run(
            lambda conn: IdempotencyRepository(conn).complete(
                owner=self.owner,
                key=self.key,
                claim=self.token,
                export_id=None,
                status_code=error.status,
                headers=headers,
                body=body,
            )
        )

    async def release(self) -> None:
        """Delete the claim unless a response was stored by it (a retry with the key runs again)."""
        try:
            await self.keys.db.run(
                lambda conn: IdempotencyRepository(conn).release(owner=self.owner, key=self.key, claim=self.token)
            )
        except Exception as exc:  # noqa: BLE001 - the claim turns stale and is taken over later
            log.warning("idempotency.release_failed", error=type(exc).__name__)


def _in_use() -> ApiError:
    return ApiError(
        409,
        "a request with this Idempotency-Key is still being processed; retry after it finished",
        slug="idempotency-key-in-use",
        headers={"Retry-After": "1"},
    )


def _reused() -> ApiError:
    return ApiError(
        422,
        "this Idempotency-Key was used with a different request (method, path or body) within 24 hours; "
        "use a new key for a new request",
        slug="idempotency-key-reused",
    )


class IdempotencyKeys:
    """Claims, replays and expiry of idempotency keys for one process (see the module docstring)."""

    def __init__(self, db: Database, query_timeout_s: float) -> None:
        self.db = db
        self.stale_after = timedelta(seconds=2 * query_timeout_s + 30)
        self._purge_at = 0.0
        self._purges: set[asyncio.Task[None]] = set()

    async def begin(self, owner: str, key: str, digest: str) -> Claim | Response[bytes]:
        """Claim ``key`` of ``owner`` for the request whose :func:`request_hash` is ``digest``.

        Returns the :class:`Claim` when the request is to run, else the stored response replayed.

        Raises:
            ApiError: 422 ``idempotency-key-reused``, 409 ``idempotency-key-in-use``.
            DatabaseUnavailable: the claim could not be made.
        """
        token = secrets.token_hex(16)
        for _ in range(3):  # a claim that changed under us is read again
            now = utcnow()
            if await self._claim(owner, key, digest, token, now):
                self._maybe_purge()
                return Claim(self, owner, key, token)
            stored = await self._get(owner, key)
            if stored is None:
                continue  # released or purged meanwhile: claim again
            if stored.claim == token:  # our own INSERT, run again after its answer was lost
                return Claim(self, owner, key, token)
            expired = stored.created_at <= now - KEY_TTL
            if not expired and stored.request_sha256 != digest:
                raise _reused()
            if not expired and stored.state == "done":
                return replay(stored)
            if not expired and stored.claimed_at > now - self.stale_after:
                raise _in_use()
            # Expired (a new key now), or a claim whose request died: take it over.
            if await self._take_over(stored, digest, token, now, expired):
                log.info("idempotency.taken_over", reason="expired" if expired else "stale")
                return Claim(self, owner, key, token)
        raise _in_use()

    async def _claim(self, owner: str, key: str, digest: str, token: str, now: datetime) -> bool:
        return await self.db.run(
            lambda conn: IdempotencyRepository(conn).claim(
                owner=owner, key=key, request_sha256=digest, claim=token, now=now
            ),
            transaction=False,
        )

    async def _get(self, owner: str, key: str) -> StoredKey | None:
        return await self.db.run(lambda conn: IdempotencyRepository(conn).get(owner, key), transaction=False)

    async def _take_over(self, stored: StoredKey, digest: str, token: str, now: datetime, expired: bool) -> bool:
        created_at = now if expired else stored.created_at
        return await self.db.run(
            lambda conn: IdempotencyRepository(conn).take_over(
                stored, request_sha256=digest, claim=token, now=now, created_at=created_at
            )
        )

    def _maybe_purge(self) -> None:
        now = time.monotonic()
        if now < self._purge_at:
            return
        self._purge_at = now + PURGE_EVERY_S
        task = asyncio.get_running_loop().create_task(self._purge_quietly())
        self._purges.add(task)
        task.add_done_callback(self._purges.discard)

    async def _purge_quietly(self) -> None:
        try:
            await self.purge()
        except Exception as exc:  # noqa: BLE001 - the next purge catches up; expired rows only take space
            log.info("idempotency.purge_failed", error=type(exc).__name__)

    async def purge(self) -> int:
        """Delete keys older than 24 hours in batches of :data:`PURGE_BATCH`; returns how many.

        Raises:
            DatabaseUnavailable: the database could not be reached.
        """
        before = utcnow() - KEY_TTL
        deleted = 0
        while True:
            batch = await self.db.run(
                lambda conn: IdempotencyRepository(conn).purge(before, PURGE_BATCH), transaction=False
            )
            deleted += batch
            if batch < PURGE_BATCH:
                return deleted

    async def close(self) -> None:
        """Wait for a running purge to end (cancelled)."""
        for task in list(self._purges):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._purges, return_exceptions=True)


async def run_idempotent(
    request: Request[Any, Any, Any],
    claim: Claim | None,
    work: Callable[[], Awaitable[Response[Any]]],
) -> Response[Any]:
    """Run ``work`` under ``claim`` (or plainly without one): store a cacheable 4xx, release otherwise.

    A 2xx is stored by the export's own unit (:meth:`Claim.recorder`), not here.
    """
    if claim is None:
        return await work()
    try:
        return await work()
    except ApiError as exc:
        if cacheable(exc.status):
            await asyncio.shield(claim.store_problem(request, exc))
        else:
            await asyncio.shield(claim.release())
        raise
    except BaseException:
        await asyncio.shield(claim.release())
        raise


def json_body(value: object) -> bytes:
    """``value`` encoded as the response body (the bytes stored for replay are these bytes)."""
    return msgspec.json.encode(value)
