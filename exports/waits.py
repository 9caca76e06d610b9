"""Long-polling on exports: one registry of waiting requests per process, woken by Redis or a poll.

``GET /v1/exports/{id}?wait=N`` registers a :class:`Waiter` here and awaits it without holding a
database connection. A waiter is woken (its event set) when its export may have left ``queued`` /
``running``; the request then reads the export again and answers, or waits on if it is still pending.
Three sources wake waiters, so an export settled by any replica is noticed:

* **local**: the process that settles an export calls :meth:`ExportWaits.settled` after the COMMIT;
* **pubsub**: that call also publishes the export id on a Redis channel (``JOBRESULTS_REDIS_URL``)
  that every process subscribes to, so waiters on other replicas wake at once;
* **poll**: one task per process, running only while there are waiters, reads the state of every
  waited export every ``JOBRESULTS_EXPORT_WAIT_POLL_S`` seconds in one query per 1,000 exports. A lost
  message, a replica without Redis or a Redis outage only delays the answer by at most that interval.

A process holds at most ``JOBRESULTS_EXPORT_WAIT_MAX`` waiters (:class:`TooManyWaiters` beyond it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import redis.asyncio
import structlog

from config.settings import Settings
from observability.metrics import EXPORT_WAIT_POLLS, EXPORT_WAIT_WAKEUPS, EXPORT_WAITERS
from repositories import domain
from repositories.database import Connection, Database
from repositories.exports import ExportRepository

log = structlog.get_logger("jobresults.export_waits")

PENDING_STATES = frozenset(domain.PENDING_STATES)
"""States an export can leave; every other state (succeeded, failed, and any added later) is final."""
POLL_BATCH = 1000
"""Export ids read by one poll query at most."""
REDIS_TIMEOUT_S = 1.0
"""Connect and socket timeout of a publish (seconds); a publish never delays settling for longer."""
RESUBSCRIBE_MAX_S = 30.0
"""Longest pause between two attempts to subscribe while Redis is unreachable (seconds)."""


def channel_name(settings: Settings) -> str:
    """The Redis channel of settled export ids: ``jobresults:exports-settled:<database name>``.

    Named after the database so deployments sharing a Redis do not hear each other's exports.
    """
    return f"jobresults:exports-settled:{settings.database.database}"


class TooManyWaiters(Exception):
    """The process holds ``limit`` waiting requests already (``JOBRESULTS_EXPORT_WAIT_MAX``)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"{limit} requests are waiting already")
        self.limit = limit


class ClientGone(Exception):
    """The client disconnected while its request waited."""


class Waiter:
    """One waiting request's wake-up flag (an :class:`asyncio.Event` set by the registry)."""

    __slots__ = ("_event", "export_id")

    def __init__(self, export_id: str) -> None:
        self.export_id = export_id
        self._event = asyncio.Event()

    def wake(self) -> None:
        """Set the flag: the export may have settled."""
        self._event.set()

    async def wait(self, timeout_s: float, abandoned: asyncio.Future[Any] | None = None) -> bool:
        """Wait up to ``timeout_s`` seconds for a wake-up; True if woken (the flag is cleared), else False.

        Raises:
            ClientGone: ``abandoned`` (e.g. a task that ends when the client disconnects) finished first.
        """
        if not self._event.is_set() and timeout_s > 0:
            woken = asyncio.ensure_future(self._event.wait())
            watched: set[asyncio.Future[Any]] = {woken} if abandoned is None else {woken, abandoned}
            try:
                await asyncio.wait(watched, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                woken.cancel()
        if abandoned is not None and abandoned.done() and not self._event.is_set():
            raise ClientGone
        was_set = self._event.is_set()
        self._event.clear()
        return was_set


class ExportWaits:
    """The waiter registry of one process, with its Redis subscriber, publisher and fallback poller.

    Build one per process, :meth:`start` it in the lifespan, :meth:`stop` it at shutdown. Waiting
    requests use :meth:`waiting`; whatever settles an export in this process calls :meth:`settled`.
    """

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.max_waiters = settings.export_wait_max
        self.poll_s = settings.export_wait_poll_s
        self.channel = channel_name(settings)
        self._redis_url = settings.redis_url
        self._waiters: dict[str, set[Waiter]] = {}
        self._count = 0
        self._poller: asyncio.Task[None] | None = None
        self._subscriber: asyncio.Task[None] | None = None
        self._publisher: redis.asyncio.Redis | None = None
        self._publishes: set[asyncio.Task[None]] = set()
        self._publish_failing = False

    @property
    def count(self) -> int:
        """Requests waiting in this process now."""
        return self._count

    def start(self) -> None:
        """Subscribe to the Redis channel (when ``JOBRESULTS_REDIS_URL`` is set); idempotent."""
        if self._redis_url and self._subscriber is None:
            self._publisher = redis.asyncio.Redis.from_url(
                self._redis_url, socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S
            )
            self._subscriber = asyncio.create_task(self._subscribe_loop(), name="export-waits-subscriber")

    async def stop(self) -> None:
        """Stop the subscriber and poller and close the Redis clients (waiting requests time out as usual)."""
        tasks = [task for task in (self._subscriber, self._poller, *self._publishes) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._subscriber = self._poller = None
        if self._publisher is not None:
            with contextlib.suppress(Exception):
                await self._publisher.aclose()
            self._publisher = None

    @contextlib.contextmanager
    def waiting(self, export_id: str) -> Iterator[Waiter]:
        """Register a waiter for ``export_id`` for the duration of the ``with`` block.

        Register before reading the export: a settle between the read and the registration would
        otherwise be missed until the next poll.

        Raises:
            TooManyWaiters: the process holds ``JOBRESULTS_EXPORT_WAIT_MAX`` waiters already.
        """
        if self._count >= self.max_waiters:
            raise TooManyWaiters(self.max_waiters)
        waiter = Waiter(export_id)
        self._waiters.setdefault(export_id, set()).add(waiter)
        self._count += 1
        EXPORT_WAITERS.inc()
        if self._poller is None:
            self._poller = asyncio.create_task(self._poll_loop(), name="export-waits-poller")
        try:
            yield waiter
        finally:
            waiters = self._waiters.get(export_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[export_id]
            self._count -= 1
            EXPORT_WAITERS.dec()

    def settled(self, export_id: str) -> None:
        """Announce that ``export_id`` left ``queued``/``running``; call it after the COMMIT that did so.

        Wakes this process's waiters at once and publishes the id on Redis in the background (a
        failed publish is logged; other replicas then notice by their poll).
        """
        self._wake(export_id, "local")
        if self._publisher is not None:
            task = asyncio.get_running_loop().create_task(self._publish(export_id))
            self._publishes.add(task)
            task.add_done_callback(self._publishes.discard)

    def _wake(self, export_id: str, source: str) -> None:
        waiters = self._waiters.get(export_id)
        if not waiters:
            return
        EXPORT_WAIT_WAKEUPS.labels(source).inc()
        for waiter in waiters:
            waiter.wake()

    async def _publish(self, export_id: str) -> None:
        publisher = self._publisher
        if publisher is None:  # pragma: no cover - stopped meanwhile
            return
        try:
            await publisher.publish(self.channel, export_id)
        except Exception as exc:  # noqa: BLE001 - the poll is the fallback
            if not self._publish_failing:
                log.warning("export_waits.publish_failed", error=type(exc).__name__)
            self._publish_failing = True
        else:
            self._publish_failing = False

    async def _subscribe_loop(self) -> None:
        """Listen on the channel; reconnect with growing pauses while Redis is unreachable."""
        assert self._redis_url is not None
        failures = 0
        while True:
            client = redis.asyncio.Redis.from_url(self._redis_url, socket_connect_timeout=REDIS_TIMEOUT_S)
            try:
                async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self.channel)
                    if failures:
                        log.info("export_waits.pubsub_recovered")
                    failures = 0
                    async for message in pubsub.listen():
                        data = message.get("data")
                        if message.get("type") == "message" and isinstance(data, bytes):
                            self._wake(data.decode("ascii", "replace"), "pubsub")
                raise ConnectionError("the subscription ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis is optional for long-polling: the poll covers
                failures += 1
                if failures == 1:
                    log.warning("export_waits.pubsub_unavailable", error=type(exc).__name__)
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(min(0.5 * 2 ** min(failures, 6), RESUBSCRIBE_MAX_S))

    async def _poll_loop(self) -> None:
        """Poll every ``poll_s`` while any request waits; the task ends when none is left."""
        try:
            while self._waiters:
                await asyncio.sleep(self.poll_s)
                if not self._waiters:
                    break
                try:
                    await self.poll_once()
                except Exception as exc:  # noqa: BLE001 - waiters still time out; the next tick tries again
                    log.warning("export_waits.poll_failed", error=type(exc).__name__)
        finally:
            self._poller = None

    async def poll_once(self) -> int:
        """Read the state of every waited export (one query per :data:`POLL_BATCH` ids); wake the settled.

        An export that no longer exists counts as settled (its waiters read it again and answer 404).
        Returns how many exports were found settled.

        Raises:
            DatabaseUnavailable: the database could not be read.
        """
        ids = list(self._waiters)
        settled = 0
        for start in range(0, len(ids), POLL_BATCH):
            batch = ids[start : start + POLL_BATCH]
            EXPORT_WAIT_POLLS.inc()
            states = await self.db.run(_states_of(batch), transaction=False)
            for export_id in batch:
                if states.get(export_id) not in PENDING_STATES:
                    settled += 1
                    self._wake(export_id, "poll")
        return settled


def _states_of(export_ids: list[str]) -> Callable[[Connection], Awaitable[dict[str, str]]]:
    return lambda conn: ExportRepository(conn).states(export_ids)
