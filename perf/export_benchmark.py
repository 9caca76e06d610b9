"""Range-export benchmark: 100,000 and 1,000,000 synthetic ~1 KB job results to ndjson and csv.

Compares the service's export pipeline (the same code ``POST /v1/exports`` and ``jobresults export``
run) with the ``mariadb``/``mysql`` command-line client dumping the same rows with ``--batch``.
Reports rows/s, MB/s and peak RSS of each run (each in a fresh process), for the ``local`` export
store and the ``s3`` one (a SeaweedFS ``weed mini`` started on loopback for the run). A benchmark,
not a test: run it by hand on a quiet machine and record the figures in perf/README.md.

    uv run python perf/export_benchmark.py --server mysql://root:@127.0.0.1:3306/test \
        [--sizes 100000 1000000] [--stores local s3] [--formats ndjson csv]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import pymysql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config.settings import DatabaseURL, Settings  # noqa: E402
from repositories.migrations import apply_migrations  # noqa: E402

BENCH_DB = "jr_bench"
START = datetime(2001, 1, 1)


def document(i: int) -> str:
    """A ~1 KB job result shaped like a test-runner report."""
    doc = {
        "tool": {"name": "pytest", "version": "8.3.4"},
        "summary": {"passed": 120 + i % 7, "failed": i % 3, "skipped": 4, "duration_ms": 53_210 + i % 1000},
        "metrics": {"cpu": 0.731 + (i % 100) / 1000, "rss_bytes": 181_403_648 + i, "p95_ms": 12.5},
        "tags": ["ci", "nightly", f"shard-{i % 8}"],
        "git": {"sha": f"{i:040x}", "branch": "main", "message": "Fix flaky test in exports pipeline"},
        "failures": [
            {"test": f"tests/api/test_x.py::test_{i % 50}", "message": "AssertionError: expected 200, got 503"}
        ],
        "env": {"python": "3.11.7", "os": "linux", "runner": f"runner-{i % 16}"},
        "notes": "x" * 300,
    }
    return json.dumps(doc, separators=(",", ":"))


def connect(server: DatabaseURL, database: str | None = None) -> pymysql.connections.Connection:
    return pymysql.connect(
        host=server.host,
        port=server.port,
        user=server.user,
        password=server.password,
        database=database,
        charset="utf8mb4",
        autocommit=True,
    )


def seed(server: DatabaseURL, url: str, target: int) -> None:
    with connect(server, BENCH_DB) as conn, conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM job_results")
        have = cur.fetchone()[0]
        batch = 2000
        started = time.perf_counter()
        for first in range(have, target, batch):
            rows = []
            for i in range(first, min(first + batch, target)):
                at = START + timedelta(microseconds=i)
                rows.append((f"bench-{i:08d}", "succeeded" if i % 5 else "failed", document(i), at, at))
            cur.executemany(
                "INSERT INTO job_results (job_id, status, result_data, version, created_at, updated_at) "
                "VALUES (%s, %s, %s, 1, %s, %s)",
                rows,
            )
        print(f"seeded {max(0, target - have)} rows in {time.perf_counter() - started:.1f} s", file=sys.stderr)


def run_export(url: str, fmt: str, rows: int, exports_dir: Path, s3_endpoint: str = "") -> dict[str, float]:
    """Run one range export in a fresh process (to ``s3_endpoint`` when given); returns its figures."""
    command = [sys.executable, __file__, "--one", fmt, "--url", url, "--rows", str(rows), "--dir", str(exports_dir)]
    if s3_endpoint:
        command += ["--s3-endpoint", s3_endpoint]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def one(url: str, fmt: str, rows: int, exports_dir: Path, s3_endpoint: str) -> None:
    from exports.pipeline import ExportService
    from repositories.database import Database
    from repositories.exports import ExportParameters
    from tests.seaweedfs import BUCKET

    store: dict[str, object] = {}
    if s3_endpoint:
        store = {"exports_store": "s3", "s3_bucket": BUCKET, "s3_endpoint": s3_endpoint, "s3_region": "us-east-1"}
    settings = Settings.from_env(
        {}, database_url=url, exports_dir=str(exports_dir), log_level="error", query_timeout_s=3600, **store
    )

    async def watch_loop(lags: list[float]) -> None:
        """How late a 5 ms sleep wakes up: how long export work held the event loop."""
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.005)
            lags.append(loop.time() - before - 0.005)

    async def main() -> dict[str, float]:
        db = await Database.open(settings)
        lags: list[float] = []
        watcher = asyncio.create_task(watch_loop(lags))
        try:
            service = ExportService(db, settings)
            params = ExportParameters(created_from=START, created_to=START + timedelta(microseconds=rows))
            started = time.perf_counter()
            export = await service.run_now(params, fmt, "none", "benchmark")
            seconds = time.perf_counter() - started
            assert export.rows_written == rows, export
            await service.store.remove(export.object_key or str(export.file_name))
        finally:
            watcher.cancel()
            await db.close()
        lags.sort()
        return {
            "seconds": seconds,
            "bytes": float(export.bytes or 0),
            "loop_lag_p99_ms": lags[int(len(lags) * 0.99)] * 1000,
            "loop_lag_max_ms": lags[-1] * 1000,
        }

    figures = asyncio.run(main())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    figures["cpu_s"] = (
        usage.ru_utime + usage.ru_stime
    )  # this process's CPU: less noisy than wall time on a shared machine
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(figures))


def client_dump(server: DatabaseURL, rows: int, out: Path) -> dict[str, float]:
    client = shutil.which("mariadb") or shutil.which("mysql")
    assert client, "needs the mariadb or mysql command-line client"
    end = START + timedelta(microseconds=rows)
    sql = (
        "SELECT job_id, status, created_at, result_data FROM job_results FORCE INDEX (idx_created) "
        f"WHERE created_at >= '{START:%Y-%m-%d %H:%M:%S.%f}' AND created_at < '{end:%Y-%m-%d %H:%M:%S.%f}' "
        "ORDER BY created_at, id"
    )
    command = [
        client,
        "--batch",
        "--quick",
        "-h",
        server.host,
        "-P",
        str(server.port),
        "-u",
        server.user,
        BENCH_DB,
        "-e",
        sql,
    ]
    if server.password:
        command.insert(1, f"-p{server.password}")
    started = time.perf_counter()
    with out.open("wb") as handle:
        subprocess.run(command, stdout=handle, check=True)
    seconds = time.perf_counter() - started
    size = out.stat().st_size
    out.unlink()
    return {
        "seconds": seconds,
        "bytes": float(size),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


@contextmanager
def seaweedfs(directory: Path) -> Iterator[str]:
    """A SeaweedFS S3 server on loopback for the run; yields its endpoint (credentials set in os.environ)."""
    from tests.seaweedfs import ACCESS_KEY, SECRET_KEY, SeaweedFS

    os.environ["AWS_ACCESS_KEY_ID"] = ACCESS_KEY
    os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET_KEY
    work = directory / "seaweedfs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    server = SeaweedFS(work)
    server.start()
    try:
        yield server.endpoint
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--server", default=os.environ.get("JOBRESULTS_BENCH_SERVER", "mysql://root:@127.0.0.1:3306/test")
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--stores", nargs="+", choices=["local", "s3"], default=["local", "s3"])
    parser.add_argument("--formats", nargs="+", choices=["ndjson", "csv", "json"], default=["ndjson", "csv"])
    parser.add_argument("--s3-endpoint", default="")
    parser.add_argument("--one")
    parser.add_argument("--url")
    parser.add_argument("--rows", type=int)
    parser.add_argument("--dir")
    args = parser.parse_args()
    if args.one:
        one(args.url, args.one, args.rows, Path(args.dir), args.s3_endpoint)
        return
    server = DatabaseURL.parse(args.server)
    url = f"mysql://{server.user}:{server.password}@{server.host}:{server.port}/{BENCH_DB}"
    with connect(server) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE IF NOT EXISTS {BENCH_DB}")
        cur.execute("SELECT VERSION()")
        version = cur.fetchone()[0]
    apply_migrations(Settings.from_env({}, database_url=url))
    exports_dir = ROOT / "perf" / "results" / "exports"
    exports_dir.mkdir(parents=True, exist_ok=True)
    results = []
    with ExitStack() as stack:
        s3_endpoint = stack.enter_context(seaweedfs(exports_dir.parent)) if "s3" in args.stores else ""
        for rows in sorted(args.sizes):
            seed(server, url, rows)
            client_dump(server, rows, exports_dir / "client.tsv")  # warm-up: every run then reads a warm buffer pool
            client = client_dump(server, rows, exports_dir / "client.tsv")
            results.append({"rows": rows, "what": "mariadb --batch", **client})
            for fmt in args.formats:
                for store in args.stores:
                    endpoint = s3_endpoint if store == "s3" else ""
                    figures = run_export(url, fmt, rows, exports_dir, endpoint)
                    results.append({"rows": rows, "what": f"{store} {fmt}", **figures})
    print(f"server {version}, {os.cpu_count()} cores")
    header = f"{'rows':>9}  {'what':<16} {'seconds':>8} {'rows/s':>9} {'MB/s':>7} {'peak RSS MB':>12}"
    print(f"{header} {'loop lag p99/max ms':>20}")
    for r in results:
        lag = f"{r['loop_lag_p99_ms']:.1f} / {r['loop_lag_max_ms']:.1f}" if "loop_lag_p99_ms" in r else "-"
        print(
            f"{r['rows']:>9}  {r['what']:<16} {r['seconds']:>8.2f} {r['rows'] / r['seconds']:>9.0f} "
            f"{r['bytes'] / r['seconds'] / 1e6:>7.1f} {r['peak_rss_mb']:>12.1f} {lag:>20}"
        )
    out = ROOT / "perf" / "results" / f"export-benchmark-{datetime.now():%Y%m%dT%H%M%S}.json"
    out.write_text(json.dumps({"server": version, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
