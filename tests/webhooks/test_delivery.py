"""Webhook delivery to a real receiver on 127.0.0.1: signatures, retries after 500s and timeouts, disabling.

The app here runs its delivery worker (and export worker) on a database of its own, allows loopback
(``webhooks_allow_private``), and retries fast (a 50 ms backoff base).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from standardwebhooks import Webhook as Verifier

from config.settings import Settings
from repositories.database import Database
from repositories.webhooks import OutboxMessage, Webhook
from service.app import create_app
from service.outbound import GuardedBackend, RefusedDestination
from service.webhook_delivery import WebhookDelivery
from tests.conftest import fresh_database, make_token
from tests.support.receiver import Receiver, receiving

Client = AsyncTestClient[Litestar]


@pytest.fixture(scope="module")
def hook_settings(settings: Settings, server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with fresh_database(server_url, "jr_hooks") as url:
        yield msgspec.structs.replace(
            settings,
            database_url=url,
            exports_dir=str(tmp_path_factory.mktemp("hook-exports")),
            export_worker=True,
            webhooks_worker=True,
            webhooks_allow_private=True,
            webhooks_poll_s=0.05,
            webhooks_retry_base_s=0.05,
            webhooks_retry_max_s=0.2,
            webhooks_max_attempts=3,
            webhooks_timeout_s=1.0,
        )


@pytest.fixture(scope="module")
async def hooks(hook_settings: Settings) -> AsyncIterator[Client]:
    async with AsyncTestClient(app=create_app(hook_settings)) as test_client:
        test_client.headers.update({"Authorization": f"Bearer {make_token(hook_settings.database_url)}"})
        yield test_client


async def _register(client: Client, url: str, events: list[str]) -> dict[str, Any]:
    response = await client.post("/v1/webhooks", json={"url": url, "events": events})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def _wait_for(receiver: Receiver, count: int, within_s: float = 15.0) -> list[Any]:
    return await asyncio.to_thread(receiver.wait_for, count, within_s)


async def _deliveries(client: Client, webhook_id: str, expected: int) -> list[dict[str, Any]]:
    """The delivery log (oldest first) once it holds ``expected`` attempts (the worker records after the answer)."""
    for _ in range(200):
        items: list[dict[str, Any]] = (await client.get(f"/v1/webhooks/{webhook_id}/deliveries")).json()["items"]
        if len(items) >= expected:
            return items[::-1]
        await asyncio.sleep(0.05)
    raise AssertionError(f"the delivery log holds {len(items)} attempts, expected {expected}")


async def test_signed_events_for_each_change(hooks: Client, job_id: str) -> None:
    with receiving() as receiver:
        webhook = await _register(
            hooks, receiver.url, ["job_result.created", "job_result.replaced", "job_result.deleted"]
        )
        url = f"/v1/job-results/{job_id}"
        await hooks.put(url, json={"status": "succeeded", "result": {"a": 1}})
        await hooks.put(url, json={"status": "failed", "result": {"a": 2}})
        await hooks.delete(url)
        requests = await _wait_for(receiver, 3)
        verifier = Verifier(webhook["secret"])
        events = [verifier.verify(r.body, r.headers) for r in requests]  # raises unless the signature verifies
        # Delivery order is not guaranteed (README: at-least-once, deduplicate by webhook-id): compare
        # by type. The events' own timestamps keep the order in which the changes happened.
        by_type = {e["type"]: e for e in events}
        assert sorted(by_type) == ["job_result.created", "job_result.deleted", "job_result.replaced"]
        assert [e["type"] for e in sorted(events, key=lambda e: e["timestamp"])] == [
            "job_result.created",
            "job_result.replaced",
            "job_result.deleted",
        ]
        assert {e["data"]["job_id"] for e in events} == {job_id}
        assert by_type["job_result.replaced"]["data"]["status"] == "failed"
        assert by_type["job_result.replaced"]["data"]["etag"].startswith('"')
        assert len({r.headers["webhook-id"] for r in requests}) == 3
        assert all(r.headers["content-type"] == "application/json" for r in requests)
        with pytest.raises(Exception, match="signature"):
            Verifier("whsec_" + "A" * 43 + "=").verify(requests[0].body, requests[0].headers)
        log = await _deliveries(hooks, webhook["id"], 3)
        assert [(d["outcome"], d["status_code"], d["attempt"]) for d in log] == [("delivered", 200, 1)] * 3
        await hooks.delete(f"/v1/webhooks/{webhook['id']}")


async def test_retries_after_500s_with_the_same_event_id(hooks: Client, job_id: str) -> None:
    with receiving(plan=[(500, 0.0), (503, 0.0)]) as receiver:
        webhook = await _register(hooks, receiver.url, ["job_result.created"])
        await hooks.put(f"/v1/job-results/{job_id}", json={"status": "succeeded", "result": 1})
        requests = await _wait_for(receiver, 3)
        assert len({r.headers["webhook-id"] for r in requests}) == 1
        for request in requests:
            Verifier(webhook["secret"]).verify(request.body, request.headers)
        log = await _deliveries(hooks, webhook["id"], 3)
        assert [(d["outcome"], d["status_code"]) for d in log] == [
            ("http_error", 500),
            ("http_error", 503),
            ("delivered", 200),
        ]
        assert log[0]["error"] == "HTTP 500"
        assert (await hooks.get(f"/v1/webhooks/{webhook['id']}")).json()["enabled"] is True
        await hooks.delete(f"/v1/webhooks/{webhook['id']}")


async def test_retries_after_a_timeout(hooks: Client, job_id: str) -> None:
    with receiving(plan=[(200, 3.0)]) as receiver:  # answers after the 1 s timeout
        webhook = await _register(hooks, receiver.url, ["job_result.created"])
        await hooks.put(f"/v1/job-results/{job_id}", json={"status": "succeeded", "result": 1})
        requests = await _wait_for(receiver, 2)
        assert requests[0].headers["webhook-id"] == requests[1].headers["webhook-id"]
        log = await _deliveries(hooks, webhook["id"], 2)
        assert [d["outcome"] for d in log] == ["timeout", "delivered"]
        assert log[0]["latency_ms"] >= 900
        await hooks.delete(f"/v1/webhooks/{webhook['id']}")


async def test_an_endpoint_failing_every_attempt_is_disabled(hooks: Client, job_id: str) -> None:
    with receiving(default=(500, 0.0)) as receiver:
        webhook = await _register(hooks, receiver.url, ["job_result.created"])
        await hooks.put(f"/v1/job-results/{job_id}", json={"status": "succeeded", "result": 1})
        await _wait_for(receiver, 3)
        await _deliveries(hooks, webhook["id"], 3)
        state = (await hooks.get(f"/v1/webhooks/{webhook['id']}")).json()
        assert state["enabled"] is False
        assert "3 failed delivery attempts" in state["disabled_reason"]
        assert "HTTP 500" in state["disabled_reason"]
        # Disabled: later changes queue nothing for it.
        await hooks.put(f"/v1/job-results/{job_id}-2", json={"status": "succeeded", "result": 1})
        await asyncio.sleep(0.5)
        assert len(receiver.requests) == 3
        await hooks.delete(f"/v1/webhooks/{webhook['id']}")


async def test_export_succeeded_event(hooks: Client, job_id: str) -> None:
    with receiving() as receiver:
        webhook = await _register(hooks, receiver.url, ["export.succeeded", "export.failed"])
        await hooks.put(f"/v1/job-results/{job_id}", json={"status": "succeeded", "result": {"x": 1}})
        single = await hooks.post(f"/v1/job-results/{job_id}/exports", json={"format": "json"})
        ranged = await hooks.post(
            "/v1/exports",
            json={"format": "ndjson", "created_from": "2000-01-01T00:00:00Z", "created_to": "2100-01-01T00:00:00Z"},
        )
        assert ranged.status_code == 202
        requests = await _wait_for(receiver, 2)
        events = {e["data"]["export_id"]: e for e in (json.loads(r.body) for r in requests)}
        assert events[single.json()["export_id"]]["type"] == "export.succeeded"
        assert events[single.json()["export_id"]]["data"]["job_id"] == job_id
        range_event = events[ranged.json()["export_id"]]
        assert range_event["type"] == "export.succeeded"
        assert range_event["data"]["rows_written"] >= 1
        assert range_event["data"]["content_url"] == f"/v1/exports/{ranged.json()['export_id']}/content"
        await hooks.delete(f"/v1/webhooks/{webhook['id']}")


async def test_loopback_is_refused_at_delivery_when_not_allowed(hook_settings: Settings) -> None:
    """With the allow setting off, the worker refuses to connect to loopback, whatever was registered."""
    strict = msgspec.structs.replace(hook_settings, webhooks_allow_private=False)
    db = await Database.open(strict)
    delivery = WebhookDelivery(db, strict)
    try:
        with receiving() as receiver:
            for url in (receiver.url.replace("http://", "https://"), receiver.url.replace("127.0.0.1", "localhost")):
                endpoint = _endpoint(url)
                message = OutboxMessage(1, "msg_x", 1, "job_result.created", "{}", 0, endpoint.created_at)
                outcome = await delivery.post(endpoint, message)
                assert outcome.outcome == "refused", outcome.error
            assert receiver.requests == []
        with pytest.raises(RefusedDestination, match="link-local"):
            await GuardedBackend(allow_private=False).connect_tcp("169.254.169.254", 80)
        with pytest.raises(RefusedDestination, match="link-local"):
            await GuardedBackend(allow_private=True).connect_tcp("169.254.169.254", 80)
        with pytest.raises(RefusedDestination, match="private"):
            await GuardedBackend(allow_private=False).connect_tcp("10.0.0.1", 80)
    finally:
        await delivery.stop()
        await db.close()


def _endpoint(url: str) -> Webhook:
    from repositories.domain import utcnow

    now = utcnow()
    return Webhook(
        id=1,
        webhook_id="0" * 32,
        url=url,
        description=None,
        events=("job_result.created",),
        secret="whsec_" + "A" * 43 + "=",
        previous_secret=None,
        previous_secret_until=None,
        enabled=True,
        disabled_reason=None,
        disabled_at=None,
        failure_streak=0,
        created_by=None,
        created_at=now,
        updated_at=now,
    )
