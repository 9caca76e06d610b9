"""Smoke test: the real ``jobresults serve`` (Granian, 2 workers) over real HTTP, then SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support.servers import JOBRESULTS, STOP_TIMEOUT_S, Server, group_alive, log_on_failure, service_env

pytestmark = pytest.mark.slow


def test_serve_answers_over_http_and_stops_cleanly_on_sigterm(server: Server, auth_headers: dict[str, str]) -> None:
    proc, base, log = server.proc, server.base_url, server.log
    with log_on_failure(log), httpx.Client(base_url=base, timeout=10.0, headers=auth_headers) as http:
        ready = http.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["status"] == "ok"

        job_id = f"smoke-{uuid.uuid4().hex}"
        document = {"exit_code": 0, "artifacts": ["a.tar.gz"], "metrics": {"tests": 120, "ratio": 0.5}, "ok": True}
        created = http.put(f"/v1/job-results/{job_id}", json={"status": "succeeded", "result": document})
        assert created.status_code == 201, created.text

        fetched = http.get(f"/v1/job-results/{job_id}")
        assert fetched.status_code == 200, fetched.text
        body = fetched.json()
        assert body["job_id"] == job_id
        assert body["status"] == "succeeded"
        assert body["result"] == document

        swagger = http.get("/schema/swagger")
        assert swagger.status_code == 200
        assert swagger.headers["content-type"].startswith("text/html")
        assets = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", swagger.text)
        assert any(a.endswith("/swagger-ui-bundle.js") for a in assets), assets
        remote = [a for a in assets if re.match(r"(?i)(https?:)?//", a)]
        assert remote == [], f"Swagger UI loads remote assets: {remote}"
        assert all(a.startswith("/schema/static/") for a in assets), assets

        bundle = http.get("/schema/static/swagger-ui-bundle.js")
        assert bundle.status_code == 200
        assert "javascript" in bundle.headers["content-type"]
        assert len(bundle.content) > 100_000

        # Granian's main process handles SIGTERM: graceful stop of both workers, then exit status 0.
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=STOP_TIMEOUT_S)
        assert time.monotonic() - started < STOP_TIMEOUT_S
        assert code == 0
        deadline = time.monotonic() + 2.0
        while group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not group_alive(proc.pid), "Granian workers outlived the main process"
        output = log.read_text(errors="replace")
        assert "Traceback" not in output


def test_serve_rejects_an_invalid_port_quickly(database_url: str, tmp_path: Path) -> None:
    env = service_env({"database_url": database_url, "port": "notaport", "exports_dir": tmp_path / "exports"})
    started = time.monotonic()
    done = subprocess.run([JOBRESULTS, "serve"], env=env, capture_output=True, text=True, timeout=15, check=False)
    assert time.monotonic() - started < 10
    assert done.returncode != 0
    assert done.returncode == 2
    assert "JOBRESULTS_PORT" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
