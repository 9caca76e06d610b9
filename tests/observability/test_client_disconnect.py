"""A client that hangs up mid-body is logged and counted as 499, outside the 5xx series alerts watch."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient
from litestar.types import Message
from prometheus_client import REGISTRY

from config.settings import Settings
from service.app import create_app

ROUTE = "/v1/job-results/{job_id}"


def _count(status: str) -> float:
    value = REGISTRY.get_sample_value(
        "jobresults_http_requests_total", {"method": "PUT", "route": ROUTE, "status": status}
    )
    return value or 0.0


def _server_errors() -> float:
    total = 0.0
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            if sample.name == "jobresults_http_requests_total" and sample.labels["status"].startswith("5"):
                total += sample.value
    return total


async def test_a_client_that_disconnects_mid_body_is_499(
    settings: Settings, api_token: str, job_id: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """Drive the app as Granian does when the peer closes the socket halfway through a PUT body."""
    app = create_app(msgspec.structs.replace(settings, export_worker=False, log_level="info"))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "PUT",
        "scheme": "http",
        "path": f"/v1/job-results/{job_id}",
        "raw_path": f"/v1/job-results/{job_id}".encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"testserver"),
            (b"authorization", f"Bearer {api_token}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", b"100000"),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    incoming: list[Any] = [
        {"type": "http.request", "body": b'{"status": "succeeded", "result": [1, 2, ', "more_body": True},
    ]

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        pass

    async with AsyncTestClient(app=app) as client:
        client_closed, server_errors = _count("499"), _server_errors()
        capfd.readouterr()
        # In the loop that ran the lifespan (the client's portal), as the app's own requests are.
        client.blocking_portal.call(app, scope, receive, send)  # type: ignore[arg-type,call-arg]
        assert _count("499") == client_closed + 1
        assert _server_errors() == server_errors
        lines = [json.loads(line) for line in capfd.readouterr().out.splitlines() if line.startswith("{")]
        # The request line carries the same status as the metric (its level may be filtered out by
        # loggers cached earlier in the session); no error is logged for a client's hang-up.
        assert [line["status"] for line in lines if line.get("event") == "request"] in ([], [499]), lines
        assert not [line for line in lines if line.get("level") == "error"], lines
        # Nothing was stored.
        stored = await client.get(f"/v1/job-results/{job_id}", headers={"Authorization": f"Bearer {api_token}"})
        assert stored.status_code == 404
