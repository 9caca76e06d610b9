"""Filtered listings on a large table: 1,000,000 job results with 5,000,000 labels (issue 15).

1. DROPS the database ``--database`` (``JOBRESULTS_PERF_DATABASE``, default ``jr_perf_filter``) on
   ``--server`` (``JOBRESULTS_PERF_SERVER``) with everything in it, creates and migrates it (``--reuse``
   keeps a database seeded by an earlier run with the same ``--results``);
2. seeds it in the server with ``INSERT ... SELECT`` over generated numbers (no rows travel through
   Python): ``--results`` results, one every 30 s (1M span about 50 weeks, 20,000 a week), status
   70% succeeded / 20% failed / 10% cancelled, and five labels each: ``tool`` (7 values), ``branch``
   (``main`` for a quarter, else 15 others), ``team`` (13), ``env`` (3), ``shard`` (16);
3. starts ``jobresults serve`` (2 workers, auth and rate limits on, counters in ``--redis``,
   ``JOBRESULTS_PERF_REDIS``) and times, interleaved request by request, the first page (100 items) of:
   ``filtered`` (``label=tool:pytest&label=branch:main&status=failed`` over a random week),
   ``unfiltered`` (the same week, no filter), and the filtered query alone on a pymysql connection
   (``raw``, the SQL of ``repositories.job_results.page_query``);
4. prints p50/p90/p99 in ms per kind and writes them to ``perf/results/filter-<time>.json``.

    uv run python perf/filter_benchmark.py [--results 1000000] [--requests 300] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pymysql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "perf"))

from run_perf import DEFAULT_REDIS, DEFAULT_SERVER, RESULTS, Service, database_name  # noqa: E402

from config.settings import DatabaseURL, Settings  # noqa: E402
from repositories.domain import SCOPES  # noqa: E402
from repositories.job_results import LabelTerm, ResultFilter, page_query  # noqa: E402
from repositories.migrations import apply_migrations  # noqa: E402
from service.operator import create_key  # noqa: E402

START = datetime(2025, 1, 6)
STEP_S = 30
TOOLS = ("pytest", "jest", "go", "cargo", "junit", "rspec", "phpunit")
BRANCHES = ("main", "dev", "release", "feat-a", "feat-b", "feat-c", "feat-d", "feat-e", "fix-a", "fix-b")
FILTER = ResultFilter(statuses=("failed",), labels=(LabelTerm("tool", ("pytest",)), LabelTerm("branch", ("main",))))


def _connect(server: DatabaseURL, database: str | None = None) -> pymysql.connections.Connection:
    return pymysql.connect(
        host=server.host,
        port=server.port,
        user=server.user,
        password=server.password,
        database=database,
        charset="utf8mb4",
        autocommit=True,
    )


def _choice(column: str, values: tuple[str, ...]) -> str:
    """SQL picking ``values[column % len(values)]`` (ELT is 1-based)."""
    quoted = ", ".join(f"'{v}'" for v in values)
    return f"ELT(1 + {column} % {len(values)}, {quoted})"


def seed(server: DatabaseURL, database: str, results: int) -> None:
    """Numbers 0..results-1 from a cross join of digit tables, then one INSERT ... SELECT per table."""
    digits = len(str(results - 1))
    with _connect(server, database) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE bench_digits (d INT NOT NULL PRIMARY KEY)")
        cur.execute("INSERT INTO bench_digits VALUES " + ", ".join(f"({d})" for d in range(10)))
        joins = ", ".join(f"bench_digits d{i}" for i in range(digits))
        number = " + ".join(f"d{i}.d * {10**i}" for i in range(digits))
        cur.execute("CREATE TABLE bench_numbers (n INT NOT NULL PRIMARY KEY)")
        cur.execute(
            f"INSERT INTO bench_numbers SELECT n FROM (SELECT {number} AS n FROM {joins}) t WHERE n < {results}"
        )
        started = time.perf_counter()
        status = "CASE WHEN n % 10 < 7 THEN 'succeeded' WHEN n % 10 < 9 THEN 'failed' ELSE 'cancelled' END"
        cur.execute(
            "INSERT INTO job_results (id, job_id, status, result_data, version, created_at, updated_at) "
            f"SELECT n + 1, CONCAT('bench-', LPAD(n, 8, '0')), {status}, "
            "CONCAT('{\"n\":', n, ',\"summary\":{\"passed\":', n % 200, ',\"failed\":', n % 3, '}}'), 1, "
            f"TIMESTAMPADD(SECOND, n * {STEP_S}, '{START}'), TIMESTAMPADD(SECOND, n * {STEP_S}, '{START}') "
            "FROM bench_numbers ORDER BY n"
        )
        print(f"seed: {results} results in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        branch = f"IF((n DIV 3) % 4 = 0, 'main', {_choice('(n DIV 7)', BRANCHES[1:])})"
        labels = {
            "tool": _choice("n", TOOLS),
            "branch": branch,
            "team": "CONCAT('team-', n % 13)",
            "env": _choice("(n DIV 11)", ("ci", "nightly", "release")),
            "shard": "CONCAT('', n % 16)",
        }
        for key, value in labels.items():
            started = time.perf_counter()
            cur.execute(
                "INSERT INTO job_result_labels (result_id, label_key, label_value, created_at) "
                f"SELECT n + 1, '{key}', {value}, TIMESTAMPADD(SECOND, n * {STEP_S}, '{START}') "
                "FROM bench_numbers ORDER BY n"
            )
            print(f"seed: label {key} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        cur.execute("DROP TABLE bench_numbers, bench_digits")
        cur.execute("ANALYZE TABLE job_results, job_result_labels")


def prepare(server_url: str, database: str, results: int, reuse: bool) -> str:
    """The database URL, seeded (dropped and re-created unless ``reuse`` finds it seeded)."""
    server = DatabaseURL.parse(server_url)
    url = f"mysql://{server.user}:{server.password}@{server.host}:{server.port}/{database}"
    if reuse:
        try:
            with _connect(server, database) as conn, conn.cursor() as cur:
                cur.execute("SELECT COUNT(*) FROM job_results")
                if cur.fetchone()[0] == results:
                    print(f"perf: reusing {database}", file=sys.stderr)
                    return url
        except pymysql.err.OperationalError:
            pass
    print(f"perf: dropping and re-creating database {database} on {server.host}:{server.port}", file=sys.stderr)
    with _connect(server) as conn, conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{database}`")
        cur.execute(f"CREATE DATABASE `{database}` CHARACTER SET utf8mb4")
    apply_migrations(Settings.from_env({}, database_url=url))
    seed(server, database, results)
    return url


def _week(rng: random.Random, results: int) -> tuple[datetime, datetime]:
    weeks = max(1, results * STEP_S // (7 * 86400))
    start = START + timedelta(days=7 * rng.randrange(weeks))
    return start, start + timedelta(days=7)


def _stamp(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "p50": round(statistics.median(ordered), 2),
        "p90": round(ordered[int(len(ordered) * 0.9) - 1], 2),
        "p99": round(ordered[max(0, int(len(ordered) * 0.99) - 1)], 2),
    }


def measure(url: str, base: str, token: str, requests: int, results: int) -> dict[str, dict[str, float]]:
    """Interleaved timings (ms) of the three kinds, one request of each per round."""
    rng = random.Random(20261201)
    server = DatabaseURL.parse(url)
    times: dict[str, list[float]] = {"filtered": [], "unfiltered": [], "raw": []}
    items: list[int] = []
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base, headers=headers, timeout=30) as client, _connect(server, server.database) as conn:
        for round_ in range(requests + 10):
            lower, upper = _week(rng, results)
            week = [("created_from", _stamp(lower)), ("created_to", _stamp(upper)), ("limit", "100")]
            filtered = [*week, ("label", "tool:pytest"), ("label", "branch:main"), ("status", "failed")]
            sql, params = page_query(lower, upper, FILTER, None, 101, include_result=False)
            kinds = [("filtered", filtered), ("unfiltered", week), ("raw", None)]
            rng.shuffle(kinds)
            for kind, query in kinds:
                started = time.perf_counter()
                if query is None:
                    with conn.cursor() as cur:
                        cur.execute(sql, params)
                        cur.fetchall()
                else:
                    response = client.get("/v1/job-results", params=query)
                    response.raise_for_status()
                    if kind == "filtered":
                        items.append(len(response.json()["items"]))
                elapsed = (time.perf_counter() - started) * 1000
                if round_ >= 10:  # warm-up rounds are not counted
                    times[kind].append(elapsed)
    out = {kind: _summary(samples) for kind, samples in times.items()}
    out["filtered"]["items_median"] = statistics.median(items)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default=os.environ.get("JOBRESULTS_PERF_SERVER", DEFAULT_SERVER))
    parser.add_argument(
        "--database", type=database_name, default=os.environ.get("JOBRESULTS_PERF_DATABASE", "jr_perf_filter")
    )
    parser.add_argument("--redis", default=os.environ.get("JOBRESULTS_PERF_REDIS", DEFAULT_REDIS))
    parser.add_argument("--results", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--reuse", action="store_true", help="keep a database an earlier run seeded")
    args = parser.parse_args()
    url = prepare(args.server, args.database, args.results, args.reuse)
    import asyncio

    token, _key = asyncio.run(
        create_key(Settings.from_env({}, database_url=url), "perf-filter", SCOPES, "100000/second")
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    service = Service(url, args.redis, "2", JOBRESULTS_LOG_LEVEL="warning")
    try:
        figures = measure(url, service.base, token, args.requests, args.results)
    finally:
        service.stop()
    report = {"results": args.results, "labels": args.results * 5, "server": DatabaseURL.parse(url).host, **figures}
    print(json.dumps(report, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"filter-{datetime.now():%Y%m%d-%H%M%S}.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
