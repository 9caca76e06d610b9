"""Random API tokens against a real service: what they cost the database and a legitimate client.

Starts the service (1 Granian worker, auth and rate limits on, counters in Redis) on a fresh database,
then measures a legitimate key's GET latency alone, and again while ``--tokens`` requests with random
well-formed tokens (``jr_<12 hex>_<43 chars>``, every one a new key id) arrive from the same machine
(one client IP, as a single attacker would be). The database reads the flood caused come from the
service's own ``jobresults_db_query_duration_seconds_count{kind="read"}``, minus the legitimate GETs.

    uv run python perf/auth_flood.py --tokens 20000
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import secrets
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "perf"))

from run_perf import DEFAULT_REDIS, DEFAULT_SERVER, Service, database_name, prepare  # noqa: E402


def reads(client: httpx.Client, headers: dict[str, str]) -> float:
    """Database read units served so far (all outcomes), from /metrics."""
    text = client.get("/metrics", headers=headers).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("jobresults_db_query_duration_seconds_count{") and 'kind="read"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def legit_gets(client: httpx.Client, headers: dict[str, str], stop: threading.Event, limit: int) -> list[float]:
    """Milliseconds of sequential legitimate GETs until ``stop`` is set or ``limit`` were sent."""
    times = []
    while not stop.is_set() and len(times) < limit:
        started = time.perf_counter()
        response = client.get("/v1/job-results/perf-seed-0", headers=headers)
        assert response.status_code == 200, response.text
        times.append((time.perf_counter() - started) * 1000)
    return times


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", default=os.environ.get("JOBRESULTS_PERF_SERVER", DEFAULT_SERVER))
    parser.add_argument(
        "--database",
        type=database_name,
        default=os.environ.get("JOBRESULTS_PERF_DATABASE", "jr_perf_auth"),
        help="database on --server that is DROPPED and re-created (default jr_perf_auth)",
    )
    parser.add_argument("--redis", default=os.environ.get("JOBRESULTS_PERF_REDIS", DEFAULT_REDIS))
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()
    url, tokens, *_ = prepare(args.server, 10, args.database)
    service = Service(url, args.redis, "1")
    headers = {"Authorization": f"Bearer {tokens['perf-load']}"}
    try:
        with httpx.Client(base_url=service.base, timeout=30) as client:
            legit_gets(client, headers, threading.Event(), 50)  # warm up
            alone = legit_gets(client, headers, threading.Event(), 300)
            before = reads(client, headers)
            stop = threading.Event()
            statuses: dict[int, int] = {}
            lock = threading.Lock()

            def attack(count: int) -> None:
                with httpx.Client(base_url=service.base, timeout=30) as own:
                    for _ in range(count):
                        token = f"jr_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"
                        status = own.get("/v1/job-results", headers={"Authorization": f"Bearer {token}"}).status_code
                        with lock:
                            statuses[status] = statuses.get(status, 0) + 1

            started = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(max_workers=args.threads + 1) as pool:
                legit = pool.submit(legit_gets, client, headers, stop, 10**9)
                share = args.tokens // args.threads
                attackers = [pool.submit(attack, share) for _ in range(args.threads)]
                for future in attackers:
                    future.result()
                stop.set()
                during = legit.result()
            seconds = time.monotonic() - started
            flood_reads = reads(client, headers) - before - len(during) - 1
    finally:
        service.stop()
    sent = sum(statuses.values())
    print(
        f"random tokens: {sent} in {seconds:.1f} s ({sent / seconds:.0f}/s), statuses {dict(sorted(statuses.items()))}"
    )
    print(f"database reads caused by them: {flood_reads:.0f}")
    print(
        f"legitimate GET median: {statistics.median(alone):.1f} ms alone, "
        f"{statistics.median(during):.1f} ms during the flood ({len(during)} GETs; "
        f"p95 {statistics.quantiles(during, n=20)[-1]:.1f} ms)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
