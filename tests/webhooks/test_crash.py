"""No webhook event is lost when the delivering process is SIGKILLed mid-delivery (real Granian processes)."""

from __future__ import annotations

import time

import httpx
from standardwebhooks import Webhook as Verifier

from tests.conftest import fresh_database, make_token
from tests.support.receiver import HOLD, receiving
from tests.support.servers import Server, Servers


def _start(servers: Servers, url: str) -> Server:
    return servers.start(
        url,
        workers=1,
        export_worker=False,
        webhooks_allow_private=True,
        webhooks_poll_s=0.1,
        webhooks_retry_base_s=0.1,
        webhooks_timeout_s=2,  # lease: 6 s
        log_level="info",
    )


def test_an_event_survives_sigkill_of_the_delivering_process(servers: Servers, server_url: str) -> None:
    with fresh_database(server_url, "jr_hook_kill") as url, receiving(plan=[(200, HOLD)]) as receiver:
        headers = {"Authorization": f"Bearer {make_token(url)}"}
        first = _start(servers, url)
        body = {"url": receiver.url, "events": ["job_result.created"]}
        created = httpx.post(f"{first.base_url}/v1/webhooks", json=body, headers=headers)
        assert created.status_code == 201, created.text
        webhook = created.json()
        stored = httpx.put(
            f"{first.base_url}/v1/job-results/crash-1", json={"status": "succeeded", "result": {}}, headers=headers
        )
        assert stored.status_code == 201
        held = receiver.wait_for(1)[0]
        first.kill()
        second = _start(servers, url)
        requests = receiver.wait_for(2, timeout=20)  # after the dead process's lease (6 s) ran out
        assert requests[1].headers["webhook-id"] == held.headers["webhook-id"]
        event = Verifier(webhook["secret"]).verify(requests[1].body, requests[1].headers)
        assert event["data"]["job_id"] == "crash-1"
        deliveries = f"{second.base_url}/v1/webhooks/{webhook['id']}/deliveries"
        log = httpx.get(deliveries, headers=headers).json()["items"]
        for _ in range(50):
            if log:
                break
            time.sleep(0.1)  # the attempt is recorded just after the receiver answered
            log = httpx.get(deliveries, headers=headers).json()["items"]
        assert [(d["outcome"], d["event_id"]) for d in log] == [("delivered", held.headers["webhook-id"])]
