"""Hostile requests cannot add metric series, and requests that match no route are rate limited too."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from config.settings import Settings
from service.app import create_app

Client = AsyncTestClient[Litestar]


@pytest.fixture
async def limited(settings: Settings) -> AsyncIterator[Client]:
    """An in-process app with 10 requests per minute per IP (a window no slow machine outlasts), in memory."""
    app = create_app(msgspec.structs.replace(settings, rate_limit_per_ip="10/minute", export_worker=False))
    async with AsyncTestClient(app=app) as test_client:
        yield test_client


async def test_invented_methods_and_paths_add_no_metric_series(client: Client) -> None:
    methods = [f"MABC{secrets.token_hex(4).upper()}" for _ in range(5)]
    paths = [f"/x{secrets.token_hex(8)}" for _ in range(5)]
    for method, path in zip(methods, paths, strict=True):
        response = await client.request(method, path)
        assert response.status_code in (404, 405)
        response = await client.request(method, "/v1/job-results")
        assert response.status_code == 405
    text = (await client.get("/metrics")).text
    for invented in (*methods, *(p.lstrip("/") for p in paths)):
        assert invented not in text
    series = [line for line in text.splitlines() if line.startswith("jobresults_http_requests_total{")]
    assert any('method="other"' in line and 'route="unmatched"' in line for line in series), series
    labels = {line.split('method="')[1].split('"')[0] for line in series}
    assert labels <= {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "other"}


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("MABC123", "/x", 404), ("MABC123", "/v1/job-results", 405), ("GET", "/no/such/path", 404)],
)
async def test_unmatched_requests_count_against_the_ip(limited: Client, method: str, path: str, status: int) -> None:
    statuses = [(await limited.request(method, path)).status_code for _ in range(12)]
    assert statuses == [status] * 10 + [429] * 2
    response = await limited.request(method, path)
    assert response.status_code == 429
    assert response.headers["content-type"] == "application/problem+json"
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["type"] == "tag:jobresults,2026:problem/rate-limited"
    assert response.headers["x-content-type-options"] == "nosniff"
    # The same budget: an API call from this IP is refused too.
    assert (await limited.get("/v1/job-results")).status_code == 429
