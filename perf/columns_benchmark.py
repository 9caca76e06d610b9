"""CSV range export of real, mixed documents: all columns (discovery pass) against chosen ``columns``.

Seeds the JSON documents of ``JOBRESULTS_REALDATA`` (``../shared/realdata``: 31 reports of 20 tools,
8.8 MB, 3,098 result columns together) ``--copies`` times into the database ``jr_bench_columns``
(kept for re-runs), then runs the service's own range export (``ExportService.run_now``, the code of
``POST /v1/exports`` and ``jobresults export``) to csv, each run in a fresh process:

* ``all``: no ``columns``: pass 1 collects the union of the columns, pass 2 writes every row with all
  of them;
* ``chosen-20``: 20 columns spread over the tools (every 155th of the sorted union);
* ``chosen-1000``: 1,000 columns (every 3rd of the union, up to 1,000): the most ``columns`` allows.

The variants run interleaved, ``--rounds`` times, the order rotating each round. Reported per
variant: median seconds, median peak RSS (the process's ``ru_maxrss``), file size, and the ratios to
``all``. A benchmark, not a test: run it by hand and record the figures in perf/README.md.

    uv run python perf/columns_benchmark.py --server mysql://root:@127.0.0.1:3306/test [--copies 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pymysql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config.settings import DatabaseURL, Settings  # noqa: E402
from exports.columns import InvalidColumn, split_path  # noqa: E402
from exports.formats import ExportRow, csv_columns_of  # noqa: E402
from repositories.migrations import apply_migrations  # noqa: E402

BENCH_DB = "jr_bench_columns"
START = datetime(2002, 1, 1)
REALDATA = Path(os.environ.get("JOBRESULTS_REALDATA") or ROOT.parent / "shared" / "realdata")


def documents() -> list[bytes]:
    """The real JSON documents (the concatenated govulncheck stream is not one document)."""
    files = sorted(p for p in REALDATA.glob("*/*.json") if p.name != "govulncheck-json-stream.json")
    assert files, f"no real data at {REALDATA}; set JOBRESULTS_REALDATA"
    return [p.read_bytes() for p in files]


def variants(docs: list[bytes]) -> dict[str, list[str] | None]:
    union = [c for c in csv_columns_of([ExportRow("j", "s", "t", d) for d in docs]) if choosable(c)]
    return {"all": None, "chosen-20": union[::155][:20], "chosen-1000": union[::3][:1000]}


def choosable(column: str) -> bool:
    """Whether ``column`` may be chosen (a discovered column may hold an empty key, which may not)."""
    try:
        split_path(column)
    except InvalidColumn:
        return False
    return True


def seed(server: DatabaseURL, docs: list[bytes], copies: int) -> int:
    rows = len(docs) * copies
    with (
        pymysql.connect(
            host=server.host, port=server.port, user=server.user, password=server.password, database=BENCH_DB
        ) as conn,
        conn.cursor() as cur,
    ):
        cur.execute("SELECT COUNT(*) FROM job_results")
        have = cur.fetchone()[0]
        started = time.perf_counter()
        for i in range(have, rows):
            at = START + timedelta(microseconds=i)
            cur.execute(
                "INSERT INTO job_results (job_id, status, result_data, version, created_at, updated_at) "
                "VALUES (%s, %s, %s, 1, %s, %s)",
                (f"cols-{i:06d}", "failed" if i % 3 else "succeeded", docs[i % len(docs)].decode(), at, at),
            )
            conn.commit()
        print(f"seeded {max(0, rows - have)} rows in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return rows


def one(url: str, rows: int, exports_dir: Path, columns: list[str] | None) -> None:
    """One export in this process; prints its figures as JSON."""
    from exports.pipeline import ExportService
    from repositories.database import Database
    from repositories.exports import ExportParameters

    settings = Settings.from_env({}, database_url=url, exports_dir=str(exports_dir), log_level="error")

    async def main() -> dict[str, float]:
        db = await Database.open(settings)
        try:
            service = ExportService(db, settings)
            params = ExportParameters(
                created_from=START,
                created_to=START + timedelta(microseconds=rows),
                columns=tuple(columns) if columns is not None else None,
            )
            started = time.perf_counter()
            export = await service.run_now(params, "csv", "none", "benchmark")
            seconds = time.perf_counter() - started
            assert export.rows_written == rows, export
            await service.store.remove(export.object_key or str(export.file_name))
        finally:
            await db.close()
        return {"seconds": seconds, "bytes": float(export.bytes or 0)}

    figures = asyncio.run(main())
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--server", default=os.environ.get("JOBRESULTS_BENCH_SERVER", "mysql://root:@127.0.0.1:3306/test")
    )
    parser.add_argument("--copies", type=int, default=20, help="copies of each real document")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", help="internal: run one export with these columns (JSON, or null)")
    parser.add_argument("--url")
    parser.add_argument("--rows", type=int)
    parser.add_argument("--dir")
    args = parser.parse_args()
    if args.one is not None:
        one(args.url, args.rows, Path(args.dir), json.loads(args.one))
        return
    server = DatabaseURL.parse(args.server)
    url = f"mysql://{server.user}:{server.password}@{server.host}:{server.port}/{BENCH_DB}"
    login = {"host": server.host, "port": server.port, "user": server.user, "password": server.password}
    with pymysql.connect(**login) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE IF NOT EXISTS {BENCH_DB}")
        cur.execute("SELECT VERSION()")
        version = cur.fetchone()[0]
    apply_migrations(Settings.from_env({}, database_url=url))
    docs = documents()
    rows = seed(server, docs, args.copies)
    chosen = variants(docs)
    exports_dir = ROOT / "perf" / "results" / "exports"
    exports_dir.mkdir(parents=True, exist_ok=True)
    names = list(chosen)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for round_no in range(args.rounds):
        order = names[round_no % len(names) :] + names[: round_no % len(names)]
        for name in order:
            command = [sys.executable, __file__, "--one", json.dumps(chosen[name]), "--url", url]
            command += ["--rows", str(rows), "--dir", str(exports_dir)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(done.stdout))
            print(f"round {round_no + 1} {name}: {runs[name][-1]}", file=sys.stderr)
    size_mb = sum(len(d) for d in docs) * args.copies / 1e6
    print(f"server {version}, {os.cpu_count()} cores, {rows} rows, {size_mb:.0f} MB of documents")
    base = {key: statistics.median(r[key] for r in runs["all"]) for key in ("seconds", "peak_rss_mb")}
    print(f"{'variant':<12} {'seconds':>8} {'rounds':>22} {'x all':>6} {'peak RSS MB':>12} {'x all':>6} {'file MB':>8}")
    summary = []
    for name in names:
        seconds = statistics.median(r["seconds"] for r in runs[name])
        rss = statistics.median(r["peak_rss_mb"] for r in runs[name])
        size = runs[name][0]["bytes"] / 1e6
        each = " / ".join(f"{r['seconds']:.2f}" for r in runs[name])
        print(
            f"{name:<12} {seconds:>8.2f} {each:>22} {seconds / base['seconds']:>6.2f} {rss:>12.1f} "
            f"{rss / base['peak_rss_mb']:>6.2f} {size:>8.1f}"
        )
        summary.append({"variant": name, "seconds": seconds, "peak_rss_mb": rss, "file_mb": size, "runs": runs[name]})
    out = ROOT / "perf" / "results" / f"columns-benchmark-{datetime.now():%Y%m%dT%H%M%S}.json"
    out.write_text(json.dumps({"server": version, "rows": rows, "variants": summary}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
