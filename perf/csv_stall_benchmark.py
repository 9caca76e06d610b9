"""Event-loop stalls of a CSV range export with huge cells (issue 12 item 5): documents holding one
15 MB string, exported through the service's pipeline (``ExportService.run_now``) while a task that
sleeps 1 ms records how late it wakes up (the longest time something held the event loop).

Each run is a fresh process on the database ``jr_bench_csv_stall``, which this script drops and
creates. A benchmark, not a test: record the figures in perf/README.md.

    uv run python perf/csv_stall_benchmark.py --server mysql://root:@127.0.0.1:3306/test [--rows 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pymysql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config.settings import DatabaseURL, Settings  # noqa: E402

DATABASE = "jr_bench_csv_stall"
START = datetime(2001, 1, 1)


def document(i: int, size: int) -> str:
    """A result with one ``size``-character string that needs quoting (commas, quotes, line breaks)."""
    text = (("lorem ipsum, dolor " * 52)[:996] + '"\r\n,' * 1) * (size // 1000 + 1)
    text = text[:size]  # a quote, a line break and a comma every 1,000 characters: JSON 0.3 % longer
    return json.dumps({"log": text, "n": i, "tool": {"name": "x"}}, separators=(",", ":"))


def seed(server: str, rows: int, size: int) -> str:
    from repositories.migrations import apply_migrations

    parts = DatabaseURL.parse(server)
    url = f"mysql://{parts.user}:{parts.password}@{parts.host}:{parts.port}/{DATABASE}"
    conn = pymysql.connect(host=parts.host, port=parts.port, user=parts.user, password=parts.password, autocommit=True)
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {DATABASE}")
        cur.execute(f"CREATE DATABASE {DATABASE}")
    conn.close()
    apply_migrations(Settings.from_env({}, database_url=url))
    conn = pymysql.connect(
        host=parts.host, port=parts.port, user=parts.user, password=parts.password, database=DATABASE, autocommit=True
    )
    with conn.cursor() as cur:
        for i in range(rows):
            at = START + timedelta(microseconds=i)
            cur.execute(
                "INSERT INTO job_results (job_id, status, result_data, version, created_at, updated_at) "
                "VALUES (%s, 'succeeded', %s, 1, %s, %s)",
                (f"stall-{i}", document(i, size), at, at),
            )
    conn.close()
    return url


def child(url: str, rows: int, exports_dir: str) -> None:
    from exports.pipeline import ExportService
    from repositories.database import Database
    from repositories.exports import ExportParameters

    settings = Settings.from_env({}, database_url=url, exports_dir=exports_dir, log_level="error", query_timeout_s=600)

    async def main() -> dict[str, float]:
        loop = asyncio.get_running_loop()
        stalls: list[float] = []

        async def ticker() -> None:
            while True:
                before = loop.time()
                await asyncio.sleep(0.001)
                stalls.append(loop.time() - before - 0.001)

        db = await Database.open(settings)
        task = asyncio.create_task(ticker())
        try:
            service = ExportService(db, settings)
            params = ExportParameters(created_from=START, created_to=START + timedelta(microseconds=rows))
            started = time.perf_counter()
            export = await service.run_now(params, "csv", "none", "benchmark")
            seconds = time.perf_counter() - started
            assert export.rows_written == rows, export
            await service.store.remove(export.object_key or str(export.file_name))
        finally:
            task.cancel()
            await db.close()
        stalls.sort()
        return {
            "seconds": seconds,
            "bytes": float(export.bytes or 0),
            "stall_max_ms": stalls[-1] * 1000,
            "stall_p99_ms": stalls[int(len(stalls) * 0.99)] * 1000,
            "stalls_over_50ms": float(sum(1 for s in stalls if s > 0.05)),
        }

    figures = asyncio.run(main())
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", default="mysql://root:@127.0.0.1:3306/test")
    parser.add_argument("--rows", type=int, default=5)
    parser.add_argument("--size", type=int, default=15_000_000, help="characters of the long string")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-seed", action="store_true", help="reuse the rows of an earlier run")
    parser.add_argument("--child", nargs=3, metavar=("URL", "ROWS", "DIR"))
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return
    parts = DatabaseURL.parse(args.server)
    url = f"mysql://{parts.user}:{parts.password}@{parts.host}:{parts.port}/{DATABASE}"
    if not args.no_seed:
        url = seed(args.server, args.rows, args.size)
    exports_dir = ROOT / "perf" / "results" / "exports"
    exports_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(args.rounds):
        done = subprocess.run(
            [sys.executable, __file__, "--child", url, str(args.rows), str(exports_dir)],
            capture_output=True,
            text=True,
            check=True,
        )
        print(done.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
