"""Long-polling on real Granian servers: across replicas through Redis, and 1,000 waiters on one worker."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REDIS_URL, connect, fresh_database, make_token
from tests.support.servers import Server, Servers

WIDE = {"format": "ndjson", "created_from": "2000-01-01T00:00:00Z", "created_to": "2100-01-01T00:00:00Z"}


def metrics(server: Server, token: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The server's metrics as ``(sample name, sorted labels) -> value``."""
    response = httpx.get(f"{server.base_url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert response.status_code == 200, response.text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def metric(server: Server, token: str, name: str, **labels: str) -> float:
    """One sample's value (0 when absent)."""
    return metrics(server, token).get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(check: Any, limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while not check():
        assert time.monotonic() < deadline, f"{what} not reached within {limit_s} s"
        time.sleep(0.05)


def test_a_waiter_wakes_when_another_replica_finishes_the_export(servers: Servers, server_url: str) -> None:
    """Replica A (no worker, a 30 s poll) holds the request; replica B's worker finishes the export and
    publishes its id on Redis; A answers within a second of the export's finished_at."""
    with fresh_database(server_url, "jr_lp") as url:
        token = make_token(url)
        headers = {"Authorization": f"Bearer {token}"}

        def start(export_worker: bool, wait_poll_s: float) -> Server:
            return servers.start(
                url,
                workers=1,
                redis_url=REDIS_URL,
                webhooks_worker=False,
                log_level="warning",
                export_worker=export_worker,
                export_poll_s=0.2,
                export_wait_poll_s=wait_poll_s,
            )

        a = start(export_worker=False, wait_poll_s=30)
        put = httpx.put(
            f"{a.base_url}/v1/job-results/lp-1", json={"status": "succeeded", "result": {"n": 1}}, headers=headers
        )
        assert put.status_code == 201, put.text
        queued = httpx.post(f"{a.base_url}/v1/exports", json=WIDE, headers=headers)
        assert queued.status_code == 202, queued.text
        export_id = queued.json()["export_id"]
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            waiting = pool.submit(
                lambda: (
                    httpx.get(f"{a.base_url}/v1/exports/{export_id}?wait=60", headers=headers, timeout=90),
                    time.time(),
                )
            )
            wait_for(lambda: metric(a, token, "jobresults_export_waiters") == 1, 20, "one waiter on A")
            start(export_worker=True, wait_poll_s=30)  # replica B
            response, answered = waiting.result(timeout=80)
        assert response.status_code == 200, response.text
        record = response.json()
        assert record["state"] == "succeeded"
        finished = datetime.fromisoformat(record["finished_at"].replace("Z", "+00:00")).astimezone(UTC).timestamp()
        print(f"replica A answered {(answered - finished) * 1000:.0f} ms after replica B finished the export")
        assert answered - finished < 1.5, f"A answered {answered - finished:.2f} s after B finished the export"
        assert metric(a, token, "jobresults_export_wait_wakeups_total", source="pubsub") == 1
        assert metric(a, token, "jobresults_export_wait_wakeups_total", source="poll") == 0
        assert metric(a, token, "jobresults_export_waiters") == 0


def _seed_queued(url: str, count: int) -> list[str]:
    """``count`` queued range exports, inserted directly (the per-key cap of 10 does not apply)."""
    ids = [secrets.token_hex(16) for _ in range(count)]
    now = datetime.now(UTC).replace(tzinfo=None)
    with connect(url) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO exports (export_id, kind, format, compression, parameters, state, requested_by, created_at) "
            "VALUES (%s, 'range', 'ndjson', 'none', '{}', 'queued', 'seeded', %s)",
            [(export_id, now) for export_id in ids],
        )
    return ids


def test_a_thousand_waiters_cost_one_query_per_second_and_hold_no_connection(servers: Servers, server_url: str) -> None:
    """1,000 requests wait on one Granian worker: the poll costs ~1 query/s, no pooled connection is
    held, other requests answer at once; settled exports answer within the poll interval; clients
    that hang up leave the registry."""
    waiters = 1000
    with fresh_database(server_url, "jr_lp1k") as url:
        token = make_token(url)
        ids = _seed_queued(url, waiters + 1)
        server = servers.start(
            url,
            workers=1,
            redis_url=REDIS_URL,
            export_worker=False,
            webhooks_worker=False,
            log_level="warning",
            export_wait_poll_s=1.0,
            rate_limit_per_ip="100000/second",  # the first requests of a key count against its IP too
        )
        asyncio.run(_thousand_waiters(server, token, url, ids[:waiters], ids[waiters]))


class Answer(msgspec.Struct):
    """A raw HTTP/1.1 answer: status and body."""

    status_code: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_get(server: Server, path: str, token: str) -> Answer:
    """GET over a connection of its own (``Connection: close``); cancelling it closes the socket.

    httpx's pool spends O(connections x requests) per event, which with 1,000 open connections makes
    the client, not the server, take seconds per answer.
    """
    host, port = server.base_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        head = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n"
        writer.write(head.encode() + b"\r\n")
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
    status_line, _, body = data.partition(b"\r\n\r\n")
    return Answer(status_code=int(status_line.split(b" ", 2)[1]), body=body)


def worker_rss_kib(server: Server) -> int:
    """Resident memory of the server's (one) Granian worker process, KiB (Linux ``/proc``)."""
    children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
    status = Path(f"/proc/{children[0]}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])


async def _thousand_waiters(server: Server, token: str, url: str, ids: list[str], spare: str) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    rss_before = worker_rss_kib(server)
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=30) as client:
        tasks: dict[str, asyncio.Task[Answer]] = {}
        for export_id in ids:  # in steps of 100, not as one burst of 1000 connections
            tasks[export_id] = asyncio.create_task(raw_get(server, f"/v1/exports/{export_id}?wait=60", token))
            if len(tasks) % 100 == 0:
                await asyncio.sleep(0.2)

        def all_waiting() -> bool:
            failed = [task.result() for task in tasks.values() if task.done()]
            assert not failed, f"{len(failed)} waiters answered early, e.g. {failed[0].status_code} {failed[0].body!r}"
            return metric(server, token, "jobresults_export_waiters") == len(ids)

        await asyncio.to_thread(wait_for, all_waiting, 90, "1000 waiters")
        # Every waiter is registered before its first read: wait until those reads are done too.
        await asyncio.to_thread(
            wait_for,
            lambda: (
                metric(server, token, "jobresults_db_query_duration_seconds_count", kind="read", outcome="ok")
                >= len(ids)
            ),
            60,
            "the waiters' first reads",
        )
        rss_waiting = worker_rss_kib(server)
        polls_before = metric(server, token, "jobresults_export_wait_polls_total")
        started = time.monotonic()
        in_use: list[float] = []
        latencies: list[float] = []
        while time.monotonic() - started < 5:
            sample = await asyncio.to_thread(metrics, server, token)
            in_use.append(sample[("jobresults_db_pool_connections_in_use", ())])
            asked = time.monotonic()
            other = await client.get(f"/v1/exports/{spare}")
            latencies.append(time.monotonic() - asked)
            assert other.status_code == 200
            await asyncio.sleep(0.25)
        polls = metric(server, token, "jobresults_export_wait_polls_total") - polls_before
        elapsed = time.monotonic() - started
        print(
            f"1000 waiters: {polls:.0f} poll queries in {elapsed:.1f} s; pool in use {max(in_use)}; "
            f"other GET max {max(latencies) * 1000:.0f} ms; worker RSS +{(rss_waiting - rss_before) / 1024:.1f} MiB"
        )
        assert polls <= elapsed / 1.0 + 2, f"{polls} poll queries in {elapsed:.1f} s"  # one a second
        # At most the poll's query and one passing request's read, whatever the number of waiters.
        assert max(in_use) <= 2, f"pooled connections in use while waiting: {in_use}"
        assert max(latencies) < 1.0, f"another request took {max(latencies):.2f} s while 1000 waited"
        assert not any(task.done() for task in tasks.values())

        # Half the exports settle elsewhere (no message): the poll wakes exactly their waiters.
        settled = ids[: len(ids) // 2]
        with connect(url) as conn, conn.cursor() as cur:
            cur.executemany(
                "UPDATE exports SET state = 'failed', error = 'settled by the test' WHERE export_id = %s",
                [(export_id,) for export_id in settled],
            )
        marked = time.monotonic()
        answers = await asyncio.wait_for(asyncio.gather(*(tasks[export_id] for export_id in settled)), 30)
        took = time.monotonic() - marked
        assert all(answer.status_code == 200 and answer.json()["state"] == "failed" for answer in answers)
        assert took < 1.0 + 3.0, f"the settled exports' waiters answered after {took:.1f} s"
        assert not any(tasks[export_id].done() for export_id in ids[len(ids) // 2 :])

        # The other half hang up: the server forgets them at once, not after their 60 s.
        for export_id in ids[len(ids) // 2 :]:
            tasks[export_id].cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    hung_up = time.monotonic()
    await asyncio.to_thread(
        wait_for, lambda: metric(server, token, "jobresults_export_waiters") == 0, 10, "no waiter left"
    )
    print(f"settled half answered in {took:.2f} s; hung-up half gone in {time.monotonic() - hung_up:.2f} s")
