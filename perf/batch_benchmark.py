"""Batch-write benchmark: small job results uploaded with ``POST /v1/job-results:batch`` against single PUTs.

One ``jobresults serve`` (Granian, 2 workers, auth and rate limiting on, info logs, counters in Redis)
on a fresh database; an asyncio httpx client on the same machine. Interleaved rounds, each with:

* ``batch``: ``--rows`` new results (default 100,000) in batches of ``--batch-size`` (500),
  ``--batch-concurrency`` (4) requests in flight: all creates, so the multi-row INSERT path;
* ``batch-replace``: ``--replace-rows`` (20,000) results already stored, again in batches of 500:
  every item goes through the PUT's own write path (``store_write``), one by one in one transaction;
* ``put``: ``--put-rows`` (10,000; fewer than the batch rows, to keep the run short) new results, one
  ``PUT`` each, ``--put-concurrency`` (16) in flight.

Reports rows/s and request latency (p50/p99) per mode and round, and the ratios of the medians.
The client shares the 2 cores with the service, MariaDB and Redis; its cost per request weighs on
the single PUTs far more than on the batches (one request per 500 rows).

DROPS the database ``--database`` (default ``jr_batch_bench``) on ``--server`` and creates it afresh.

    uv run python perf/batch_benchmark.py --server mysql://root:@127.0.0.1:3306/test [--rounds 3]

``--stall`` instead measures one large batch in this process, through the ASGI app (auth and rate
limits off), as ``perf/put_stall_benchmark.py`` does for a PUT: a body of about 16 MiB, 1,000 items
(or ``--stall-items``) whose results are arrays of ``{}`` (the checker's worst case), while a task that
sleeps 1 ms records how late it wakes (the longest time something held the event loop) and a thread
samples RSS every 5 ms.

    uv run python perf/batch_benchmark.py --stall [--stall-items 16]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "perf"))

from run_perf import DEFAULT_REDIS, DEFAULT_SERVER, Service, prepare  # noqa: E402


def document(n: int) -> bytes:
    """A small (~170 byte) job result, as CI test steps upload them."""
    return json.dumps(
        {"suite": f"unit-{n % 40}", "tests": 120 + n % 9, "failed": n % 3, "duration_ms": 5321 + n % 997, "ok": True},
        separators=(",", ":"),
    ).encode()


def batch_body(job_ids: list[str], first: int) -> bytes:
    items = [
        b'{"job_id":"' + job_id.encode() + b'","status":"succeeded","result":' + document(first + n) + b"}"
        for n, job_id in enumerate(job_ids)
    ]
    return b'{"items":[' + b",".join(items) + b"]}"


async def run_requests(
    client: httpx.AsyncClient, requests: list[tuple[str, str, bytes]], concurrency: int
) -> tuple[float, list[float]]:
    """Send ``(method, path, body)`` requests with ``concurrency`` in flight; wall seconds and latencies."""
    queue = iter(requests)
    latencies: list[float] = []

    async def worker() -> None:
        for method, path, body in queue:
            started = time.perf_counter()
            response = await client.request(method, path, content=body, headers={"Content-Type": "application/json"})
            latencies.append(time.perf_counter() - started)
            if response.status_code not in (200, 201):
                raise SystemExit(f"{method} {path}: {response.status_code} {response.text[:300]}")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


def summary(mode: str, rows: int, wall: float, latencies: list[float]) -> dict[str, object]:
    latencies.sort()
    return {
        "mode": mode,
        "rows": rows,
        "requests": len(latencies),
        "seconds": round(wall, 2),
        "rows_per_s": round(rows / wall),
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 1),
    }


async def bench(base: str, token: str, args: argparse.Namespace) -> list[dict[str, object]]:
    results: list[dict[str, object]] = []
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=120, limits=limits) as client:
        for round_number in range(1, args.rounds + 1):
            tag = uuid.uuid4().hex[:8]
            for mode in ("batch", "put", "batch-replace"):
                if mode == "put":
                    ids = [f"p-{tag}-{n}" for n in range(args.put_rows)]
                    requests = [
                        ("PUT", f"/v1/job-results/{job_id}", b'{"status":"succeeded","result":' + document(n) + b"}")
                        for n, job_id in enumerate(ids)
                    ]
                    wall, latencies = await run_requests(client, requests, args.put_concurrency)
                    rows = len(ids)
                else:
                    count = args.rows if mode == "batch" else args.replace_rows
                    ids = [f"b-{tag}-{n}" for n in range(count)]  # batch-replace re-sends the batch round's ids
                    requests = [
                        ("POST", "/v1/job-results:batch", batch_body(ids[i : i + args.batch_size], i))
                        for i in range(0, count, args.batch_size)
                    ]
                    wall, latencies = await run_requests(client, requests, args.batch_concurrency)
                    rows = count
                result = summary(mode, rows, wall, latencies) | {"round": round_number}
                print(json.dumps(result), flush=True)
                results.append(result)
    return results


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def stall(url: str, items: int, size: int) -> dict[str, object]:
    """One batch of about ``size`` bytes and ``items`` items through the ASGI app; loop stalls and RSS."""
    from config.settings import Settings
    from service.app import create_app

    settings = Settings.from_env(
        {}, database_url=url, auth_enabled=False, rate_limit_enabled=False, export_worker=False, log_level="error"
    )
    app = create_app(settings)
    per_item = (size // items - 80) // 3
    result = b"[" + b"{}," * (per_item - 1) + b"{}]"
    tag = uuid.uuid4().hex[:8]
    body = (
        b'{"items":['
        + b",".join(
            b'{"job_id":"s-' + f"{tag}-{n}".encode() + b'","status":"succeeded","result":' + result + b"}"
            for n in range(items)
        )
        + b"]}"
    )
    gc.collect()
    stalls: list[float] = []
    before = rss_mb()
    peak = [before]
    sampling = True

    def sample() -> None:
        while sampling:
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.005)

    async def tick() -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(0.001)
            now = loop.time()
            stalls.append(now - last - 0.001)
            last = now

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    async with app.lifespan():
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=300) as client:
            ticker = asyncio.create_task(tick())
            await asyncio.sleep(0.05)
            started = time.perf_counter()
            response = await client.post(
                "/v1/job-results:batch", content=body, headers={"content-type": "application/json"}
            )
            elapsed = time.perf_counter() - started
            ticker.cancel()
    status = response.status_code
    del body, response
    gc.collect()
    await asyncio.sleep(1.0)
    sampling = False
    sampler.join()
    return {
        "items": items,
        "body_mib": round(size / 2**20, 1),
        "status": status,
        "seconds": round(elapsed, 2),
        "longest_stall_ms": round(max(stalls) * 1000, 1),
        "peak_rss_above_start_mb": round(peak[0] - before, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default=DEFAULT_SERVER)
    parser.add_argument("--database", default="jr_batch_bench")
    parser.add_argument("--redis", default=DEFAULT_REDIS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--replace-rows", type=int, default=20_000)
    parser.add_argument("--put-rows", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--batch-concurrency", type=int, default=4)
    parser.add_argument("--put-concurrency", type=int, default=16)
    parser.add_argument("--stall", action="store_true")
    parser.add_argument("--stall-items", type=int, default=1000)
    args = parser.parse_args()
    url, tokens, _payloads, _from, _to = prepare(args.server, 0, args.database)
    if args.stall:
        print(json.dumps(asyncio.run(stall(url, args.stall_items, 16 * 1024 * 1024 - 4096))))
        return
    service = Service(url, args.redis, "2")
    try:
        results = asyncio.run(bench(service.base, tokens["perf-load"], args))
    finally:
        service.stop()
    medians = {
        mode: statistics.median(float(r["rows_per_s"]) for r in results if r["mode"] == mode)  # type: ignore[arg-type]
        for mode in ("batch", "batch-replace", "put")
    }
    print(json.dumps({"median_rows_per_s": medians}))
    print(
        json.dumps(
            {
                "batch_over_put": round(medians["batch"] / medians["put"], 1),
                "batch_replace_over_put": round(medians["batch-replace"] / medians["put"], 1),
            }
        )
    )


if __name__ == "__main__":
    main()
