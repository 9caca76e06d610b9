"""Retention of job results (issue 14): ``retention_days``, ``pinned``, ``expires_at``, and expired results
gone for every reader and writer at once, before any purge.

Rows are made to expire without waiting days: the test moves a stored ``expires_at`` into the past with
a direct ``UPDATE`` (the purge is off in the session app, so the rows stay physically present).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from config.settings import Settings
from service.app import create_app
from tests.conftest import connect, make_token
from tests.support.exports import wait_done

Client = AsyncTestClient[Litestar]


def parse(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def put(client: Client, job_id: str, headers: dict[str, str] | None = None, **fields: Any) -> Any:
    body = {"status": "succeeded", "result": {"job": job_id}, **fields}
    return await client.put(f"/v1/job-results/{job_id}", json=body, headers=headers or {})


def _connect(client: Client) -> Any:
    """A plain connection to the database behind ``client``'s app (its settings name it)."""
    return connect(client.app.state.settings.database_url)


async def expire(client: Client, *job_ids: str, ago: timedelta = timedelta(seconds=1)) -> None:
    """Move the stored expiry of ``job_ids`` into the past (what the clock would do in ``retention_days``)."""
    past = datetime.now(UTC).replace(tzinfo=None) - ago
    with _connect(client) as conn, conn.cursor() as cur:
        for job_id in job_ids:
            changed = cur.execute(
                "UPDATE job_results SET expires_at = %(past)s, pinned = FALSE WHERE job_id = %(job_id)s",
                {"past": past, "job_id": job_id},
            )
            assert changed == 1


async def stored_count(client: Client, job_id: str) -> int:
    """Rows of ``job_id`` physically in the table, expired or not."""
    with _connect(client) as conn, conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM job_results WHERE job_id = %(job_id)s", {"job_id": job_id})
        (count,) = cur.fetchone()
    return int(count)


async def listed(client: Client, since: datetime, **params: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    query: dict[str, str] = {"created_from": rfc3339(since), "limit": "1000", **params}
    while True:
        page = await client.get("/v1/job-results", params=query)
        assert page.status_code == 200, page.text
        items += page.json()["items"]
        if page.json()["next_cursor"] is None:
            return items
        query["cursor"] = page.json()["next_cursor"]


async def test_expires_at_counts_from_the_write_and_a_replace_restarts_it(client: Client, job_id: str) -> None:
    first = await put(client, job_id, retention_days=3)
    assert first.status_code == 201
    body = first.json()
    assert body["pinned"] is False
    assert parse(body["expires_at"]) == parse(body["updated_at"]) + timedelta(days=3)
    got = await client.get(f"/v1/job-results/{job_id}")
    assert (got.json()["expires_at"], got.json()["pinned"]) == (body["expires_at"], False)

    second = await put(client, job_id, retention_days=1)
    assert second.status_code == 200
    assert parse(second.json()["expires_at"]) == parse(second.json()["updated_at"]) + timedelta(days=1)
    assert second.headers["etag"] != first.headers["etag"]


async def test_without_retention_or_default_a_result_never_expires(client: Client, job_id: str) -> None:
    made = await put(client, job_id)
    assert made.status_code == 201
    assert made.json()["expires_at"] is None
    assert made.json()["pinned"] is False


async def test_pinning_is_a_write_and_a_put_without_pinned_unpins(client: Client, job_id: str) -> None:
    made = await put(client, job_id, retention_days=2)
    pinned = await put(client, job_id, headers={"If-Match": made.headers["etag"]}, pinned=True)
    assert pinned.status_code == 200
    assert (pinned.json()["pinned"], pinned.json()["expires_at"]) == (True, None)
    assert pinned.headers["etag"] != made.headers["etag"]
    # The ETag from before the pin no longer matches: the pin was a write.
    stale = await put(client, job_id, headers={"If-Match": made.headers["etag"]}, retention_days=5)
    assert stale.status_code == 412
    assert (await client.get(f"/v1/job-results/{job_id}")).json()["pinned"] is True
    # A PUT is a full replace: without `pinned` the result is unpinned (and takes the default: never).
    unpinned = await put(client, job_id, headers={"If-Match": pinned.headers["etag"]})
    assert unpinned.status_code == 200
    assert (unpinned.json()["pinned"], unpinned.json()["expires_at"]) == (False, None)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"retention_days": 3, "pinned": True}, "not both"),
        ({"retention_days": 0}, ">= 1"),
        ({"retention_days": 3651}, "<= 3650"),
        ({"retention_days": 1.5}, "retention_days"),
        ({"retention_days": "7"}, "retention_days"),
        ({"pinned": "yes"}, "pinned"),
    ],
)
async def test_bad_retention_fields_are_400_and_store_nothing(
    client: Client, job_id: str, fields: dict[str, Any], message: str
) -> None:
    response = await put(client, job_id, **fields)
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/problem+json")
    assert message in response.json()["detail"]
    assert (await client.get(f"/v1/job-results/{job_id}")).status_code == 404


async def test_large_bodies_take_the_same_fields_and_rules(client: Client, job_id: str) -> None:
    """Bodies above 64 KiB are checked by the streaming path; its envelope rules must be the same."""
    big = {"blob": "x" * 200_000}
    body = json.dumps({"pinned": True, "status": "failed", "result": big}).encode()
    response = await client.put(f"/v1/job-results/{job_id}", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 201, response.text
    assert (response.json()["pinned"], response.json()["expires_at"], response.json()["status"]) == (
        True,
        None,
        "failed",
    )
    assert response.json()["result"] == big
    both = json.dumps({"status": "failed", "result": big, "retention_days": 2, "pinned": True}).encode()
    refused = await client.put(f"/v1/job-results/{job_id}", content=both, headers={"Content-Type": "application/json"})
    assert refused.status_code == 400
    assert "not both" in refused.json()["detail"]
    days = json.dumps({"status": "failed", "retention_days": 2, "result": big}).encode()
    kept = await client.put(f"/v1/job-results/{job_id}", content=days, headers={"Content-Type": "application/json"})
    assert kept.status_code == 200
    assert parse(kept.json()["expires_at"]) == parse(kept.json()["updated_at"]) + timedelta(days=2)


async def test_an_expired_result_is_gone_for_readers_before_any_purge(client: Client, job_id: str) -> None:
    since = datetime.now(UTC) - timedelta(seconds=1)
    made = await put(client, job_id, retention_days=30)
    await put(client, f"{job_id}-live", retention_days=30)
    await expire(client, job_id)
    assert await stored_count(client, job_id) == 1  # still stored: nothing was purged

    assert (await client.get(f"/v1/job-results/{job_id}")).status_code == 404
    assert (await client.head(f"/v1/job-results/{job_id}")).status_code == 404
    names = [item["job_id"] for item in await listed(client, since)]
    assert f"{job_id}-live" in names
    assert job_id not in names
    export = await client.post(f"/v1/job-results/{job_id}/exports", json={"format": "json"})
    assert export.status_code == 404
    assert (await client.delete(f"/v1/job-results/{job_id}")).status_code == 404
    assert (await client.delete(f"/v1/job-results/{job_id}", headers={"If-Match": "*"})).status_code == 412
    # Writers see it as absent too: If-Match (the old ETag, or *) fails, If-None-Match: * creates.
    assert (await put(client, job_id, headers={"If-Match": made.headers["etag"]})).status_code == 412
    assert (await put(client, job_id, headers={"If-Match": "*"})).status_code == 412
    again = await put(client, job_id, headers={"If-None-Match": "*"}, pinned=True)
    assert again.status_code == 201, again.text
    assert again.headers["etag"] != made.headers["etag"]
    assert again.headers["location"] == f"/v1/job-results/{job_id}"
    assert parse(again.json()["created_at"]) > parse(made.json()["created_at"])
    assert await stored_count(client, job_id) == 1
    assert (await client.get(f"/v1/job-results/{job_id}")).json()["pinned"] is True


async def test_a_plain_put_over_an_expired_result_creates_it_anew(client: Client, job_id: str) -> None:
    made = await put(client, job_id, retention_days=30)
    await expire(client, job_id)
    again = await put(client, job_id)
    assert again.status_code == 201
    assert again.headers["etag"] != made.headers["etag"]
    got = await client.get(f"/v1/job-results/{job_id}")
    assert got.status_code == 200
    assert got.headers["etag"] == again.headers["etag"]
    assert got.json()["expires_at"] is None


async def test_listing_filters_pinned_and_expires_before(client: Client, job_id: str) -> None:
    since = datetime.now(UTC) - timedelta(seconds=1)
    await put(client, f"{job_id}-pinned", pinned=True)
    await put(client, f"{job_id}-2d", retention_days=2)
    await put(client, f"{job_id}-20d", retention_days=20)
    await put(client, f"{job_id}-never")
    await put(client, f"{job_id}-gone", retention_days=1)
    await expire(client, f"{job_id}-gone")

    def mine(items: list[dict[str, Any]]) -> set[str]:
        return {item["job_id"].removeprefix(f"{job_id}-") for item in items if item["job_id"].startswith(job_id)}

    everything = await listed(client, since)
    assert mine(everything) == {"pinned", "2d", "20d", "never"}
    by_name = {item["job_id"].removeprefix(f"{job_id}-"): item for item in everything}
    assert by_name["pinned"]["pinned"] is True
    assert by_name["pinned"]["expires_at"] is None
    assert by_name["never"]["expires_at"] is None
    assert parse(by_name["2d"]["expires_at"]) == parse(by_name["2d"]["updated_at"]) + timedelta(days=2)

    assert mine(await listed(client, since, pinned="true")) == {"pinned"}
    assert mine(await listed(client, since, pinned="false")) == {"2d", "20d", "never"}
    week = rfc3339(datetime.now(UTC) + timedelta(days=7))
    assert mine(await listed(client, since, expires_before=week)) == {"2d"}
    year = rfc3339(datetime.now(UTC) + timedelta(days=365))
    assert mine(await listed(client, since, expires_before=year, pinned="false")) == {"2d", "20d"}
    assert mine(await listed(client, since, expires_before=year, pinned="true")) == set()


async def test_listing_filters_are_checked(client: Client) -> None:
    response = await client.get("/v1/job-results", params={"pinned": "yes", "expires_before": "tomorrow"})
    assert response.status_code == 400
    assert {error["name"] for error in response.json()["errors"]} == {"pinned", "expires_before"}


@pytest.fixture
async def retention_client(settings: Settings, database_url: str, exports_dir: Path) -> AsyncIterator[Client]:
    """An app whose default retention is 7 days (``JOBRESULTS_RESULT_RETENTION_DAYS=7``)."""
    app = create_app(msgspec.structs.replace(settings, result_retention_days=7, exports_dir=str(exports_dir)))
    async with AsyncTestClient(app=app) as test_client:
        test_client.headers.update({"Authorization": f"Bearer {make_token(database_url)}"})
        yield test_client


async def test_the_default_retention_applies_when_a_put_names_none(retention_client: Client, job_id: str) -> None:
    made = (await put(retention_client, job_id)).json()
    assert parse(made["expires_at"]) == parse(made["updated_at"]) + timedelta(days=7)
    own = (await put(retention_client, job_id, retention_days=400)).json()
    assert parse(own["expires_at"]) == parse(own["updated_at"]) + timedelta(days=400)
    pinned = (await put(retention_client, job_id, pinned=True)).json()
    assert pinned["expires_at"] is None


async def test_a_later_default_does_not_move_stored_expiries(
    client: Client, retention_client: Client, job_id: str
) -> None:
    """The rule in force at the write applies: the 7-day default does not touch a result written without one."""
    await put(client, job_id)
    assert (await retention_client.get(f"/v1/job-results/{job_id}")).json()["expires_at"] is None


async def test_new_range_exports_leave_expired_results_out(worker_client: Client, job_id: str) -> None:
    since = datetime.now(UTC) - timedelta(seconds=1)
    for suffix in ("a", "b", "c"):
        assert (await put(worker_client, f"{job_id}-{suffix}", retention_days=10)).status_code == 201
    await put(worker_client, f"{job_id}-pinned", pinned=True)
    await expire(worker_client, f"{job_id}-b")
    until = rfc3339(datetime.now(UTC) + timedelta(seconds=1))
    for fmt in ("ndjson", "csv"):  # csv reads the range twice (columns, then rows)
        queued = await worker_client.post(
            "/v1/exports", json={"format": fmt, "created_from": rfc3339(since), "created_to": until}
        )
        assert queued.status_code == 202, queued.text
        record = await wait_done(worker_client, queued.json()["export_id"])
        assert record["state"] == "succeeded", record
        content = (await worker_client.get(f"/v1/exports/{record['export_id']}/content")).text
        assert f"{job_id}-a" in content
        assert f"{job_id}-c" in content
        assert f"{job_id}-pinned" in content
        assert f"{job_id}-b" not in content
        assert record["rows_written"] == 3
