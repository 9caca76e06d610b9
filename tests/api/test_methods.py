"""Methods: HEAD wherever GET is served, one true Allow per route, and our own problem type on 405/413."""

from __future__ import annotations

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

Client = AsyncTestClient[Litestar]
OUR_TYPE = "tag:jobresults,2026:problem/"

ALLOW = {
    "/healthz": "GET, HEAD, OPTIONS",
    "/readyz": "GET, HEAD, OPTIONS",
    "/metrics": "GET, HEAD, OPTIONS",
    "/v1/job-results": "GET, HEAD, OPTIONS",
    "/v1/job-results/{job}": "GET, HEAD, PUT, DELETE, OPTIONS",
    "/v1/job-results/{job}/exports": "POST, OPTIONS",
    "/v1/exports": "GET, HEAD, POST, OPTIONS",
    "/v1/exports/" + "0" * 32: "GET, HEAD, DELETE, OPTIONS",
    "/v1/exports/" + "0" * 32 + "/cancel": "POST, OPTIONS",
    "/v1/exports/" + "0" * 32 + "/content": "GET, HEAD, OPTIONS",
    "/schema/openapi.json": "GET, HEAD, OPTIONS",
}


@pytest.mark.parametrize(("path", "allow"), ALLOW.items())
async def test_options_and_405_name_the_same_true_methods(client: Client, job_id: str, path: str, allow: str) -> None:
    url = path.format(job=job_id)
    options = await client.options(url)
    assert options.status_code in (200, 204)
    assert options.headers["allow"] == allow
    refused = next(m for m in ("PATCH", "POST", "PUT") if m not in allow.split(", "))
    response = await client.request(refused, url)
    assert response.status_code == 405
    assert response.headers["allow"] == allow
    problem = response.json()
    assert problem["type"] == OUR_TYPE + "method-not-allowed"
    assert problem["detail"].endswith(f"allowed: {allow}")


async def test_413_has_our_own_type(client: Client, job_id: str, app: Litestar) -> None:
    huge = b"x" * (app.state.settings.max_body_bytes + 1)
    response = await client.put(f"/v1/job-results/{job_id}", content=huge, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json()["type"] == OUR_TYPE + "content-too-large"


async def test_framework_errors_never_use_about_blank(client: Client, job_id: str) -> None:
    responses = [
        await client.put(
            f"/v1/job-results/{job_id}",
            content=b'{"status":"succeeded","result":1}',
            headers={"Content-Type": "application/json", "Content-Length": "9" * 5000},
        ),
        await client.request("MABC123", "/v1/job-results"),
        await client.get("/nowhere"),
    ]
    for response in responses:
        assert response.status_code in (400, 404, 405)
        problem = response.json()
        assert problem["type"].startswith(OUR_TYPE), problem
        assert len(problem.get("detail") or "") < 400


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/schema/openapi.json"])
async def test_head_is_served_wherever_get_is(client: Client, path: str) -> None:
    get = await client.get(path)
    head = await client.head(path)
    assert head.status_code == get.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    assert head.headers["content-length"] == get.headers["content-length"]


async def test_head_of_a_job_result_and_of_export_content(client: Client, job_id: str) -> None:
    put = await client.put(f"/v1/job-results/{job_id}", json={"status": "succeeded", "result": "x" * 5000})
    assert put.status_code == 201
    head = await client.head(f"/v1/job-results/{job_id}")
    assert head.status_code == 200
    assert head.headers["etag"] == put.headers["etag"]
    assert head.content == b""
    assert (await client.head(f"/v1/job-results/{job_id}-missing")).status_code == 404
    record = (await client.post(f"/v1/job-results/{job_id}/exports", json={"format": "json"})).json()
    url = record["content_url"]
    head = await client.head(url)
    assert head.status_code == 200
    assert head.content == b""
    assert int(head.headers["content-length"]) == record["bytes"]
    assert head.headers["etag"] == f'"{record["sha256"]}"'
    part = await client.head(url, headers={"Range": "bytes=0-9"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 0-9/{record['bytes']}"
    assert part.content == b""
    # HEAD is authorised like GET.
    assert (await client.head(url, headers={"Authorization": ""})).status_code == 401
