"""``jobresults serve`` as an operator runs it: one server per address, and ``just serve`` stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(database_url: str, port: int, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBRESULTS_")}
    env.update(
        JOBRESULTS_DATABASE_URL=database_url,
        JOBRESULTS_PORT=str(port),
        JOBRESULTS_EXPORTS_DIR=str(tmp_path / "exports"),
        JOBRESULTS_POOL_MIN_SIZE="1",
        JOBRESULTS_POOL_MAX_SIZE="2",
        JOBRESULTS_EXPORT_WORKER="false",
    )
    return env


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_healthy(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"{base}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)


@contextmanager
def started(command: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``command`` in its own process group; kill the group (only it) afterwards."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    finally:
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_a_second_server_on_a_served_port_refuses_to_start(database_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = server_env(database_url, port, tmp_path)
    with started([str(BIN / "jobresults"), "serve"], env, tmp_path / "first.log") as first:
        wait_healthy(f"http://127.0.0.1:{port}", first, tmp_path / "first.log")
        second = subprocess.run(
            [str(BIN / "jobresults"), "serve"], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert second.returncode != 0
        assert f"127.0.0.1:{port}" in second.stderr
        assert "already listening" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None
        # Every request still reaches the first server.
        assert all(httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200 for _ in range(10))


def test_sigterm_to_just_serve_stops_the_server(database_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = server_env(database_url, port, tmp_path)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    log = tmp_path / "just.log"
    with started([str(BIN / "just"), "--no-deps", "serve"], env, log) as just:
        wait_healthy(f"http://127.0.0.1:{port}", just, log)
        os.kill(just.pid, signal.SIGTERM)  # the process an operator knows: just's
        deadline = time.monotonic() + 20
        while just.poll() is None or group_alive(just.pid):  # poll() reaps just, so its group can end
            assert time.monotonic() < deadline, "the server outlived SIGTERM to just:\n" + log.read_text()
            time.sleep(0.1)
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1.0)
            served = True
        except httpx.TransportError:
            served = False
        assert not served
