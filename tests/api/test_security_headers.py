"""Security headers on every response, errors included; the docs page gets its own strict CSP."""

from __future__ import annotations

import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from config.settings import Settings
from service.app import create_app

Client = AsyncTestClient[Litestar]

COMMON = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-resource-policy": "same-origin",
}


def assert_common(headers: object, path: str) -> None:
    for name, value in COMMON.items():
        assert headers[name] == value, (path, name)  # type: ignore[index]
    assert "frame-ancestors 'none'" in headers["content-security-policy"]  # type: ignore[index]
    assert headers["strict-transport-security"].startswith("max-age=")  # type: ignore[index]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/healthz", 200),
        ("GET", "/v1/job-results", 200),
        ("GET", "/v1/job-results/does-not-exist", 404),
        ("GET", "/nowhere", 404),
        ("POST", "/v1/job-results/x", 405),
        ("GET", "/v1/job-results?limit=0", 400),
        ("GET", "/v1/exports/" + "0" * 32 + "/content", 404),
    ],
)
async def test_headers_on_every_response(client: Client, method: str, path: str, status: int) -> None:
    response = await client.request(method, path)
    assert response.status_code == status
    assert_common(response.headers, path)
    assert response.headers["content-security-policy"].startswith("default-src 'none'")


async def test_headers_on_401_and_413(client: Client, app: Litestar) -> None:
    unauthorized = await client.get("/v1/job-results", headers={"Authorization": ""})
    assert unauthorized.status_code == 401
    assert_common(unauthorized.headers, "401")
    too_big = await client.put(
        "/v1/job-results/big",
        content=b"x" * (app.state.settings.max_body_bytes + 1),
        headers={"Content-Type": "application/json"},
    )
    assert too_big.status_code == 413
    assert_common(too_big.headers, "413")


async def test_authenticated_responses_are_not_stored(client: Client) -> None:
    assert (await client.get("/v1/job-results")).headers["cache-control"] == "no-store"
    assert (await client.get("/metrics")).headers["cache-control"] == "no-store"


async def test_docs_page_has_a_strict_policy_for_local_assets(client: Client) -> None:
    page = await client.get("/schema/swagger")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "style-src 'self'" in csp
    assert "unsafe" not in csp
    assert "<script>" not in page.text  # no inline script: the page loads swagger-init.js
    assert (await client.get("/schema/static/swagger-init.js")).status_code == 200


async def test_no_server_version_banner(client: Client) -> None:
    response = await client.get("/healthz")
    assert "server" not in response.headers or not any(ch.isdigit() for ch in response.headers["server"])


async def test_hsts_can_be_switched_off(settings: Settings) -> None:
    app = create_app(msgspec.structs.replace(settings, hsts_max_age_s=0, export_worker=False))
    async with AsyncTestClient(app=app) as test_client:
        response = await test_client.get("/healthz")
    assert "strict-transport-security" not in response.headers
    assert response.headers["x-frame-options"] == "DENY"


async def test_500_gets_the_headers_too(settings: Settings) -> None:
    from litestar import get

    @get("/boom", include_in_schema=False)
    async def boom() -> None:
        raise RuntimeError("boom")

    app = create_app(msgspec.structs.replace(settings, export_worker=False, log_level="error"))
    app.register(boom)
    async with AsyncTestClient(app=app) as test_client:
        response = await test_client.get("/boom")
    assert response.status_code == 500
    assert_common(response.headers, "500")
