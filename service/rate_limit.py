"""Rate limits per client IP and per API key, shared by every worker and instance through Redis.

Counting uses the ``limits`` library's moving window (one Redis script call per request) on
``JOBRESULTS_REDIS_URL``, or on process memory when no Redis is configured (one worker only: the
settings refuse several workers without a shared store, so a limit is never silently multiplied).

The client IP is the TCP peer. ``X-Forwarded-For`` / ``Forwarded`` are honoured only when the peer is
one of ``JOBRESULTS_TRUSTED_PROXIES``: the client is then the right-most address that is not a trusted
proxy. IPv6 clients are counted per /64 network (one host usually owns a whole /64). IPv4-mapped IPv6
addresses (``::ffff:192.0.2.1``) are taken as the IPv4 address everywhere: in buckets, logs and
trusted-proxy matching.
"""

from __future__ import annotations

import ipaddress
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import redis.asyncio
import structlog
from limits import RateLimitItem, parse
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from limits.storage import storage_from_string
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from observability.metrics import RATE_LIMITED
from service.problems import ApiError, send_api_error

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
REDIS_MAX_CONNECTIONS = 64
"""Redis connections per worker process for the rate limiter."""
REDIS_POOL_WAIT_S = 2.0
"""Longest wait for a free Redis connection before the request gets a 503."""
log = structlog.get_logger("jobresults.rate_limit")
_FORWARDED_FOR = re.compile(r'for="?\[?([^\]";,]+)\]?(?::\d+)?"?', re.IGNORECASE)


_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
"""IPv4-mapped IPv6 addresses (RFC 4291 section 2.5.5.2): an IPv4 client seen through a dual-stack socket."""


def parse_networks(spec: str) -> tuple[IPNetwork, ...]:
    """``"10.0.0.1, 192.168.0.0/16, ::1"`` to networks; IPv4-mapped networks become IPv4 networks.

    Raises:
        ValueError: an entry is not an IP address or network.
    """
    return tuple(
        _unmapped_network(ipaddress.ip_network(part.strip(), strict=False)) for part in spec.split(",") if part.strip()
    )


def _unmapped_network(network: IPNetwork) -> IPNetwork:
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_IPV4_MAPPED):
        return ipaddress.IPv4Network(f"{network.network_address.ipv4_mapped}/{network.prefixlen - 96}")
    return network


def normalized_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address from a peer or forwarded-for entry (brackets and port dropped), or None.

    IPv4-mapped IPv6 addresses (``::ffff:192.0.2.1``) come back as the IPv4 address they carry, so an
    IPv4 client is the same client, with its own rate-limit bucket and the same trusted-proxy match,
    whether it reached a dual-stack socket or an IPv4 one.
    """
    text = text.strip().strip('"')
    if text.startswith("[") and "]" in text:
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # IPv4 with a port
        text = text.split(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_ip(peer: str | None, headers: Mapping[str, str], trusted: Sequence[IPNetwork]) -> str:
    """The client's address: the peer, or (behind trusted proxies) the forwarded client.

    ``headers`` maps lower-case header names to values (a dict, or Litestar's case-insensitive
    ``Headers``). Sources: RFC 7239 (``Forwarded``) and the de-facto ``X-Forwarded-For``; both are
    appended to by each proxy, so the list is read from the right and trusted proxies are skipped.
    """
    address = normalized_address(peer) if peer else None
    if address is None:
        return peer or "unknown"
    if not any(address in network for network in trusted):
        return str(address)
    chain: list[str] = []
    if "forwarded" in headers:
        chain = _FORWARDED_FOR.findall(headers["forwarded"])
    elif "x-forwarded-for" in headers:
        chain = [part for part in headers["x-forwarded-for"].split(",") if part.strip()]
    for hop in reversed(chain):
        forwarded = normalized_address(hop)
        if forwarded is None:
            break
        if not any(forwarded in network for network in trusted):
            return str(forwarded)
        address = forwarded
    return str(address)


def bucket_of(ip: str) -> str:
    """The counting key of an address: IPv4 (IPv4-mapped IPv6 included) as is, IPv6 by its /64 network."""
    address = normalized_address(ip)
    if address is None:
        return ip
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


@dataclass(frozen=True)
class Decision:
    """Outcome of one check: the limit, what remains of it, seconds until the window frees a slot."""

    allowed: bool
    limit: int
    remaining: int
    """Requests left in the window; -1 when not read (allowed requests skip that Redis call)."""
    reset_s: int

    def headers(self) -> dict[str, str]:
        """``RateLimit-*`` headers (IETF draft-ietf-httpapi-ratelimit-headers) and, when refused, ``Retry-After``."""
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_s),
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, self.reset_s))
        return headers


class RateLimiter:
    """Moving-window limits keyed by ``ip:<bucket>`` or ``key:<key_id>``."""

    def __init__(self, storage_url: str, per_ip: str, per_key: str | None) -> None:
        # wrap_exceptions: Redis failures surface as limits.errors.StorageError, answered with 503.
        options: dict[str, object] = {}
        if storage_url.split("://", 1)[0] in ("async+redis", "async+rediss"):
            # redis-py (with hiredis) rather than limits' default coredis: less client CPU per hit.
            # A blocking pool: under a burst, a request waits for one of the connections
            # instead of failing at once (redis-py's default pool raises MaxConnectionsError).
            options["implementation"] = "redispy"
            options["connection_pool"] = redis.asyncio.BlockingConnectionPool.from_url(
                storage_url.removeprefix("async+"), max_connections=REDIS_MAX_CONNECTIONS, timeout=REDIS_POOL_WAIT_S
            )
        self.storage = storage_from_string(storage_url, wrap_exceptions=True, **options)  # type: ignore[arg-type]
        self.strategy = MovingWindowRateLimiter(self.storage)
        self.per_ip: RateLimitItem = parse(per_ip)
        self.per_key: RateLimitItem | None = parse(per_key) if per_key else None

    async def check(self, kind: str, identity: str, item: RateLimitItem) -> Decision:
        """Count one request of ``identity`` against ``item``; the decision says whether it may pass.

        An allowed request costs one Redis call (the moving window's script); only a refused one also
        reads the window (for ``Retry-After`` and ``RateLimit-*``).
        """
        try:
            allowed = await self.strategy.hit(item, "jobresults", kind, identity)
            if allowed:
                return Decision(allowed=True, limit=item.amount, remaining=-1, reset_s=0)
            stats = await self.strategy.get_window_stats(item, "jobresults", kind, identity)
        except StorageError as exc:
            log.error("rate_limit.store_unavailable", error=repr(exc))
            raise ApiError(
                503,
                "the rate-limit store is unavailable; retry later",
                slug="rate-limit-store-unavailable",
                headers={"Retry-After": "1"},
            ) from None
        reset_s = max(0, math.ceil(stats.reset_time - time.time()))
        return Decision(allowed=False, limit=item.amount, remaining=stats.remaining, reset_s=reset_s)

    async def enforce(self, kind: str, identity: str, item: RateLimitItem) -> Decision:
        """Like :meth:`check`, but refuse with a 429 problem (``Retry-After``, ``RateLimit-*``).

        Raises:
            ApiError: 429 when the limit is used up.
        """
        decision = await self.check(kind, identity, item)
        if not decision.allowed:
            RATE_LIMITED.labels(kind).inc()
            log.warning("rate_limited", limit_kind=kind, identity=identity, limit=str(item))
            raise ApiError(
                429,
                f"rate limit of {item.amount} requests per {item.get_expiry()} s exceeded; "
                f"retry after {max(1, decision.reset_s)} s",
                slug="rate-limited",
                headers=decision.headers(),
            )
        return decision


class UnroutedRateLimitMiddleware:
    """ASGI middleware: requests that match no route (404, 405) count against the per-IP limit.

    Routed ``/v1`` and ``/metrics`` requests are counted by the ``authorize`` guard; a request with an
    unknown path or method never reaches a guard, so it is counted here, when Litestar answers it
    without having picked a route handler. Over the limit, the 404/405 is replaced by the same 429
    problem a routed request gets. ``state`` is the application's state (``rate_limiter``,
    ``trusted_proxies``), read per request because the lifespan fills it in.
    """

    def __init__(self, app: ASGIApp, state: object) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection; only ``http`` scopes are counted."""
        limiter: RateLimiter | None = getattr(self.state, "rate_limiter", None)
        if scope["type"] != "http" or limiter is None:  # type: ignore[comparison-overlap]
            await self.app(scope, receive, send)
            return
        refused = False

        async def counted_send(message: Message) -> None:
            nonlocal refused
            if refused:
                return
            if message["type"] == "http.response.start" and "route_handler" not in scope:
                try:
                    await limiter.enforce("ip", bucket_of(self._client_ip(scope)), limiter.per_ip)
                except ApiError as exc:
                    refused = True
                    await send_api_error(exc, scope["path"], send)
                    return
            await send(message)

        await self.app(scope, receive, counted_send)

    def _client_ip(self, scope: Scope) -> str:
        state = scope.setdefault("state", {})
        if "client_ip" not in state:
            headers = {
                name.decode("latin-1"): value.decode("latin-1")
                for name, value in scope.get("headers", ())
                if name in (b"forwarded", b"x-forwarded-for")
            }
            client = scope.get("client")
            trusted = getattr(self.state, "trusted_proxies", ())
            state["client_ip"] = client_ip(client[0] if client else None, headers, trusted)
        ip: str = state["client_ip"]
        return ip
