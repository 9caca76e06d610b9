"""API keys: Bearer tokens with scopes, checked in constant time, cached for a short bounded time.

A token looks like ``jr_<key_id>_<secret>``: ``key_id`` is 12 visible hex characters that name the key
(shown by ``jobresults keys list`` and logged as ``api_key_id``); ``secret`` is 256 random bits
(``secrets.token_urlsafe(32)``). Only SHA-256 of the secret is stored: for a 256-bit random secret a
fast hash is enough (there is nothing to guess). Comparison uses ``hmac.compare_digest``.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cachetools import TTLCache
from limits import RateLimitItem
from limits import parse as parse_limit
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from repositories.api_keys import ApiKey, ApiKeyNotFound, ApiKeyRepository
from repositories.database import Database
from repositories.domain import Scope
from service.problems import ApiError
from service.rate_limit import RateLimiter, bucket_of, client_ip, peer_address

TOKEN_PREFIX = "jr_"  # noqa: S105 - a visible prefix, not a secret
_TOKEN = re.compile(r"jr_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="jobresults"'}


def new_token() -> tuple[str, str, bytes]:
    """A new token: ``(token, key_id, sha256 of the secret)``. The token is shown once, never stored."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return f"{TOKEN_PREFIX}{key_id}_{secret}", key_id, hashlib.sha256(secret.encode()).digest()


EXISTING_KEY_MEMORY_S = 3600.0
"""How long a key id the database returned is remembered as existing (only its id, no secret hash)."""


class Authenticator:
    """Resolves Bearer tokens to API keys with a per-process cache.

    Two bounded caches, each entry kept ``ttl_s`` seconds: ``known`` maps a key id to its stored key
    (secret hash included) and ``unknown`` holds key ids the database does not know; a third,
    ``existing``, remembers for an hour which key ids the database returned. Every request's
    whole token is checked against the cached key (key id and secret hash), so a valid secret under
    another key id, or a wrong secret under a valid key id, is refused and changes no cache entry.
    Only tokens whose key id the database knows enter ``known``: random tokens fill ``unknown`` and
    never evict a real key. A key id costs at most one database read per ``ttl_s`` whichever way it
    resolves; a revoked key stops working within ``ttl_s``.
    """

    def __init__(self, db: Database, ttl_s: float, max_entries: int = 10_000) -> None:
        self.db = db
        self._known: TTLCache[str, ApiKey] = TTLCache(maxsize=max_entries, ttl=ttl_s)
        self._unknown: TTLCache[str, bool] = TTLCache(maxsize=max_entries, ttl=ttl_s)
        self._existing: TTLCache[str, bool] = TTLCache(maxsize=max_entries, ttl=EXISTING_KEY_MEMORY_S)

    async def authenticate(
        self, authorization: str | None, before_lookup: Callable[[], Awaitable[None]] | None = None
    ) -> ApiKey:
        """The live API key named by an ``Authorization: Bearer <token>`` header.

        ``before_lookup`` is awaited once before a key id is looked up anywhere but in ``known``,
        unless the database held that key id within the last :data:`EXISTING_KEY_MEMORY_S` (the rate
        limiter counts the request against its IP there: unknown tokens cannot buy database reads,
        while a real key's refresh after ``ttl_s`` is not refused because its IP is busy); an
        exception it raises propagates.

        Raises:
            ApiError: 401 with ``WWW-Authenticate: Bearer`` when the header is missing or malformed, or
                the key is unknown, wrong or revoked.
        """
        if not authorization:
            raise ApiError(401, "send Authorization: Bearer <API key>", slug="unauthenticated", headers=_CHALLENGE)
        scheme, _, token = authorization.strip().partition(" ")
        match = _TOKEN.fullmatch(token.strip()) if scheme.lower() == "bearer" else None
        if match is None:
            raise ApiError(401, "the API key is missing or malformed", slug="unauthenticated", headers=_CHALLENGE)
        key_id, secret = match.groups()
        key = self._known.get(key_id)
        if key is None:
            if before_lookup is not None and key_id not in self._existing:
                await before_lookup()
            key = await self._lookup(key_id)
        digest = hashlib.sha256(secret.encode()).digest()
        if (
            key is None
            or key.key_id != key_id
            or not hmac.compare_digest(key.secret_sha256, digest)
            or key.revoked_at is not None
        ):
            raise ApiError(401, "the API key is unknown or revoked", slug="unauthenticated", headers=_CHALLENGE)
        return key

    async def _lookup(self, key_id: str) -> ApiKey | None:
        if key_id in self._unknown:
            return None
        try:
            key = await self.db.run(lambda conn: ApiKeyRepository(conn).get(key_id), transaction=False)
        except ApiKeyNotFound:
            self._unknown[key_id] = True
            return None
        self._known[key_id] = key
        self._existing[key_id] = True
        return key


@functools.lru_cache(maxsize=256)
def _parsed_limit(spec: str) -> RateLimitItem:
    """``limits.parse`` of a key's own limit, cached: the same few strings are parsed on every request."""
    return parse_limit(spec)


async def authorize(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Litestar guard: client IP, rate limit, API key and scope, in that order.

    The route's ``opt["scope"]`` (one scope, a tuple of scopes that are all needed, see
    :func:`required_scopes`, or :class:`AnyOf` alternatives) must be among the caller's API key
    scopes. Routes without a scope
    (health, docs) are open and unlimited; every ``/v1`` route must declare one. A request counts
    against its IP before its key is looked up anywhere but in the cache of known keys (unless the
    worker saw that key id exist within the hour: see :meth:`Authenticator.authenticate`), so tokens
    that are malformed, unknown or wrong are all held to the per-IP limit and cannot buy database
    reads. A valid key then counts against its own limit if it has one (which replaces the per-IP
    limit), else against the IP (once) and the per-key limit. With ``JOBRESULTS_AUTH_ENABLED=false``
    keys are not checked (benchmarks of the bare service).

    Raises:
        ApiError: 401 (no valid key), 403 (the key lacks the scope), 429 (rate limit).
    """
    needed: Scope | tuple[Scope, ...] | AnyOf | None = handler.opt.get("scope")
    path = connection.scope["path"]
    is_options = connection.scope.get("method") == "OPTIONS"
    if needed is None and not (is_options and path.startswith("/v1")):
        if path.startswith("/v1"):
            raise ApiError(403, "this operation declares no scope", slug="forbidden")
        return
    state = connection.app.state
    ip = request_ip(connection)
    limiter: RateLimiter | None = state.rate_limiter
    ip_counted = False

    async def count_ip() -> None:
        nonlocal ip_counted
        if limiter is not None and not ip_counted:
            ip_counted = True
            await limiter.enforce("ip", bucket_of(ip), limiter.per_ip)

    if is_options or not state.settings.auth_enabled:
        # Litestar's automatic OPTIONS answers only with the Allow header: open, but counted per IP.
        await count_ip()
        return
    try:
        key = await state.authenticator.authenticate(connection.headers.get("authorization"), before_lookup=count_ip)
    except ApiError:
        await count_ip()
        raise
    connection.scope["state"]["api_key_id"] = key.key_id
    if limiter is not None:
        if key.rate_limit:
            await limiter.enforce("key", key.key_id, _parsed_limit(key.rate_limit))
        else:
            await count_ip()
            if limiter.per_key is not None:
                await limiter.enforce("key", key.key_id, limiter.per_key)
    if isinstance(needed, AnyOf):
        if not any(scope in key.scopes for scope in needed.scopes):
            raise ApiError(403, f"the API key lacks the scope {' or '.join(needed.scopes)}", slug="forbidden")
        return
    missing = [scope for scope in required_scopes(needed or ()) if scope not in key.scopes]
    if missing:
        raise ApiError(403, f"the API key lacks the scope {' and '.join(missing)}", slug="forbidden")


@dataclass(frozen=True)
class AnyOf:
    """Alternative scopes for a route's ``opt["scope"]``: any one of ``scopes`` is enough.

    E.g. webhook reads are allowed with ``webhooks:read`` or ``webhooks:write``.
    """

    scopes: tuple[Scope, ...]


def required_scopes(needed: Scope | tuple[Scope, ...]) -> tuple[Scope, ...]:
    """The scopes a route's ``opt["scope"]`` asks for: one scope name, or a tuple the key needs all of."""
    return (needed,) if isinstance(needed, str) else tuple(needed)


def request_ip(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    """The client address of a request (see :func:`service.rate_limit.client_ip`), stored in its state."""
    scope = connection.scope
    state = scope.setdefault("state", {})
    if "client_ip" not in state:
        client = scope.get("client")
        trusted = connection.app.state.trusted_proxies
        if client:
            address, via_proxy = peer_address(client[0], trusted)
            if not via_proxy:
                state["client_ip"] = address
                return address
        state["client_ip"] = client_ip(client[0] if client else None, connection.headers, trusted)
    ip: str = state["client_ip"]
    return ip
