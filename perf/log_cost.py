"""What the canonical request log line costs: CPU per GET with logging on (info) and off (warning).

Two methods, both with auth and rate limits off so that only logging differs:

* ``--method granian`` (end to end): starts the service (1 Granian worker), sends the GETs with k6
  and reads the server processes' CPU time from /proc. Real, but the shared machine's noise
  (about +-5% between identical runs) is as large as the effect.
* ``--method line``: times the request log line itself (thread CPU of the middleware's ``log.info``)
  inside the running app, GETs through the ASGI interface.
* ``--method asgi`` (default): a fresh process builds the app, drives it through the ASGI interface
  (no HTTP server, no load generator) with GETs against the real database, one after another, and
  reads its own CPU time; the log lines go to a file, as in production. Rounds alternate off and on.
  Without Granian's share in the denominator the percentage is an upper bound of the real one.

    uv run python perf/log_cost.py --requests 20000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "perf"))

from run_perf import BIN, DEFAULT_REDIS, K6_API_ADDRESS, RESULTS, Service, prepare  # noqa: E402

CLOCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every process in the group (Granian's main process and workers)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[2]) == pgid:  # field 5 of stat: process group id
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK


SCRIPT = """
import http from "k6/http";
export const options = { scenarios: { get: { executor: "shared-iterations", vus: 16,
  iterations: parseInt(__ENV.N, 10), maxDuration: "5m" } } };
export default function () {
  http.get(`${__ENV.BASE_URL}/v1/job-results/perf-seed-${Math.floor(Math.random() * 1000)}`);
}
"""


def measure(url: str, redis: str, requests: int, level: str) -> float:
    service = Service(
        url,
        redis,
        "1",
        JOBRESULTS_AUTH_ENABLED="false",
        JOBRESULTS_RATE_LIMIT_ENABLED="false",
        JOBRESULTS_LOG_LEVEL=level,
    )
    try:
        script = RESULTS / "log_cost.js"
        script.write_text(SCRIPT)
        before = cpu_seconds(service.proc.pid)
        subprocess.run(
            [str(BIN / "k6"), "run", "--quiet", "--address", K6_API_ADDRESS, str(script)],
            check=True,
            stdout=subprocess.DEVNULL,
            env=dict(os.environ, BASE_URL=service.base, N=str(requests), K6_NO_USAGE_REPORT="true"),
        )
        return (cpu_seconds(service.proc.pid) - before) / requests * 1e6
    finally:
        service.stop()


def _bare_get_app(url: str, level: str) -> tuple[Any, Any]:
    """The app with auth and rate limits off (only logging differs) and an ASGI driver for it."""
    from app_cost import AsgiDriver, build_app

    app = build_app(url, auth_enabled=False, rate_limit_enabled=False, log_level=level)
    return app, AsgiDriver(app, token=None)


async def _timed_gets(driver: Any, requests: int) -> float:
    """CPU µs per GET of ``requests`` GETs of seeded results, one after another."""
    import random
    import time

    started = time.process_time()
    for _ in range(requests):
        if await driver.request("GET", f"/v1/job-results/perf-seed-{random.randrange(1000)}") != 200:
            raise SystemExit("a GET failed")
    return (time.process_time() - started) / requests * 1e6


async def _warm_up(driver: Any) -> None:
    for i in range(500):  # pool, caches, lazily built handlers
        await driver.request("GET", f"/v1/job-results/perf-seed-{i % 1000}")


def asgi_worker(url: str, level: str, requests: int) -> float:
    """In this process: CPU µs per GET through the app's ASGI callable (the ``--method asgi`` child)."""
    import asyncio

    app, driver = _bare_get_app(url, level)

    async def run() -> float:
        async with app.lifespan():
            await _warm_up(driver)
            return await _timed_gets(driver, requests)

    return asyncio.run(run())


def line_worker(url: str, requests: int, rounds: int) -> list[dict[str, float]]:
    """In this process: thread CPU of each request log line itself, inside the running app (``--method line``).

    The middleware's logger is wrapped with ``time.thread_time_ns``; GETs go through the ASGI callable
    with logging at ``info`` (auth and rate limits off). Returns per round: mean, median, p99 in µs and
    the whole GET's CPU in µs.
    """
    import asyncio
    import statistics
    import time

    import observability.requests as requests_module

    real = requests_module.log
    spent: list[int] = []

    class TimedLogger:
        def info(self, *args: object, **kwargs: object) -> None:
            started = time.thread_time_ns()
            real.info(*args, **kwargs)
            spent.append(time.thread_time_ns() - started)

    requests_module.log = TimedLogger()  # type: ignore[assignment]
    app, driver = _bare_get_app(url, "info")

    async def run() -> list[dict[str, float]]:
        out = []
        async with app.lifespan():
            await _warm_up(driver)
            for _ in range(rounds):
                spent.clear()
                per_get = await _timed_gets(driver, requests)
                ordered = sorted(spent)
                out.append(
                    {
                        "line_mean_us": statistics.fmean(ordered) / 1e3,
                        "line_median_us": ordered[len(ordered) // 2] / 1e3,
                        "line_p99_us": ordered[int(len(ordered) * 0.99)] / 1e3,
                        "get_cpu_us": per_get,
                    }
                )
        return out

    return asyncio.run(run())


def measure_asgi(url: str, requests: int, level: str) -> float:
    log = RESULTS / f"log-cost-{level}.log"
    with log.open("wb") as out:
        done = subprocess.run(
            [sys.executable, __file__, "--child", level, "--server-url", url, "--requests", str(requests)],
            check=True,
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
        )
    return float(done.stderr.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--server", default=os.environ.get("JOBRESULTS_PERF_SERVER", "mysql://root:@127.0.0.1:3306/test")
    )
    parser.add_argument("--redis", default=os.environ.get("JOBRESULTS_PERF_REDIS", DEFAULT_REDIS))
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--method", choices=("asgi", "granian", "line"), default="asgi")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--server-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(f"{asgi_worker(args.server_url, args.child, args.requests):.3f}", file=sys.stderr)
        return 0
    url = prepare(args.server, 1000)[0]
    if args.method == "line":
        log = RESULTS / "log-cost-line.log"
        with log.open("wb") as out:
            os.dup2(out.fileno(), 1)  # the lines go to a file, as in production
            results = line_worker(url, args.requests, args.rounds)
        for r in results:
            print(
                f"request log line: mean {r['line_mean_us']:.1f} µs, median {r['line_median_us']:.1f} µs, "
                f"p99 {r['line_p99_us']:.1f} µs of thread CPU; the whole GET {r['get_cpu_us']:.0f} µs",
                file=sys.stderr,
            )
        (RESULTS / "log-cost-line.json").write_text(json.dumps(results, indent=2))
        return 0
    rows = []
    for _ in range(args.rounds):
        if args.method == "asgi":
            off = measure_asgi(url, args.requests, "warning")
            on = measure_asgi(url, args.requests, "info")
        else:
            off = measure(url, args.redis, args.requests, "warning")
            on = measure(url, args.redis, args.requests, "info")
        rows.append({"cpu_us_per_get_logging_off": off, "cpu_us_per_get_logging_on": on, "cost": on / off - 1})
        cost = 100 * (on / off - 1)
        print(f"CPU per GET ({args.method}): logging off {off:.0f} µs, on {on:.0f} µs, cost {cost:+.1f}%")
    (RESULTS / f"log-cost-{args.method}.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
