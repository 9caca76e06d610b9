"""Parsing is consistent: strict integers, every bad parameter listed, no duplicate keys, no forged cursors."""

from __future__ import annotations

import base64

import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

Client = AsyncTestClient[Litestar]
RANGE = {"format": "json", "created_from": "2020-01-01T00:00:00Z", "created_to": "2020-01-02T00:00:00Z"}


@pytest.mark.parametrize("path", ["/v1/job-results", "/v1/exports"])
@pytest.mark.parametrize("limit", ["1e3", "1.0", "10.5", "-1", "0x10", " 5", "5000", "0", "007"])
async def test_limit_takes_whole_numbers_in_range_only(client: Client, path: str, limit: str) -> None:
    response = await client.get(path, params={"limit": limit})
    assert response.status_code == 400, response.text
    problem = response.json()
    assert [(e["name"], e["source"]) for e in problem["errors"]] == [("limit", "query")]
    assert "1 to 1000" in problem["errors"][0]["message"]


async def test_every_bad_parameter_is_listed(client: Client) -> None:
    response = await client.get(
        "/v1/job-results", params={"created_from": "yesterday", "limit": "5000", "status": "done"}
    )
    assert response.status_code == 400
    problem = response.json()
    assert problem["type"] == "tag:jobresults,2026:problem/invalid-request"
    assert sorted(e["name"] for e in problem["errors"]) == ["created_from", "limit", "status"]
    for name in ("created_from", "limit", "status"):
        assert name in problem["detail"]
    exports = await client.get("/v1/exports", params={"state": "done", "limit": "1e3"})
    assert sorted(e["name"] for e in exports.json()["errors"]) == ["limit", "state"]


@pytest.mark.parametrize(
    ("path", "query"),
    [
        ("/v1/job-results", "limit=1&limit=1e3"),  # the check read the first value, Litestar the last
        ("/v1/job-results", "job_id_prefix=a&job_id_prefix=b"),
        ("/v1/job-results", "include=result&include=result"),
        ("/v1/exports", "limit=2&limit=2"),
        ("/v1/webhooks", "limit=1&limit=1.0"),
    ],
)
async def test_a_repeated_parameter_is_refused(client: Client, path: str, query: str) -> None:
    response = await client.get(f"{path}?{query}")
    assert response.status_code == 400, response.text
    (error,) = response.json()["errors"]
    assert error["name"] == query.split("=", 1)[0]
    assert "once" in error["message"]


@pytest.mark.parametrize(
    "query",
    ["status=failed&status=succeeded", "label=a:1&label=a:2&label=b", "status=failed&label=x&status=cancelled"],
)
async def test_a_list_parameter_may_repeat(client: Client, query: str) -> None:
    response = await client.get(f"/v1/job-results?{query}&created_from=2020-01-01T00:00:00Z&limit=1")
    assert response.status_code == 200, response.text


async def test_each_value_of_a_list_parameter_is_checked(client: Client) -> None:
    response = await client.get("/v1/job-results?status=failed&status=done")
    assert response.status_code == 400, response.text
    (error,) = response.json()["errors"]
    assert error["name"] == "status"
    assert "succeeded" in error["message"]
    too_many = "&".join(f"label=k:{i}" for i in range(33))
    response = await client.get(f"/v1/job-results?{too_many}")
    assert response.status_code == 400, response.text
    (error,) = response.json()["errors"]
    assert error["name"] == "label"
    assert "at most 32" in error["message"]


async def test_good_parameters_still_pass(client: Client) -> None:
    response = await client.get(
        "/v1/job-results",
        params={"created_from": "2020-01-01T00:00:00+01:00", "limit": "7", "status": "failed"},
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/job-results/{job}/exports", b'{"format": "json", "format": "csv"}'),
        ("/v1/exports", msgspec.json.encode(RANGE)[:-1] + b', "format": "csv"}'),
    ],
)
async def test_export_bodies_refuse_duplicate_keys_like_put(
    client: Client, job_id: str, path: str, body: bytes
) -> None:
    await client.put(f"/v1/job-results/{job_id}", json={"status": "succeeded", "result": 1})
    response = await client.post(path.format(job=job_id), content=body, headers={"Content-Type": "application/json"})
    put = await client.put(
        f"/v1/job-results/{job_id}",
        content=b'{"status": "succeeded", "status": "failed", "result": 1}',
        headers={"Content-Type": "application/json"},
    )
    assert put.status_code == 422
    assert response.status_code == put.status_code, response.text
    assert response.json()["type"] == put.json()["type"]
    assert response.json()["json_path"] == "$.format"


async def test_a_forged_cursor_offset_is_refused(client: Client) -> None:
    for created_at in ("2026-01-01T00:00:00+05:00", "2026-01-01T00:00:00Z"):
        forged = base64.urlsafe_b64encode(msgspec.json.encode([created_at, 1])).decode().rstrip("=")
        response = await client.get("/v1/job-results", params={"cursor": forged})
        assert response.status_code == 400, created_at
        assert "cursor" in response.json()["detail"]
    genuine = base64.urlsafe_b64encode(msgspec.json.encode(["2026-01-01T00:00:00", 1])).decode().rstrip("=")
    assert (await client.get("/v1/job-results", params={"cursor": genuine})).status_code == 200
