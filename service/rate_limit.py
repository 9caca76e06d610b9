"""Rate limits per client IP and per API key, shared by every worker and instance through Redis.

Counting uses the ``limits`` library's moving window on ``JOBRESULTS_REDIS_URL``, or on process
memory when no Redis is configured (one worker only: the settings refuse several workers without a
shared store, so a limit is never silently multiplied).

Token leases (Redis only). A limit large enough to spare them is not checked in Redis on every
request: a worker takes a lease of ``B`` requests at once (one moving-window hit of cost ``B``) and
spends it locally for at most a tenth of the window. ``B`` is a tenth of the limit divided by the
number of live workers, which every worker counts in Redis (a heartbeat in a sorted set every few
seconds). So across all workers and instances:

* at most a tenth of the limit is ever held in unspent leases: a client at its limit gets at least
  90% of it;
* a leased request is counted in the window at most a tenth of the window (and at most 10 s) before
  it is served: a client gets at most 110% of its limit in any window.

Both hold while the number of workers is steady; when it changes, within the 10 s that leases live.

A limit too small for a lease of 2 (``10/second`` on 2 workers) is counted exactly, one Redis call
per request, as before. A refused lease falls back to an exact hit of 1, so a client near its limit
is counted exactly too.

The client IP is the TCP peer. ``X-Forwarded-For`` / ``Forwarded`` are honoured only when the peer is
one of ``JOBRESULTS_TRUSTED_PROXIES``: the client is then the right-most address that is not a trusted
proxy. IPv6 clients are counted per /64 network (one host usually owns a whole /64). IPv4-mapped IPv6
addresses (``::ffff:192.0.2.1``) are taken as the IPv4 address everywhere: in buckets, logs and
trusted-proxy matching.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import math
import os
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
LEASE_SHARE = 0.1
"""Share of a limit that unspent leases may hold, and share of its window a lease lives (see above)."""
LEASE_MAX = 1000
"""Largest lease in requests: a lease is one moving-window hit that pushes that many entries."""
WORKERS_KEY = "jobresults:rate-limit:workers"
"""Redis sorted set of live workers (member: a random worker id, score: last heartbeat, Unix s)."""
WORKERS_HEARTBEAT_S = 5.0
"""How often a worker renews its heartbeat and re-reads the live-worker count."""
WORKERS_TTL_S = 15.0
"""A worker without a heartbeat for this long is no longer counted."""
LEASE_MAX_S = WORKERS_TTL_S - WORKERS_HEARTBEAT_S
"""Longest life of a lease: it ends before its worker can drop out of the count."""
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


@functools.lru_cache(maxsize=4096)
def peer_address(peer: str, trusted: tuple[IPNetwork, ...]) -> tuple[str, bool]:
    """A TCP peer's address as :func:`client_ip` gives it, and whether it is a trusted proxy.

    Cached per peer (parsing an address costs several µs, and a connection sends many requests):
    when the peer is not trusted, this is the client's address and no header needs reading.
    """
    address = normalized_address(peer)
    if address is None:
        return peer, False
    return str(address), any(address in network for network in trusted)


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


@functools.lru_cache(maxsize=4096)
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


@dataclass
class _Lease:
    """Requests leased from the shared window and not yet spent by this worker."""

    tokens: int
    expires: float
    """``time.monotonic()`` after which the rest is dropped."""
    refused: bool = False
    """A lease was refused: until ``expires``, this limit is counted exactly (the client is near it)."""


class RateLimiter:
    """Moving-window limits keyed by ``ip:<bucket>`` or ``key:<key_id>``, with token leases (see module)."""

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
        pool = options.get("connection_pool")
        self._redis: redis.asyncio.Redis | None = (
            redis.asyncio.Redis(connection_pool=pool) if isinstance(pool, redis.asyncio.ConnectionPool) else None
        )
        self._worker_id = os.urandom(8).hex()
        self._workers = 0
        """Live workers as last counted; 0 until the first heartbeat (no leases before it)."""
        self._heartbeat_due = 0.0
        self._heartbeat: asyncio.Task[int] | None = None
        self._leases: dict[str, _Lease] = {}
        self._taking: dict[str, asyncio.Future[bool]] = {}

    def lease_size(self, item: RateLimitItem) -> int:
        """Requests one lease of ``item`` takes; 1 means no lease (counted exactly).

        A tenth of the limit per live worker, at most :data:`LEASE_MAX`.
        """
        if self._workers <= 0:
            return 1
        return max(1, min(LEASE_MAX, int(item.amount * LEASE_SHARE / self._workers)))

    def _beat(self) -> None:
        """Renew this worker's heartbeat in the background when due (at most one in flight)."""
        now = time.monotonic()
        if self._redis is None or now < self._heartbeat_due or self._heartbeat is not None:
            return
        self._heartbeat_due = now + WORKERS_HEARTBEAT_S
        self._heartbeat = asyncio.get_running_loop().create_task(self.heartbeat())

    async def heartbeat(self) -> int:
        """Renew this worker's heartbeat and count the live workers; the count (0: none known, no leases).

        Called in the background every :data:`WORKERS_HEARTBEAT_S` while requests come. A Redis
        failure is logged and turns leases off until the next heartbeat; it never fails a request.
        """
        if self._redis is None:
            return 0
        try:
            wall = time.time()
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zadd(WORKERS_KEY, {self._worker_id: wall})
                pipe.zremrangebyscore(WORKERS_KEY, "-inf", wall - WORKERS_TTL_S)
                pipe.zcard(WORKERS_KEY)
                pipe.expire(WORKERS_KEY, int(WORKERS_TTL_S * 4))
                counted = await pipe.execute()
            self._workers = max(1, int(counted[2]))
        except Exception as exc:  # noqa: BLE001 - no count means no leases, never a failed request
            self._workers = 0
            log.warning("rate_limit.heartbeat_failed", error=repr(exc))
        finally:
            self._heartbeat = None
        return self._workers

    async def close(self) -> None:
        """Stop counting this worker (its heartbeat is removed; leases are dropped)."""
        self._leases.clear()
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.zrem(WORKERS_KEY, self._worker_id)

    async def _leased(self, item: RateLimitItem, kind: str, identity: str) -> bool | None:
        """Spend one leased request, taking a new lease when needed; None when no lease applies.

        Returns True when a leased request was spent; None when the limit is counted exactly (too
        small for a lease, or the lease was refused: the client is near its limit).
        """
        self._beat()
        size = self.lease_size(item)
        if size < 2:
            return None
        key = f"{kind}/{identity}/{item.amount}/{item.get_expiry()}"
        while True:
            lease = self._leases.get(key)
            now = time.monotonic()
            if lease is not None and now < lease.expires:
                if lease.refused:
                    return None
                if lease.tokens > 0:
                    lease.tokens -= 1
                    return True
            pending = self._taking.get(key)
            if pending is not None:
                if not await asyncio.shield(pending):
                    return None
                continue
            future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self._taking[key] = future
            try:
                granted = await self.strategy.hit(item, "jobresults", kind, identity, cost=size)
            except BaseException:
                future.set_result(False)
                raise
            finally:
                del self._taking[key]
            life = min(item.get_expiry() * LEASE_SHARE, LEASE_MAX_S)
            self._leases[key] = _Lease(
                tokens=size if granted else 0, expires=time.monotonic() + life, refused=not granted
            )
            if len(self._leases) > 10_000:
                self._drop_expired_leases()
            future.set_result(granted)
            if not granted:
                return None

    def _drop_expired_leases(self) -> None:
        now = time.monotonic()
        for key in [key for key, lease in self._leases.items() if now >= lease.expires]:
            del self._leases[key]

    async def check(self, kind: str, identity: str, item: RateLimitItem) -> Decision:
        """Count one request of ``identity`` against ``item``; the decision says whether it may pass.

        An allowed request costs one Redis call (the moving window's script) or none (a leased
        request); only a refused one also reads the window (for ``Retry-After`` and ``RateLimit-*``).

        Raises:
            ApiError: 503 when the Redis store cannot be reached.
        """
        try:
            if await self._leased(item, kind, identity):
                return Decision(allowed=True, limit=item.amount, remaining=-1, reset_s=0)
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
