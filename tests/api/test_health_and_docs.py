"""Health probes and the OpenAPI document."""

from __future__ import annotations

import json
from pathlib import Path

from litestar import Litestar
from litestar.testing import AsyncTestClient

Client = AsyncTestClient[Litestar]
OPENAPI_FILE = Path(__file__).resolve().parents[2] / "openapi.json"


async def test_healthz(client: Client) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_when_migrated(client: Client) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_openapi_lists_the_operations(client: Client) -> None:
    schema = (await client.get("/schema/openapi.json")).json()
    paths = schema["paths"]
    assert set(paths["/v1/job-results/{job_id}"]) >= {"get", "put", "delete"}
    assert "get" in paths["/v1/job-results"]
    body = paths["/v1/job-results/{job_id}"]["put"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["status", "result"]
    assert body["properties"]["status"]["enum"] == ["cancelled", "failed", "succeeded"]
    assert body["additionalProperties"] is False


async def test_checked_in_openapi_matches_the_code(client: Client) -> None:
    """openapi.json is regenerated with `just openapi`; API changes then show up in review."""
    live = (await client.get("/schema/openapi.json")).json()
    assert json.loads(OPENAPI_FILE.read_text()) == live, "openapi.json is stale: run `just openapi`"


async def test_swagger_ui_uses_only_local_assets(client: Client) -> None:
    page = await client.get("/schema/swagger")
    assert page.status_code == 200
    html = page.text
    assert "/schema/static/swagger-ui-bundle.js" in html
    assert "/schema/static/swagger-ui.css" in html
    assert "http://" not in html
    assert "https://" not in html
    asset = await client.get("/schema/static/swagger-ui-bundle.js")
    assert asset.status_code == 200
    assert len(asset.content) > 100_000


async def test_metrics_are_documented_as_text_with_their_errors(client: Client) -> None:
    """Found by schemathesis: /metrics answered text/plain and 401 that the document did not list."""
    operation = (await client.get("/schema/openapi.json")).json()["paths"]["/metrics"]["get"]
    assert "text/plain" in operation["responses"]["200"]["content"]
    assert {"401", "403", "429"} <= set(operation["responses"])
    response = await client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")


async def test_download_documents_every_file_type(client: Client) -> None:
    """Found by schemathesis: downloads are json, ndjson, csv or gzip, not only application/json."""
    paths = (await client.get("/schema/openapi.json")).json()["paths"]
    content = paths["/v1/exports/{export_id}/content"]["get"]["responses"]["200"]["content"]
    assert set(content) == {"application/json", "application/x-ndjson", "text/csv", "application/gzip"}


async def test_open_endpoints_are_documented_as_open(client: Client) -> None:
    schema = (await client.get("/schema/openapi.json")).json()
    assert schema["security"] == [{"BearerAuth": []}]
    for path in ("/healthz", "/readyz"):
        assert schema["paths"][path]["get"]["security"] == [{}]
    assert "429" in schema["paths"]["/v1/job-results/{job_id}"]["put"]["responses"]
    assert "304" in schema["paths"]["/v1/job-results/{job_id}"]["get"]["responses"]
