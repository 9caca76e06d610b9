"""A real webhook receiver for tests: an HTTP server on 127.0.0.1 in a thread, answering as planned.

Each request is recorded (headers, body, arrival time). The answer to the n-th request is the n-th
entry of ``plan`` (status code, seconds to wait first, or ``HOLD`` to wait until :meth:`release`);
once the plan is used up, ``default`` answers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOLD = -1.0
"""A delay meaning: do not answer until the receiver is released (or closed)."""


@dataclass
class Received:
    """One request as it arrived."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)


class Receiver:
    """The recorded requests and the plan of answers; see the module docstring."""

    def __init__(self, plan: list[tuple[int, float]] | None = None, default: tuple[int, float] = (200, 0.0)) -> None:
        self.plan = list(plan or [])
        self.default = default
        self.requests: list[Received] = []
        self.url = ""
        self._changed = threading.Condition()
        self._released = threading.Event()

    def answer_for(self, received: Received) -> tuple[int, float]:
        with self._changed:
            self.requests.append(received)
            index = len(self.requests) - 1
            self._changed.notify_all()
        return self.plan[index] if index < len(self.plan) else self.default

    def wait_for(self, count: int, timeout: float = 15.0) -> list[Received]:
        """Block until ``count`` requests arrived; returns them all.

        Raises:
            AssertionError: fewer arrived within ``timeout`` seconds.
        """
        with self._changed:
            arrived = self._changed.wait_for(lambda: len(self.requests) >= count, timeout)
            assert arrived, f"expected {count} requests, got {len(self.requests)} within {timeout} s"
            return list(self.requests)

    def release(self) -> None:
        """Let held requests answer (with a 200)."""
        self._released.set()


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        received = Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        status, delay = self.server.receiver.answer_for(received)
        if delay == HOLD:
            self.server.receiver._released.wait(60)
        elif delay:
            time.sleep(delay)
        try:
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
        except OSError:
            pass  # the caller gave up (timeout) or died

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    receiver: Receiver


@contextmanager
def receiving(
    plan: list[tuple[int, float]] | None = None, default: tuple[int, float] = (200, 0.0)
) -> Iterator[Receiver]:
    """Run a :class:`Receiver` on a free port of 127.0.0.1 for the block; ``receiver.url`` is its URL."""
    receiver = Receiver(plan, default)
    server = _Server(("127.0.0.1", 0), _Handler)
    server.receiver = receiver
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, name="webhook-receiver", daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.release()
        server.shutdown()
        server.server_close()
        thread.join(5)
