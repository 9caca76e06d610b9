"""Logs and metrics of a real `jobresults serve` with two Granian workers."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from litestar import Litestar, get
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

from config.settings import Settings
from service.app import create_app
from tests.support.servers import Server, log_on_failure

T = TypeVar("T")


def log_lines(log: Path) -> list[dict[str, Any]]:
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"a log line is not JSON: {line!r}")
    return parsed


def wait_for(predicate: Callable[[], T | None], what: str, limit_s: float = 5.0) -> T:
    deadline = time.monotonic() + limit_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_canonical_log_line_and_request_id(server: Server, auth_headers: dict[str, str], api_token: str) -> None:
    base, log = server.base_url, server.log
    job_id = f"obs-{uuid.uuid4().hex}"
    with log_on_failure(log), httpx.Client(base_url=base, timeout=10.0, headers=auth_headers) as http:
        put = http.put(
            f"/v1/job-results/{job_id}",
            json={"status": "succeeded", "result": {"x": 1}},
            headers={"X-Request-ID": "ci-run-42.step:7"},
        )
        assert put.headers["x-request-id"] == "ci-run-42.step:7"
        missing = http.get("/v1/job-results/nope-" + job_id, headers={"X-Request-ID": "bad id with spaces"})
        generated = missing.headers["x-request-id"]
        assert generated != "bad id with spaces"
        assert len(generated) == 32

        def request_line(request_id: str) -> dict[str, Any] | None:
            for line in log_lines(log):
                if line.get("event") == "request" and line.get("request_id") == request_id:
                    return line
            return None

        line = wait_for(lambda: request_line("ci-run-42.step:7"), "the PUT's log line")
        assert line["method"] == "PUT"
        assert line["route"] == "/v1/job-results/{job_id}"
        assert line["status"] == 201
        assert line["client_ip"] == "127.0.0.1"
        assert line["response_bytes"] == len(put.content)
        assert isinstance(line["duration_ms"], float)
        assert line["duration_ms"] >= 0
        assert line["api_key_id"] == api_token.split("_")[1]
        assert api_token not in log.read_text()
        assert line["level"] == "info"
        assert line["timestamp"].endswith("Z")

        miss = wait_for(lambda: request_line(generated), "the 404's log line")
        assert miss["status"] == 404
        assert miss["route"] == "/v1/job-results/{job_id}"

        unmatched = http.get("/no/such/path")
        line = wait_for(lambda: request_line(unmatched.headers["x-request-id"]), "the unmatched route's line")
        assert line["route"] == "unmatched"
        # Granian's own lines are part of the same JSON stream.
        assert any(entry.get("logger") == "_granian" for entry in log_lines(log))


def test_metrics_add_up_across_two_workers(server: Server, auth_headers: dict[str, str]) -> None:
    base, log = server.base_url, server.log
    job_id = f"met-{uuid.uuid4().hex}"
    with log_on_failure(log), httpx.Client(base_url=base, timeout=10.0, headers=auth_headers) as http:
        before = samples(http.get("/metrics").text)
        key = (
            "jobresults_http_requests_total",
            (("method", "GET"), ("route", "/v1/job-results/{job_id}"), ("status", "200")),
        )
        http.put(f"/v1/job-results/{job_id}", json={"status": "failed", "result": [1]})
        n = 40
        # New connections each time, so both workers serve some of them.
        for _ in range(n):
            assert httpx.get(f"{base}/v1/job-results/{job_id}", timeout=10.0, headers=auth_headers).status_code == 200
        export = http.post(f"/v1/job-results/{job_id}/exports", json={"format": "csv"})
        assert export.status_code == 201
        text = http.get("/metrics").text
    after = samples(text)
    assert after[key] - before.get(key, 0) == n
    names = {name for name, _ in after}
    for expected in (
        "jobresults_http_requests_total",
        "jobresults_http_request_duration_seconds_bucket",
        "jobresults_http_requests_in_flight",
        "jobresults_db_pool_connections",
        "jobresults_db_pool_connections_in_use",
        "jobresults_db_pool_connections_max",
        "jobresults_db_pool_waiters",
        "jobresults_db_query_duration_seconds_count",
        "jobresults_exports_total",
        "jobresults_export_rows_total",
        "jobresults_export_bytes_total",
        "jobresults_export_duration_seconds_count",
    ):
        assert expected in names, expected
    exports = ("jobresults_exports_total", (("format", "csv"), ("kind", "job"), ("state", "succeeded")))
    assert after[exports] - before.get(exports, 0) == 1
    assert after[("jobresults_db_pool_connections_max", ())] >= 2 * 1  # both workers' pools
    pids = {line.get("pid") for line in log_lines(log)} - {None}
    assert pids == set() or len(pids) >= 1


async def test_exceptions_are_logged_with_traceback_not_returned(
    settings: Settings, exports_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    @get("/boom", include_in_schema=False)
    async def boom() -> None:
        raise RuntimeError("secret detail at /srv/app/internal.py")

    app: Litestar = create_app(
        Settings.from_env(
            {}, database_url=settings.database_url, log_level="info", exports_dir=str(exports_dir), export_worker=False
        )
    )
    app.register(boom)
    async with AsyncTestClient(app=app) as client:
        response = await client.get("/boom", headers={"X-Request-ID": "boom-1"})
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert "secret" not in response.text
    assert "Traceback" not in response.text
    assert "X-Request-ID" in response.json()["detail"]  # every problem has a detail (docs/usage.md, Input rules)
    out = capfd.readouterr().out
    entries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    failure = next(e for e in entries if e.get("event") == "http.unhandled_exception")
    assert failure["request_id"] == "boom-1"
    assert "secret detail" in json.dumps(failure["exception"])
    assert "RuntimeError" in json.dumps(failure["exception"])
