"""Smoke test: the real ``jobresults serve`` (Granian, 2 workers) over real HTTP, then SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import REDIS_URL

JOBRESULTS = Path(sys.executable).parent / "jobresults"
STARTUP_TIMEOUT_S = 20.0
SHUTDOWN_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(**values: str) -> dict[str, str]:
    """The current environment without any ``JOBRESULTS_*`` variable, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBRESULTS_")}
    env.update(values)
    return env


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a reused id owned by someone else
        return True
    return True


@contextmanager
def _server_log_on_failure(log: Path) -> Iterator[None]:
    """Print the server's captured output if the block fails."""
    try:
        yield
    except BaseException:
        print(f"----- jobresults serve output ({log}) -----")
        print(log.read_text(errors="replace") if log.exists() else "(no output file)")
        raise


@pytest.fixture
def server(database_url: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """A running ``jobresults serve``; yields the process, its base URL and its log file."""
    port = _free_port()
    log = tmp_path / "server.log"
    env = _env(
        JOBRESULTS_DATABASE_URL=database_url,
        JOBRESULTS_PORT=str(port),
        JOBRESULTS_WORKERS="2",
        JOBRESULTS_REDIS_URL=REDIS_URL,
        JOBRESULTS_EXPORTS_DIR=str(tmp_path / "exports"),
        JOBRESULTS_LOG_LEVEL="info",
    )
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(JOBRESULTS), "serve"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: workers can be checked and reaped
        )
    base = f"http://127.0.0.1:{port}"
    try:
        with _server_log_on_failure(log):
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while True:
                assert proc.poll() is None, f"jobresults serve exited early with {proc.returncode}"
                try:
                    if httpx.get(f"{base}/healthz", timeout=1.0).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"/healthz did not answer within {STARTUP_TIMEOUT_S} s"
                time.sleep(0.1)
        yield proc, base, log
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=SHUTDOWN_TIMEOUT_S)


def test_serve_answers_over_http_and_stops_cleanly_on_sigterm(
    server: tuple[subprocess.Popen[bytes], str, Path], auth_headers: dict[str, str]
) -> None:
    proc, base, log = server
    with _server_log_on_failure(log), httpx.Client(base_url=base, timeout=10.0, headers=auth_headers) as http:
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
        code = proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
        assert time.monotonic() - started < SHUTDOWN_TIMEOUT_S
        assert code == 0
        deadline = time.monotonic() + 2.0
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _group_alive(proc.pid), "Granian workers outlived the main process"
        output = log.read_text(errors="replace")
        assert "Traceback" not in output


def test_serve_rejects_an_invalid_port_quickly(database_url: str, tmp_path: Path) -> None:
    env = _env(
        JOBRESULTS_DATABASE_URL=database_url,
        JOBRESULTS_PORT="notaport",
        JOBRESULTS_EXPORTS_DIR=str(tmp_path / "exports"),
    )
    started = time.monotonic()
    done = subprocess.run([str(JOBRESULTS), "serve"], env=env, capture_output=True, text=True, timeout=15, check=False)
    assert time.monotonic() - started < 10
    assert done.returncode != 0
    assert done.returncode == 2
    assert "JOBRESULTS_PORT" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
