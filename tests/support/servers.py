"""Real ``jobresults serve`` processes (Granian) for process-level tests.

:class:`Servers` starts the service with given settings on a free port, in a process group of its
own, waits until it answers, and at the end kills the whole group (Granian's main process and its
workers) and reaps it. The ``servers`` fixture in ``tests/conftest.py`` hands one to a test::

    def test_something(servers: Servers, database_url: str) -> None:
        server = servers.start(database_url, workers=2, redis_url=REDIS_URL)
        httpx.get(f"{server.base_url}/healthz")
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

JOBRESULTS = str(Path(sys.executable).parent / "jobresults")
"""The ``jobresults`` console script of the interpreter running the tests."""
STARTUP_TIMEOUT_S = 20.0
"""Longest wait for a started service to answer its health probe."""
STOP_TIMEOUT_S = 10.0
"""Longest wait for a signalled process group to be gone."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now (IPv6 when ``host`` contains a colon)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def group_alive(pgid: int) -> bool:
    """True while any process of the process group ``pgid`` exists."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a reused id owned by someone else
        return True
    return True


def service_env(settings: Mapping[str, object] | None = None, **extra: str) -> dict[str, str]:
    """The current environment without any ``JOBRESULTS_*`` variable, plus ``settings`` and ``extra``.

    ``settings`` maps setting names (``workers``, ``export_lease_s``) to values; each becomes
    ``JOBRESULTS_<NAME>``. ``extra`` holds variables given by their full name.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBRESULTS_")}
    for name, value in (settings or {}).items():
        if value is not None:
            env[f"JOBRESULTS_{name.upper()}"] = str(value)
    env.update(extra)
    return env


@contextmanager
def log_on_failure(log: Path) -> Iterator[None]:
    """Print the server's captured output if the block fails (pytest shows it with the failure)."""
    try:
        yield
    except BaseException:
        print(f"----- jobresults serve output ({log}) -----")
        print(log.read_text(errors="replace") if log.exists() else "(no output file)")
        raise


@dataclass
class Server:
    """One running ``jobresults serve``: its process (leader of its own group), base URL and log file."""

    proc: subprocess.Popen[bytes]
    base_url: str
    log: Path
    exports_dir: Path

    @property
    def pid(self) -> int:
        """The Granian main process's pid, which is also the id of the service's process group."""
        return self.proc.pid

    def output(self) -> str:
        """Everything the service wrote to stdout and stderr so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL the whole process group (main process and workers) and reap it.

        Raises:
            AssertionError: a process of the group outlived the kill by more than ``STOP_TIMEOUT_S``.
        """
        if group_alive(self.pid):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=STOP_TIMEOUT_S)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while group_alive(self.pid):
            assert time.monotonic() < deadline, "a worker of the service survived SIGKILL of its process group"
            time.sleep(0.02)


class Servers:
    """Starts ``jobresults serve`` processes for one test; :meth:`close` kills whatever still runs."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Server] = []

    def start(
        self,
        database_url: str,
        *,
        host: str = "127.0.0.1",
        exports_dir: Path | None = None,
        ready_path: str = "/healthz",
        **settings: object,
    ) -> Server:
        """Start the service on a free port of ``host`` and wait until ``ready_path`` answers 200.

        ``settings`` are service settings by name (``workers=2``, ``redis_url=...``,
        ``export_lease_s=3``), passed as ``JOBRESULTS_*`` variables; nothing else of the test's own
        ``JOBRESULTS_*`` environment reaches the service. ``exports_dir`` defaults to a directory of
        this test's own.

        Raises:
            AssertionError: the service exited, or did not answer within ``STARTUP_TIMEOUT_S``; the
                message holds its output.
        """
        index = len(self.started)
        port = free_port(host)
        log = self.tmp_path / f"server-{index}.log"
        exports = exports_dir or self.tmp_path / f"exports-{index}"
        env = service_env(
            {"host": host, "port": port, "exports_dir": exports, **settings}, JOBRESULTS_DATABASE_URL=database_url
        )
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [JOBRESULTS, "serve"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a process group of its own: workers are reached and reaped with it
            )
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        server = Server(proc=proc, base_url=f"http://{netloc}", log=log, exports_dir=exports)
        self.started.append(server)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"jobresults serve exited early with {proc.returncode}:\n{server.output()}"
            try:
                if httpx.get(server.base_url + ready_path, timeout=1.0).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (
                f"{ready_path} did not answer within {STARTUP_TIMEOUT_S} s:\n{server.output()}"
            )
            time.sleep(0.05)

    def close(self) -> None:
        """Kill and reap every process group started here."""
        for server in self.started:
            server.kill()

    def dump_logs(self) -> None:
        """Print every started service's output (pytest shows it when the test failed)."""
        for server in self.started:
            print(f"----- jobresults serve output ({server.log}) -----")
            print(server.output() or "(no output)")
