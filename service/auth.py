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
from typing import Any

from cachetools import TTLCache
from limits import RateLimitItem
from limits import parse as parse_limit
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from repositories.api_keys import ApiKey, ApiKeyNotFound, ApiKeyRepository
from repositories.database import Database
from service.problems import ApiError
from service.rate_limit import RateLimiter, bucket_of, client_ip

SCOPES: tuple[str, ...] = (
    "results:read",
    "results:write",
    "exports:read",
    "exports:write",
    "metrics:read",
    "webhooks:read",
    "webhooks:write",
)
TOKEN_PREFIX = "jr_"  # noqa: S105 - a visible prefix, not a secret
_TOKEN = re.compile(r"jr_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="jobresults"'}


def new_token() -> tuple[str, str, bytes]:
    """A new token: ``(token, key_id, sha256 of the secret)``. The token is shown once, never stored."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return f"{TOKEN_PREFIX}{key_id}_{secret}", key_id, hashlib.sha256(secret.encode()).digest()


class Authenticator:
    """Resolves Bearer tokens to API keys with a per-process cache.

    A key (or the absence of one) is cached for ``ttl_s`` seconds, at most ``max_entries`` of them: a
    revoked key stops working within ``ttl_s``. Only a cache miss costs a database round trip.
    """

    def __init__(self, db: Database, ttl_s: float, max_entries: int = 10_000) -> None:
        self.db = db
        self._cache: TTLCache[str, ApiKey | None] = TTLCache(maxsize=max_entries, ttl=ttl_s)

    async def authenticate(self, authorization: str | None) -> ApiKey:
        """The live API key named by an ``Authorization: Bearer <token>`` header.

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
        digest = hashlib.sha256(secret.encode()).digest()
        cache_key = digest.hex()
        if cache_key in self._cache:
            key = self._cache[cache_key]
        else:
            key = await self._load(key_id)
            if key is not None and not hmac.compare_digest(key.secret_sha256, digest):
                key = None
            self._cache[cache_key] = key
        if key is None or key.revoked_at is not None:
            raise ApiError(401, "the API key is unknown or revoked", slug="unauthenticated", headers=_CHALLENGE)
        return key

    async def _load(self, key_id: str) -> ApiKey | None:
        try:
            return await self.db.run(lambda conn: ApiKeyRepository(conn).get(key_id), transaction=False)
        except ApiKeyNotFound:
            return None


@functools.lru_cache(maxsize=256)
def _parsed_limit(spec: str) -> RateLimitItem:
    """``limits.parse`` of a key's own limit, cached: the same few strings are parsed on every request."""
    return parse_limit(spec)


async def authorize(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Litestar guard: client IP, rate limit, API key and scope, in that order.

    The route's ``opt["scope"]`` must be one of the caller's API key scopes. Routes without a scope
    (health, docs) are open and unlimited; every ``/v1`` route must declare one. Requests without a
    valid key count against the per-IP limit before they get their 401. With
    ``JOBRESULTS_AUTH_ENABLED=false`` keys are not checked (benchmarks of the bare service).

    Raises:
        ApiError: 401 (no valid key), 403 (the key lacks the scope), 429 (rate limit).
    """
    needed = handler.opt.get("scope")
    path = connection.scope["path"]
    is_options = connection.scope.get("method") == "OPTIONS"
    if needed is None and not (is_options and path.startswith("/v1")):
        if path.startswith("/v1"):
            raise ApiError(403, "this operation declares no scope", slug="forbidden")
        return
    state = connection.app.state
    client = connection.scope.get("client")
    ip = client_ip(client[0] if client else None, connection.headers, state.trusted_proxies)
    connection.scope["state"]["client_ip"] = ip
    limiter: RateLimiter | None = state.rate_limiter
    if is_options:
        # Litestar's automatic OPTIONS answers only with the Allow header: open, but counted per IP.
        if limiter is not None:
            await limiter.enforce("ip", bucket_of(ip), limiter.per_ip)
        return
    if not state.settings.auth_enabled:
        if limiter is not None:
            await limiter.enforce("ip", bucket_of(ip), limiter.per_ip)
        return
    try:
        key = await state.authenticator.authenticate(connection.headers.get("authorization"))
    except ApiError:
        if limiter is not None:
            await limiter.enforce("ip", bucket_of(ip), limiter.per_ip)
        raise
    connection.scope["state"]["api_key_id"] = key.key_id
    if limiter is not None:
        if key.rate_limit:
            await limiter.enforce("key", key.key_id, _parsed_limit(key.rate_limit))
        else:
            await limiter.enforce("ip", bucket_of(ip), limiter.per_ip)
            if limiter.per_key is not None:
                await limiter.enforce("key", key.key_id, limiter.per_key)
    if not _grants(key.scopes, needed):
        raise ApiError(403, f"the API key lacks the scope {_scope_text(needed)}", slug="forbidden")


def _grants(scopes: tuple[str, ...] | list[str], needed: str | tuple[str, ...] | None) -> bool:
    """True if ``scopes`` hold ``needed``: one scope, or a tuple of alternatives (any one suffices)."""
    if isinstance(needed, tuple):
        return any(scope in scopes for scope in needed)
    return needed in scopes


def _scope_text(needed: str | tuple[str, ...] | None) -> str:
    return " or ".join(needed) if isinstance(needed, tuple) else str(needed)
