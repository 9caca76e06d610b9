"""Event-loop stalls and memory of one large PUT (issue 12 item 3): the 16 MiB worst case
``{"status":"succeeded","result":[{},{},...]}`` and other shapes, driven through the ASGI app.

Each run is a fresh process: it builds the app (auth and rate limits off) on the database
``jr_bench_put``, which it drops and creates again, then sends ``--concurrent`` such PUTs at once,
while a task that sleeps 1 ms records how late it wakes up (how long something held the loop), and a
thread samples the process's RSS every 5 ms. ``--inline`` checks every body on the event loop, as the
service did before, for comparison.

    uv run python perf/put_stall_benchmark.py --server mysql://root:@127.0.0.1:3307/test
    uv run python perf/put_stall_benchmark.py --server ... --shape escaped-strings --concurrent 4

``PUT_BENCH_DEBUG=1 PUT_BENCH_LOG_LEVEL=warning PUT_BENCH_SLOW_S=0.01`` with ``--child <shape>,1,0``
runs one case in asyncio debug mode, logging every callback that held the loop longer than 10 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {
    "empty-objects": b"{}",
    "empty-arrays": b"[]",
    "zeros": b"0",
    "strings": b'"a"',
    "escaped-strings": b'"\\n\\"x"',
    "big-integers": b"12345678901234567890",
}
DATABASE = "jr_bench_put"
PAGE = os.sysconf("SC_PAGE_SIZE")


def body_of(shape: str, size: int) -> bytes:
    """A PUT body of about ``size`` bytes: an array of the shape's item."""
    item = SHAPES[shape]
    count = (size - 40) // (len(item) + 1)
    return b'{"status":"succeeded","result":[' + b",".join([item] * count) + b"]}"


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE / 2**20


async def one_run(server: str, shape: str, size: int, concurrent: int, inline: bool) -> dict[str, object]:
    import httpx

    from config.settings import DatabaseURL, Settings
    from service import app as app_module
    from service.controllers import job_results

    if inline:
        job_results.INLINE_CHECK_BYTES = 1 << 40
    parts = DatabaseURL.parse(server)
    url = f"mysql://{parts.user}:{parts.password}@{parts.host}:{parts.port}/{DATABASE}"
    settings = Settings.from_env(
        {},
        database_url=url,
        auth_enabled=False,
        rate_limit_enabled=False,
        export_worker=False,
        log_level=os.environ.get("PUT_BENCH_LOG_LEVEL", "error"),
    )
    app = app_module.create_app(settings)
    bodies = [body_of(shape, size) for _ in range(concurrent)]
    gc.collect()
    stalls: list[float] = []
    peak = [rss_mb()]
    before = peak[0]
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

    asyncio.get_running_loop().slow_callback_duration = float(os.environ.get("PUT_BENCH_SLOW_S", "0.02"))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    async with app.lifespan():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=120) as client:
            ticker = asyncio.create_task(tick())
            await asyncio.sleep(0.05)
            started = time.perf_counter()
            headers = {"content-type": "application/json"}
            responses = await asyncio.gather(
                *(client.put(f"/v1/job-results/bench-{uuid.uuid4().hex}", content=b, headers=headers) for b in bodies)
            )
            elapsed = time.perf_counter() - started
            ticker.cancel()
    statuses = sorted({r.status_code for r in responses})
    del bodies, responses
    gc.collect()
    await asyncio.sleep(1.0)
    sampling = False
    sampler.join()
    return {
        "shape": shape,
        "body_mib": round(size / 2**20, 1),
        "concurrent": concurrent,
        "check": "inline (before)" if inline else "thread + streaming",
        "statuses": statuses,
        "seconds": round(elapsed, 2),
        "longest_stall_ms": round(max(stalls) * 1000, 1),
        "peak_rss_above_start_mb": round(peak[0] - before, 1),
        "rss_after_above_start_mb": round(rss_mb() - before, 1),
    }


def prepare(server: str) -> None:
    import pymysql

    from config.settings import DatabaseURL, Settings
    from repositories.migrations import apply_migrations

    parts = DatabaseURL.parse(server)
    conn = pymysql.connect(host=parts.host, port=parts.port, user=parts.user, password=parts.password, autocommit=True)
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {DATABASE}")
        cur.execute(f"CREATE DATABASE {DATABASE} CHARACTER SET utf8mb4")
        cur.execute("SELECT VERSION(), @@GLOBAL.max_allowed_packet")
        print("server:", cur.fetchone())
    url = f"mysql://{parts.user}:{parts.password}@{parts.host}:{parts.port}/{DATABASE}"
    apply_migrations(Settings.from_env({}, database_url=url))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True, help="mysql://user:password@host:port/any (drops jr_bench_put)")
    parser.add_argument("--shape", choices=sorted(SHAPES), action="append")
    parser.add_argument("--size", type=int, default=16 * 1024 * 1024, help="body size in bytes (default 16 MiB)")
    parser.add_argument("--concurrent", type=int, action="append")
    parser.add_argument("--inline", action="store_true", help="also run with the check on the event loop")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        shape, concurrent, inline = args.child.split(",")
        debug = bool(os.environ.get("PUT_BENCH_DEBUG"))  # log each callback that held the loop > 30 ms
        if debug:
            import logging

            logging.basicConfig(level=logging.WARNING)
        row = asyncio.run(one_run(args.server, shape, args.size, int(concurrent), inline == "1"), debug=debug)
        print(json.dumps(row))
        return
    prepare(args.server)
    for shape in args.shape or ["empty-objects"]:
        for concurrent in args.concurrent or [1]:
            for inline in (False, True) if args.inline else (False,):
                child = f"{shape},{concurrent},{int(inline)}"
                out = subprocess.run(
                    [sys.executable, __file__, "--server", args.server, "--size", str(args.size), "--child", child],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
