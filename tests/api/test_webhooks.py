"""Webhook registration API on the session app (no delivery worker): shapes, validation, scopes, SSRF refusals.

Events queued by changes are checked in the outbox table itself: the session app delivers nothing.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from repositories.database import Connection, Database
from repositories.domain import EVENT_TYPES
from repositories.job_results import JobResultRepository
from repositories.webhook_events import emitting, job_result_event
from tests.conftest import connect, make_token

PUBLIC_URL = "https://1.1.1.1/hook"  # a global address: passes the checks; the session app never calls it
Client = AsyncTestClient[Litestar]


@pytest.fixture
async def webhook(client: Client) -> AsyncIterator[dict[str, Any]]:
    """A webhook on every event type in the session database, deleted afterwards."""
    response = await client.post("/v1/webhooks", json={"url": PUBLIC_URL, "events": list(EVENT_TYPES)})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    yield created
    await client.delete(f"/v1/webhooks/{created['id']}")


def _outbox(database_url: str, webhook_id: str) -> list[tuple[str, str]]:
    """``(event_type, payload)`` of the outbox rows of ``webhook_id``, oldest first."""
    with connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT o.event_type, o.payload FROM webhook_outbox o JOIN webhook_endpoints e ON e.id = o.endpoint_id "
            "WHERE e.webhook_id = %s ORDER BY o.id",
            (webhook_id,),
        )
        return list(cur.fetchall())


async def test_create_returns_the_secret_once(client: Client, webhook: dict[str, Any]) -> None:
    assert webhook["url"] == PUBLIC_URL
    assert webhook["events"] == list(EVENT_TYPES)
    assert webhook["enabled"] is True
    assert webhook["secret"].startswith("whsec_")
    assert len(base64.b64decode(webhook["secret"].removeprefix("whsec_"))) == 32
    read = await client.get(f"/v1/webhooks/{webhook['id']}")
    assert read.status_code == 200
    assert "secret" not in read.json()
    listed = await client.get("/v1/webhooks", params={"limit": 1000})
    assert [item for item in listed.json()["items"] if item["id"] == webhook["id"]]
    assert all("secret" not in item for item in listed.json()["items"])


async def test_list_is_keyset_paginated(client: Client) -> None:
    ids = []
    for _ in range(3):
        response = await client.post("/v1/webhooks", json={"url": PUBLIC_URL, "events": ["export.failed"]})
        ids.append(response.json()["id"])
    try:
        seen: list[str] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
            page = (await client.get("/v1/webhooks", params=params)).json()
            assert len(page["items"]) <= 2
            seen += [item["id"] for item in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert [i for i in seen if i in ids] == ids
        assert len(seen) == len(set(seen))
        bad = await client.get("/v1/webhooks", params={"cursor": "!!"})
        assert bad.status_code == 400
    finally:
        for webhook_id in ids:
            await client.delete(f"/v1/webhooks/{webhook_id}")


@pytest.mark.parametrize("events", [["job_result.updated"], [], "export.succeeded", ["export.succeeded", 3]])
async def test_unknown_events_are_refused_naming_the_allowed_ones(client: Client, events: object) -> None:
    response = await client.post("/v1/webhooks", json={"url": PUBLIC_URL, "events": events})
    assert response.status_code == 400
    problem = response.json()
    assert problem["type"] == "tag:jobresults,2026:problem/invalid-body"
    assert all(event in problem["detail"] for event in EVENT_TYPES)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://1.1.1.1/hook", "https://"),
        ("https://127.0.0.1/hook", "loopback"),
        ("https://localhost:8443/hook", "loopback"),
        ("https://[::1]/hook", "loopback"),
        ("https://[::ffff:127.0.0.1]/hook", "loopback"),
        ("https://10.1.2.3/hook", "private"),
        ("https://192.168.0.10/hook", "private"),
        ("https://169.254.169.254/latest/meta-data/", "metadata"),
        ("https://[fe80::1]/hook", "link-local"),
        ("https://100.100.100.200/hook", "not globally routable"),
        ("https://224.0.0.1/hook", "multicast"),
        ("https://0.0.0.0/hook", "unspecified"),
        ("https://user:pw@1.1.1.1/hook", "password"),
        ("https://does-not-exist.invalid/hook", "does not resolve"),
        ("ftp://1.1.1.1/hook", "https://"),
    ],
)
async def test_unsafe_urls_are_refused_at_registration(client: Client, url: str, why: str) -> None:
    response = await client.post("/v1/webhooks", json={"url": url, "events": ["export.succeeded"]})
    assert response.status_code == 400, response.text
    problem = response.json()
    assert problem["type"] == "tag:jobresults,2026:problem/webhook-url-refused"
    assert why in problem["detail"]


async def test_patch_rotate_and_delete(client: Client, webhook: dict[str, Any]) -> None:
    path = f"/v1/webhooks/{webhook['id']}"
    changed = await client.patch(path, json={"events": ["export.failed"], "description": "ops", "enabled": False})
    assert changed.status_code == 200, changed.text
    body = changed.json()
    assert (body["events"], body["description"], body["enabled"]) == (["export.failed"], "ops", False)
    assert body["disabled_reason"] == "disabled through the API"
    enabled = (await client.patch(path, json={"enabled": True})).json()
    assert enabled["enabled"] is True
    assert "disabled_reason" not in enabled
    refused = await client.patch(path, json={"url": "https://10.0.0.1/"})
    assert refused.status_code == 400
    assert (await client.patch(path, json={"colour": "red"})).status_code == 400
    rotated = await client.post(f"{path}/rotate-secret")
    assert rotated.status_code == 200
    assert rotated.json()["secret"].startswith("whsec_")
    assert rotated.json()["secret"] != webhook["secret"]
    assert (await client.delete(path)).status_code == 204
    assert (await client.get(path)).status_code == 404
    assert (await client.delete(path)).status_code == 404
    missing = await client.get("/v1/webhooks/not-an-id/deliveries")
    assert missing.status_code == 404
    assert missing.json()["type"] == "tag:jobresults,2026:problem/webhook-not-found"


async def test_scopes(client: Client, database_url: str, webhook: dict[str, Any]) -> None:
    path = f"/v1/webhooks/{webhook['id']}"
    reader = {"Authorization": f"Bearer {make_token(database_url, ('webhooks:read',))}"}
    writer = {"Authorization": f"Bearer {make_token(database_url, ('webhooks:write',))}"}
    other = {"Authorization": f"Bearer {make_token(database_url, ('results:read', 'results:write'))}"}
    assert (await client.get(path, headers=reader)).status_code == 200
    assert (await client.get(f"{path}/deliveries", headers=reader)).status_code == 200
    assert (await client.get(path, headers=writer)).status_code == 200
    denied = await client.patch(path, json={"description": "x"}, headers=reader)
    assert denied.status_code == 403
    assert "webhooks:write" in denied.json()["detail"]
    assert (await client.get("/v1/webhooks", headers=other)).status_code == 403
    assert (await client.patch(path, json={"description": "x"}, headers=writer)).status_code == 200


async def test_changes_queue_events_in_the_same_transaction(
    client: Client, database_url: str, webhook: dict[str, Any], job_id: str
) -> None:
    url = f"/v1/job-results/{job_id}"
    assert (await client.put(url, json={"status": "succeeded", "result": {"n": 1}})).status_code == 201
    assert (await client.put(url, json={"status": "failed", "result": {"n": 2}})).status_code == 200
    refused = await client.put(url, json={"status": "failed", "result": 3}, headers={"If-Match": '"0.0"'})
    assert refused.status_code == 412
    assert (await client.delete(url)).status_code == 204
    rows = [(kind, payload) for kind, payload in _outbox(database_url, webhook["id"]) if job_id in payload]
    assert [kind for kind, _ in rows] == ["job_result.created", "job_result.replaced", "job_result.deleted"]
    assert '"status":"failed"' in rows[1][1]


async def test_no_event_for_a_rolled_back_change(
    db: Database, database_url: str, webhook: dict[str, Any], job_id: str
) -> None:
    """The event is written by the unit itself: when the unit fails after it, both roll back."""
    store = emitting(lambda conn: _created(conn, job_id), job_result_event)

    async def unit(conn: Connection) -> None:
        await store(conn)
        raise RuntimeError("fails after the event was queued")

    with pytest.raises(RuntimeError):
        await db.run(unit)
    assert not [row for row in _outbox(database_url, webhook["id"]) if job_id in row[1]]
    with connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM job_results WHERE job_id = %s", (job_id,))
        assert cur.fetchone() == (0,)


async def _created(conn: Connection, job_id: str) -> Any:
    return await JobResultRepository(conn).create(job_id, "succeeded", "{}"), True
