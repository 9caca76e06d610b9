"""Rate limits: 10/s per client IP by default, a key's own limit instead, shared by workers through Redis."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import msgspec
import pytest
import redis.asyncio
from limits import parse
from litestar import Litestar
from litestar.testing import AsyncTestClient

from config.settings import Settings
from service.app import create_app
from service.rate_limit import RateLimiter
from tests.conftest import REDIS_URL, make_token
from tests.support.servers import Servers

Client = AsyncTestClient[Litestar]


@pytest.fixture
async def limited(settings: Settings) -> AsyncIterator[Client]:
    """An in-process app with the default 10/s per IP, counting in memory (one process)."""
    app = create_app(msgspec.structs.replace(settings, rate_limit_per_ip="10/second", export_worker=False))
    async with AsyncTestClient(app=app) as test_client:
        yield test_client


async def test_per_ip_limit_gives_429_problem_with_headers(limited: Client) -> None:
    statuses = [(await limited.get("/v1/job-results")).status_code for _ in range(15)]
    assert statuses[:10] == [401] * 10  # no key: counted per IP, then refused for the key
    assert statuses[10:] == [429] * 5
    response = await limited.get("/v1/job-results")
    assert response.status_code == 429
    assert response.headers["content-type"] == "application/problem+json"
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["ratelimit-limit"] == "10"
    assert response.headers["ratelimit-remaining"] == "0"
    assert "ratelimit-reset" in response.headers
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "10 requests per 1 s" in response.json()["detail"]
    # Health and docs are not limited.
    assert (await limited.get("/healthz")).status_code == 200


async def test_a_keys_own_limit_replaces_the_ip_limit(limited: Client, database_url: str) -> None:
    token = make_token(database_url, rate_limit="3/second")
    headers = {"Authorization": f"Bearer {token}"}
    statuses = [(await limited.get("/v1/job-results", headers=headers)).status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    await asyncio.sleep(1.05)
    assert (await limited.get("/v1/job-results", headers=headers)).status_code == 200


# --- a real Granian with 4 workers sharing Redis ---------------------------------------------------


@pytest.fixture
def four_workers(servers: Servers, database_url: str) -> str:
    """Base URL of a real ``jobresults serve`` with 4 workers counting in one Redis."""
    server = servers.start(
        database_url, workers=4, redis_url=REDIS_URL, pool_min_size=1, pool_max_size=2, ready_path="/readyz"
    )
    time.sleep(1.1)  # let earlier tests' windows for this address pass
    return server.base_url


def burst(base: str, count: int, headers_of: Callable[[int], dict[str, str]]) -> tuple[list[int], float]:
    """``count`` requests as fast as 8 threads on a pooled client send them; statuses and seconds taken.

    Eight connections are opened, so the kernel spreads them over the workers.
    """
    with httpx.Client(base_url=base, timeout=10, limits=httpx.Limits(max_connections=8)) as client:
        client.get("/healthz")  # open a connection before the clock starts

        def one(i: int) -> int:
            return client.get("/v1/job-results?limit=1", headers=headers_of(i)).status_code

        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            started = time.monotonic()
            statuses = list(pool.map(one, range(count)))
            return statuses, time.monotonic() - started


def test_four_workers_share_one_limit(four_workers: str, database_url: str) -> None:
    token = make_token(database_url, rate_limit=None)  # held to the 10/s per-IP default
    statuses, seconds = burst(four_workers, 40, lambda i: {"Authorization": f"Bearer {token}"})
    allowed = 10 * math.ceil(seconds)  # a moving window of 1 s: 10 per started second
    assert 10 <= statuses.count(200) <= allowed, (statuses, seconds)
    assert statuses.count(200) + statuses.count(429) == 40
    if seconds < 1.0:
        assert statuses.count(200) == 10


def test_spoofed_forwarded_for_from_an_untrusted_peer_is_one_client(four_workers: str, database_url: str) -> None:
    token = make_token(database_url, rate_limit=None)

    def spoofed(i: int) -> dict[str, str]:
        fake = ".".join(str(random.randint(1, 254)) for _ in range(4))
        return {"Authorization": f"Bearer {token}", "X-Forwarded-For": fake, "Forwarded": f"for={fake}"}

    statuses, seconds = burst(four_workers, 100, spoofed)
    assert statuses.count(200) <= 10 * math.ceil(seconds), (statuses, seconds)
    assert statuses.count(429) >= 100 - 10 * math.ceil(seconds)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv6_peers_are_limited(servers: Servers, database_url: str) -> None:
    # 10 per minute, not per second: 14 requests on fresh connections take over 1 s on a busy machine.
    server = servers.start(database_url, host="::1", workers=1, rate_limit_per_ip="10/minute")
    statuses = [httpx.get(f"{server.base_url}/v1/job-results", timeout=5).status_code for _ in range(14)]
    assert statuses.count(401) == 10, statuses
    assert statuses.count(429) == 4, statuses
    lines = [line for line in server.output().splitlines() if '"event":"request"' in line]
    assert any('"client_ip":"::1"' in line for line in lines), lines[-3:]


async def test_options_is_open_but_counted(limited: Client) -> None:
    statuses = [(await limited.options("/v1/job-results/x")).status_code for _ in range(12)]
    assert statuses[:10] == [204] * 10 or statuses[:10] == [200] * 10, statuses
    assert statuses[10:] == [429, 429]


async def test_readyz_is_503_when_redis_is_unreachable(settings: Settings) -> None:
    app = create_app(msgspec.structs.replace(settings, redis_url="redis://127.0.0.1:1/0", export_worker=False))
    async with AsyncTestClient(app=app) as test_client:
        ready = await test_client.get("/readyz")
        assert ready.status_code == 503
        assert "Redis" in ready.json()["detail"]
        assert (await test_client.get("/healthz")).status_code == 200


# --- token leases: large limits are not checked in Redis on every request ---------------------------

LEASE_REDIS_URL = REDIS_URL.rsplit("/", 1)[0] + "/13"
"""A Redis database of the lease tests' own: its live-worker count is theirs alone."""


async def test_two_workers_leasing_keep_a_large_limit_within_ten_percent() -> None:
    """Two limiters (two workers) share a 200/minute limit through leases of a tenth per worker."""
    async with redis.asyncio.Redis.from_url(LEASE_REDIS_URL) as client:
        await client.flushdb()
    workers = [RateLimiter("async+" + LEASE_REDIS_URL, "10/second", None) for _ in range(2)]
    calls = 0
    for limiter in workers:
        hit = limiter.strategy.hit

        async def counted(*args: Any, _hit: Callable[..., Awaitable[bool]] = hit, **kwargs: Any) -> bool:
            nonlocal calls
            calls += 1
            return await _hit(*args, **kwargs)

        limiter.strategy.hit = counted  # type: ignore[method-assign]
    try:
        for limiter in workers + workers:  # the second round sees both
            await limiter.heartbeat()
        assert [await limiter.heartbeat() for limiter in workers] == [2, 2]
        limit = parse("200/minute")
        identity = f"lease-{random.getrandbits(32)}"
        assert workers[0].lease_size(limit) == 10
        allowed = 0
        for i in range(160):
            allowed += (await workers[i % 2].check("key", identity, limit)).allowed
        assert allowed == 160
        assert calls == 16, calls  # one Redis hit per lease of 10, not one per request
        for i in range(140):
            allowed += (await workers[i % 2].check("key", identity, limit)).allowed
        # Unspent leases hold at most a tenth of the limit; nothing is served beyond it in one window.
        assert 180 <= allowed <= 200, allowed
        # Near the limit each worker is refused one lease, then counts exactly: one hit per request.
        assert calls <= 20 + 2 + 140, calls
    finally:
        for limiter in workers:
            await limiter.close()


async def test_small_limits_are_counted_exactly_one_hit_per_request() -> None:
    async with redis.asyncio.Redis.from_url(LEASE_REDIS_URL) as client:
        await client.flushdb()
    workers = [RateLimiter("async+" + LEASE_REDIS_URL, "10/second", None) for _ in range(2)]
    try:
        for limiter in workers + workers:
            await limiter.heartbeat()
        assert workers[0].lease_size(workers[0].per_ip) == 1  # 10 * 0.1 / 2 workers: no lease
        identity = f"exact-{random.getrandbits(32)}"
        decisions = [await workers[i % 2].check("ip", identity, workers[0].per_ip) for i in range(30)]
        assert [d.allowed for d in decisions].count(True) == 10
    finally:
        for limiter in workers:
            await limiter.close()


def test_four_workers_lease_a_keys_large_limit_and_still_hold_it(servers: Servers, database_url: str) -> None:
    server = servers.start(
        database_url, workers=4, redis_url=LEASE_REDIS_URL, pool_min_size=1, pool_max_size=2, ready_path="/readyz"
    )
    token = make_token(database_url, rate_limit="600/minute")
    headers = {"Authorization": f"Bearer {token}"}
    statuses, seconds = burst(server.base_url, 800, lambda i: headers)
    assert seconds < 50, seconds  # one window: the counts below are for one minute
    # At most a tenth of the limit waits in unspent leases across all workers; none beyond it is served.
    assert 540 <= statuses.count(200) <= 600, (statuses.count(200), seconds)
    assert statuses.count(200) + statuses.count(429) == 800
