"""Purge under load (issue 14): purge rows/s, and the k6 mix's p99 with and without a purge running.

1. DROPS the database ``--database`` (default ``jr_bench_purge``) on ``--server``, creates, migrates and
   seeds it as ``just perf`` does (``run_perf.prepare``), and starts ``jobresults serve`` with production
   settings (2 workers, auth, rate limits in Redis, JSON logs) and its own purge worker off;
2. runs one purge of ``--rows`` expired rows with no load (the purge alone);
3. runs ``--pairs`` pairs of k6 rounds of the mix at ``--rate`` for ``--duration`` each, interleaved
   ABBA (off, on, on, off, ...) so drift of the shared machine falls on both sides. Before every round
   ``--rows`` expired results are inserted (created 30 days ago, expired a day ago, a 1 KB document
   each: outside the time range the mix lists and exports, as old results are), then the machine gets
   ``--settle-s`` to calm down, so both kinds of round start from the same state. During an "on" round
   a :class:`service.purge.PurgeRunner` (the code of the service's purge worker and of
   ``jobresults purge``, same batch size and pacing settings) purges them from this process until k6
   ends; in an "off" round they stay. What is left is purged after the round, unmeasured.

Prints one JSON line per round and writes perf/results/purge-<time>.json.

    uv run python perf/purge_benchmark.py --server mysql://root:@127.0.0.1:3306/test --rows 200000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pymysql
from prometheus_client import REGISTRY

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "perf"))

from run_perf import DEFAULT_REDIS, RESULTS, Service, prepare, run_k6  # noqa: E402

from config.settings import DatabaseURL, Settings  # noqa: E402
from observability.logging import configure_logging  # noqa: E402
from repositories.database import Database  # noqa: E402
from service.purge import PurgeRunner  # noqa: E402

SEED = 1000
DOCUMENT = json.dumps({"tool": "bench", "findings": [{"id": n, "severity": "low", "msg": "x" * 60} for n in range(10)]})
"""About 1 KB: the document of every expired row."""
INSERT_CHUNK = 2000


def seed_expired(url: str, prefix: str, rows: int) -> None:
    """Insert ``rows`` results that expired a day ago (created 30 days ago), in multi-row INSERTs."""
    parts = DatabaseURL.parse(url)
    now = datetime.now(UTC).replace(tzinfo=None)
    created, expired = now - timedelta(days=30), now - timedelta(days=1)
    conn = pymysql.connect(
        host=parts.host, port=parts.port, user=parts.user, password=parts.password, database=parts.database
    )
    try:
        with conn.cursor() as cur:
            for start in range(0, rows, INSERT_CHUNK):
                cur.executemany(
                    "INSERT INTO job_results (job_id, status, result_data, version, created_at, updated_at, "
                    "expires_at, pinned) VALUES (%s, 'succeeded', %s, 1, %s, %s, %s, FALSE)",
                    [
                        (f"{prefix}-{n}", DOCUMENT, created, created, expired)
                        for n in range(start, min(start + INSERT_CHUNK, rows))
                    ],
                )
                conn.commit()
    finally:
        conn.close()


def count_due(url: str) -> int:
    parts = DatabaseURL.parse(url)
    conn = pymysql.connect(
        host=parts.host, port=parts.port, user=parts.user, password=parts.password, database=parts.database
    )
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM job_results WHERE expires_at <= UTC_TIMESTAMP(6)")
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def purged_so_far() -> float:
    """This process's ``jobresults_purge_rows_total`` (the runner counts each committed batch)."""
    return REGISTRY.get_sample_value("jobresults_purge_rows_total", {"task": "job_results"}) or 0.0


async def purge_until(settings: Settings, stop: asyncio.Event | None) -> tuple[int, float]:
    """One purge pass until nothing is due or ``stop`` is set; returns (rows purged, seconds)."""
    db = await Database.open(settings)
    runner = PurgeRunner(db, settings)
    started = time.perf_counter()
    before = purged_so_far()
    try:
        task = asyncio.create_task(runner.run_pass())
        waits: set[asyncio.Future[Any]] = {task}
        if stop is not None:
            waits.add(asyncio.ensure_future(stop.wait()))
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        elapsed = time.perf_counter() - started
        if task not in done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        await db.close()
    return int(purged_so_far() - before), elapsed


def k6_round(service: Service, ctx: tuple[Any, ...], rate: int, duration: str, label: str) -> dict[str, Any]:
    _url, tokens, payload_file, range_from, range_to = ctx
    summary = RESULTS / f"purge-k6-{label}.json"
    run_k6(
        service.base,
        tokens,
        payload_file,
        range_from,
        range_to,
        rate=str(rate),
        duration=duration,
        seed=SEED,
        summary=summary,
        quiet=True,
        LIMITER="off",
        P99_MS="100000",
    )
    metrics = json.loads(summary.read_text())["metrics"]
    latency = metrics["http_req_duration{scenario:mix}"]
    failed = metrics["http_req_failed{scenario:mix}"]
    return {
        "p50_ms": round(latency["med"], 2),
        "p99_ms": round(latency["p(99)"], 2),
        "max_ms": round(latency["max"], 1),
        "error_rate": failed.get("value", failed.get("rate", 0.0)),
        "dropped": metrics.get("dropped_iterations", {}).get("count", 0),
        "achieved_rps": round(metrics["iterations"]["rate"], 1),
    }


async def on_round(
    service: Service, ctx: tuple[Any, ...], settings: Settings, rate: int, duration: str, label: str
) -> dict[str, Any]:
    stop = asyncio.Event()
    purge = asyncio.create_task(purge_until(settings, stop))
    await asyncio.sleep(0)  # let the purge start with the load
    k6 = await asyncio.to_thread(k6_round, service, ctx, rate, duration, label)
    stop.set()
    purged, seconds = await purge
    return {**k6, "purged_rows": purged, "purge_s": round(seconds, 1), "purge_rows_per_s": round(purged / seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--server", default=os.environ.get("JOBRESULTS_PERF_SERVER", "mysql://root:@127.0.0.1:3306/test")
    )
    parser.add_argument("--database", default="jr_bench_purge", help="DROPPED and re-created")
    parser.add_argument("--redis", default=os.environ.get("JOBRESULTS_PERF_REDIS", DEFAULT_REDIS))
    parser.add_argument("--rows", type=int, default=200_000, help="expired rows to purge per round")
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--duration", default="60s")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--batch-rows", type=int, default=500)
    parser.add_argument("--settle-s", type=float, default=15.0, help="pause after seeding, before a round")
    parser.add_argument("--pause-s", type=float, default=None, help="JOBRESULTS_PURGE_PAUSE_S (default: the service's)")
    args = parser.parse_args()

    configure_logging("warning")  # the runner's per-batch lines would drown the rounds' figures
    ctx = prepare(args.server, SEED, args.database)
    url = ctx[0]
    overrides: dict[str, Any] = {"database_url": url, "purge_batch_rows": args.batch_rows, "log_level": "warning"}
    if args.pause_s is not None:
        overrides["purge_pause_s"] = args.pause_s
    settings = Settings.from_env({}, **overrides)
    service = Service(url, args.redis, "2", JOBRESULTS_PURGE_WORKER="false")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the service
    rounds: list[dict[str, Any]] = []
    try:
        seed_expired(url, "alone", args.rows)
        purged, seconds = asyncio.run(purge_until(settings, None))
        alone = {"round": "purge alone", "purged_rows": purged, "purge_s": round(seconds, 1)}
        alone["purge_rows_per_s"] = round(purged / seconds)
        print(json.dumps(alone), flush=True)
        order = [("off", "on"), ("on", "off")] * ((args.pairs + 1) // 2)
        for index, kind in enumerate(kind for pair in order[: args.pairs] for kind in pair):
            label = f"{index}-{kind}"
            seed_expired(url, f"r{index}", args.rows)
            time.sleep(args.settle_s)
            if kind == "on":
                row = asyncio.run(on_round(service, ctx, settings, args.rate, args.duration, label))
            else:
                row = k6_round(service, ctx, args.rate, args.duration, label)
            row = {"round": label, **row, "left_due": count_due(url)}
            asyncio.run(purge_until(settings, None))  # the rest, unmeasured
            rounds.append(row)
            print(json.dumps(row), flush=True)
    finally:
        service.stop()
    off = [r["p99_ms"] for r in rounds if r["round"].endswith("off")]
    on = [r["p99_ms"] for r in rounds if r["round"].endswith("on")]
    summary = {
        "rows_per_round": args.rows,
        "batch_rows": settings.purge_batch_rows,
        "pause_s": settings.purge_pause_s,
        "rate": args.rate,
        "duration": args.duration,
        "purge_alone": alone,
        "rounds": rounds,
        "p99_off_median_ms": statistics.median(off) if off else None,
        "p99_on_median_ms": statistics.median(on) if on else None,
        "p99_ratio_on_off": round(statistics.median(on) / statistics.median(off), 2) if on and off else None,
        "purge_rows_per_s_under_load": [r["purge_rows_per_s"] for r in rounds if "purge_rows_per_s" in r],
    }
    out = RESULTS / f"purge-{datetime.now():%Y%m%dT%H%M%S}.json"
    out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
