"""A MySQL-protocol-aware TCP relay on 127.0.0.1 that cuts connections at chosen points, for fault tests.

The relay passes bytes through unchanged. It reads the client's packet headers (3-byte little-endian
length, 1-byte sequence id) to see each command a client sends, so a test can arm it to:

- cut a COMMIT (:meth:`MySQLProxy.cut_commit`): relay the COMMIT of a transaction that ran a statement
  containing a given text, wait for the server's answer (so the transaction has committed), swallow
  that answer and close both sides. The client sees error 2013 and never learns the outcome. Or drop
  the COMMIT (the server rolls back), answer it with a chosen error, or cut every other connection
  too and refuse new ones, so the client cannot find out;
- cut a result stream (:meth:`MySQLProxy.cut_stream`): after a query containing a given text, relay
  that many bytes of the server's answer and close both sides mid-result;
- refuse connections (:meth:`MySQLProxy.stop_listening`): close the listening socket until
  :meth:`MySQLProxy.listen` opens it again on the same port.

Plain (non-TLS, uncompressed) connections only, which is what the service opens. The relay runs its
own event loop in a thread: Litestar's test client runs the app in a loop of its own and blocks the
test's loop while the app starts, so a relay on the test's loop could not answer then.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

COM_QUERY = 0x03
_HEADER = 4
_RELAY_CHUNK = 64 * 1024


@dataclass
class _Trap:
    """One armed cut: ``text`` to look for in a statement, how many times it may still fire."""

    text: bytes
    remaining: int
    after_bytes: int = 0
    isolate: bool = False
    deliver: bool = True
    answer: bytes = b""


@dataclass(eq=False)
class _Link:
    """One relayed connection and what the client has sent in its current transaction."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    statements: list[bytes] = field(default_factory=list)
    swallow_reply: bool = False
    answer: bytes = b""
    stream_budget: int | None = None
    closed: bool = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for writer in (self.client, self.server):
                # abort(), not close(): a reset, as when a network path or a server dies.
                with contextlib.suppress(Exception):
                    writer.transport.abort()


class MySQLProxy:
    """Relay ``127.0.0.1:<port>`` to ``upstream``; use as ``with MySQLProxy(host, port) as proxy``.

    Every public method may be called from any thread or event loop.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.commits_cut = 0
        self.streams_cut = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._commit_traps: list[_Trap] = []
        self._stream_traps: list[_Trap] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mysql-proxy", daemon=True)

    def __enter__(self) -> MySQLProxy:
        self._thread.start()
        self.listen()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._call(self._close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    def listen(self) -> None:
        """Accept connections (on the same port as before, once one was chosen)."""
        self._call(self._listen())

    def stop_listening(self) -> None:
        """Refuse new connections (the client gets error 2003); relayed connections stay open."""
        self._call(self._stop_listening())

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _close(self) -> None:
        await self._stop_listening()
        for link in list(self._links):
            link.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def cut_commit(
        self,
        statement_containing: str,
        times: int = 1,
        *,
        isolate: bool = False,
        deliver: bool = True,
        error: tuple[int, str] | None = None,
    ) -> None:
        """Cut the next ``times`` COMMITs of transactions that ran a statement containing this text.

        The COMMIT reaches the server, which commits, and the connection is cut before its answer
        reaches the client. With ``deliver=False`` the COMMIT is dropped instead, so the server
        rolls the transaction back when it sees the connection go. With ``isolate``, the cut also
        cuts every other connection and closes the listening socket until :meth:`listen` is called:
        the client cannot reach the server to find out what happened. With ``error=(code, message)``
        the client gets that error (an ERR packet) in place of the server's answer before the cut.
        """
        answer = _err_packet(*error) if error else b""
        trap = _Trap(statement_containing.encode(), times, isolate=isolate, deliver=deliver, answer=answer)
        with self._lock:
            self._commit_traps.append(trap)

    def cut_stream(self, statement_containing: str, after_bytes: int, times: int = 1) -> None:
        """Cut the connection ``after_bytes`` into the answer to the next query containing this text."""
        with self._lock:
            self._stream_traps.append(_Trap(statement_containing.encode(), times, after_bytes))

    def _isolate(self, spared: _Link) -> None:
        """Refuse new connections and cut every link but ``spared`` (whose cut is under way)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for link in list(self._links):
            if link is not spared:
                link.close()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_writer.transport.abort()
            return
        link = _Link(client_writer, server_writer)
        self._links.add(link)
        for pump in (self._client_to_server(link, client_reader), self._server_to_client(link, server_reader)):
            task = asyncio.create_task(pump)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _client_to_server(self, link: _Link, reader: asyncio.StreamReader) -> None:
        try:
            while not link.closed:
                header = await reader.readexactly(_HEADER)
                length = int.from_bytes(header[:3], "little")
                payload = await reader.readexactly(length)
                if header[3] == 0 and payload[:1] == bytes([COM_QUERY]) and not self._on_query(link, payload[1:]):
                    if link.answer:  # dropped, yet answered: e.g. a deadlock the server never reported
                        link.client.write(link.answer)
                        await link.client.drain()
                    link.close()
                    break
                link.server.write(header + payload)
                await link.server.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            link.close()
            self._links.discard(link)

    def _on_query(self, link: _Link, query: bytes) -> bool:
        """Keep track of the transaction's statements, arm this link's cut if a trap matches; False to drop."""
        head = query[:4096]
        word = head.strip().upper()
        if word.startswith(b"START TRANSACTION") or word == b"BEGIN":
            link.statements = []
        elif word == b"COMMIT":
            with self._lock:
                trap = _take(self._commit_traps, link.statements)
            link.statements = []
            if trap is not None:
                link.swallow_reply = True
                link.answer = trap.answer
                self.commits_cut += 1
                if trap.isolate:
                    self._isolate(link)
                return trap.deliver
            return True
        elif word == b"ROLLBACK":
            link.statements = []
        link.statements = [*link.statements[-31:], head]  # bounded: autocommit sessions never reset it
        with self._lock:
            trap = _take(self._stream_traps, [head])
        if trap is not None:
            link.stream_budget = trap.after_bytes
            self.streams_cut += 1
        return True

    async def _server_to_client(self, link: _Link, reader: asyncio.StreamReader) -> None:
        try:
            while not link.closed:
                data = await reader.read(_RELAY_CHUNK)
                if not data:
                    break
                if link.swallow_reply:  # the server has committed; the client never hears of it
                    if link.answer:
                        link.client.write(link.answer)
                        await link.client.drain()
                    break
                if link.stream_budget is not None:
                    if len(data) >= link.stream_budget:
                        link.client.write(data[: link.stream_budget])
                        await link.client.drain()
                        break
                    link.stream_budget -= len(data)
                link.client.write(data)
                await link.client.drain()
        except ConnectionError:
            pass
        finally:
            link.close()
            self._links.discard(link)


def _err_packet(code: int, message: str) -> bytes:
    """A MySQL ERR packet (sequence id 1: the answer to a command) with SQLSTATE HY000."""
    payload = b"\xff" + code.to_bytes(2, "little") + b"#HY000" + message.encode()
    return len(payload).to_bytes(3, "little") + b"\x01" + payload


def _take(traps: list[_Trap], statements: list[bytes]) -> _Trap | None:
    """The first armed trap whose text is in one of ``statements``, counted down; None if none matches."""
    for trap in traps:
        if trap.remaining > 0 and any(trap.text in statement for statement in statements):
            trap.remaining -= 1
            return trap
    return None
