"""Listing job results by time range with keyset pagination."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

Client = AsyncTestClient[Litestar]


def stamp(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def make(client: Client, prefix: str, count: int, status: str = "succeeded") -> list[dict[str, Any]]:
    made = []
    for i in range(count):
        response = await client.put(f"/v1/job-results/{prefix}-{i:03d}", json={"status": status, "result": {"i": i}})
        assert response.status_code == 201
        made.append(response.json())
    return made


async def test_range_is_half_open_and_paginated(client: Client, job_id: str) -> None:
    made = await make(client, job_id, 7)
    start = made[0]["created_at"]
    end = made[-1]["created_at"]  # exclusive: the last one is left out
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"created_from": start, "created_to": end, "limit": "2"}
        if cursor:
            params["cursor"] = cursor
        response = await client.get("/v1/job-results", params=params)
        assert response.status_code == 200
        page = response.json()
        pages += 1
        seen += [item["job_id"] for item in page["items"]]
        assert all("result" not in item for item in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [m["job_id"] for m in made[:-1]]
    assert pages == 3


async def test_offsets_are_honoured(client: Client, job_id: str) -> None:
    made = await make(client, job_id, 2)
    first = datetime.fromisoformat(made[0]["created_at"])
    plus_two = first.astimezone(timezone_offset(2)).isoformat()
    response = await client.get(
        "/v1/job-results", params={"created_from": plus_two, "created_to": stamp(first + timedelta(hours=1))}
    )
    ids = [item["job_id"] for item in response.json()["items"]]
    assert ids[:2] == [m["job_id"] for m in made]


def timezone_offset(hours: int) -> tzinfo:
    from datetime import timezone

    return timezone(timedelta(hours=hours))


async def test_include_result_and_status_filter(client: Client, job_id: str) -> None:
    before = datetime.now(UTC)
    await make(client, job_id + "-ok", 2, "succeeded")
    await make(client, job_id + "-bad", 1, "failed")
    after = datetime.now(UTC) + timedelta(seconds=1)
    response = await client.get(
        "/v1/job-results",
        params={"created_from": stamp(before), "created_to": stamp(after), "status": "failed", "include": "result"},
    )
    items = response.json()["items"]
    assert [item["job_id"] for item in items] == [f"{job_id}-bad-000"]
    assert items[0]["result"] == {"i": 0}


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"created_from": "yesterday"}, "RFC 3339"),
        ({"created_from": "2026-01-01T00:00:00"}, "offset"),
        ({"created_to": "2026-01-01"}, "RFC 3339"),
        ({"created_from": "2026-02-01T00:00:00Z", "created_to": "2026-01-01T00:00:00Z"}, "earlier"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"created_from": "0001-01-01T00:00:00+14:00"}, "RFC 3339"),
        ({"created_to": "9999-12-31T23:59:59-14:00"}, "RFC 3339"),
        ({"status": "done"}, "status"),
        ({"include": "everything"}, "include"),
    ],
)
async def test_bad_parameters_are_400(client: Client, params: dict[str, str], fragment: str) -> None:
    response = await client.get("/v1/job-results", params=params)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert fragment in response.json()["detail"]
