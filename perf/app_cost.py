"""CPU per request of the application itself: each operation driven through the ASGI callable.

No HTTP server and no load generator share the measurement: one process builds the app (auth, rate
limits in Redis and request logging on, as in production), runs a warm-up, then sends ``--requests``
requests of one operation one after another against the real database and reads its own CPU time.
Far less noisy than CPU per request under k6 (about +-5% against +-10-15% on this shared machine), so
it is what the before/after figures in perf/README.md use. Granian's share is not included.

    uv run python perf/app_cost.py get put list export --requests 3000
    uv run python perf/app_cost.py put --profile 30     # cProfile, the 30 most expensive functions
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import random
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "perf"))

from run_perf import DEFAULT_REDIS, RESULTS, prepare  # noqa: E402

OPERATIONS = ("get", "put", "list", "export", "health")


class AsgiDriver:
    """Sends requests straight to an ASGI app; ``await driver.request(...)`` returns the status."""

    def __init__(self, app: Callable[..., Awaitable[None]], token: str | None) -> None:
        self.app = app
        self.base_headers = [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"app-cost")]
        if token:
            self.base_headers.append((b"authorization", f"Bearer {token}".encode()))

    async def request(self, method: str, path: str, *, query: str = "", body: bytes = b"") -> int:
        status = 0
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if delivered:  # a second receive() means the client went away
                return {"type": "http.disconnect"}
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])

        headers = list(self.base_headers)
        if body:
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
            "state": {},
        }
        await self.app(scope, receive, send)
        return status


def build_app(url: str, **overrides: Any) -> Any:
    """The production app on ``url`` (export worker off), with settings overridden as given."""
    from config.settings import Settings
    from service.app import create_app

    settings = Settings.from_env(
        {},
        database_url=url,
        export_worker=False,
        exports_dir=str(RESULTS / "exports"),
        **overrides,
    )
    return create_app(settings)


async def measure(
    driver: AsgiDriver, operation: str, requests: int, ctx: tuple, bodies: list[bytes], profile: int
) -> float:
    """CPU µs per request of ``operation`` (optionally printing a cProfile of the timed part)."""
    range_from, range_to = ctx[3], ctx[4]
    tag = f"{os.getpid()}-{time.monotonic_ns()}"

    async def one(i: int) -> int:
        if operation == "get":
            return await driver.request("GET", f"/v1/job-results/perf-seed-{random.randrange(1000)}")
        if operation == "put":
            return await driver.request("PUT", f"/v1/job-results/cost-{tag}-{i}", body=random.choice(bodies))
        if operation == "list":
            query = f"created_from={range_from}&created_to={range_to}&limit=50"
            return await driver.request("GET", "/v1/job-results", query=query)
        if operation == "export":
            path = f"/v1/job-results/perf-seed-{random.randrange(1000)}/exports"
            return await driver.request("POST", path, body=b'{"format":"json"}')
        return await driver.request("GET", "/healthz")

    for i in range(300):
        status = await one(-i - 1)
        if status not in (200, 201):
            raise SystemExit(f"{operation} answered {status}")
    profiler = cProfile.Profile() if profile else None
    started = time.process_time()
    if profiler:
        profiler.enable()
    for i in range(requests):
        await one(i)
    if profiler:
        profiler.disable()
    cpu = time.process_time() - started
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(profile)
        if os.environ.get("APP_COST_DUMP"):
            profiler.dump_stats(os.environ["APP_COST_DUMP"])
        print(out.getvalue(), file=sys.stderr)
    return cpu / requests * 1e6


async def run(args: argparse.Namespace, ctx: tuple, bodies: list[bytes]) -> None:
    app = build_app(ctx[0], redis_url=args.redis, log_level=args.log_level)
    driver = AsgiDriver(app, ctx[1]["perf-load"])
    async with app.lifespan():
        for operation in args.operations:
            for _ in range(args.rounds):
                us = await measure(driver, operation, args.requests, ctx, bodies, args.profile)
                print(f"{operation:>6}: {us:7.0f} µs CPU per request ({args.requests} requests)", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("operations", nargs="*", default=["get", "put", "list", "export"], choices=OPERATIONS)
    parser.add_argument(
        "--server", default=os.environ.get("JOBRESULTS_PERF_SERVER", "mysql://root:@127.0.0.1:3306/test")
    )
    parser.add_argument("--redis", default=os.environ.get("JOBRESULTS_PERF_REDIS", DEFAULT_REDIS))
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--profile", type=int, default=0, help="print the N most expensive functions (cProfile)")
    args = parser.parse_args()
    ctx = prepare(args.server, 1000)
    bodies = [Path(file).read_bytes() for file in json.loads(Path(ctx[2]).read_text())]
    # The request log lines go to a file, as in production (stdout is a file or a pipe there).
    log = RESULTS / "app-cost.log"
    RESULTS.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        os.dup2(out.fileno(), 1)
        asyncio.run(run(args, ctx, bodies))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
