"""`just perf`: the k6 scenario end to end against a production-like local service.

1. DROPS the database ``--database`` (``JOBRESULTS_PERF_DATABASE``, default ``jr_perf``) on ``--server``
   (``JOBRESULTS_PERF_SERVER``) with everything in it, creates it afresh and migrates it;
2. makes two API keys: the load's key, with a rate limit above the test rate, and a key held to the
   10/s per-IP default (the limiter scenario shows it getting 429s);
3. seeds ``--seed`` stored results from ../shared/realdata and writes the PUT payloads for k6;
4. starts Granian with production settings: 2 workers, JSON logging, auth and rate limiting on
   (counters in Redis);
5. runs k6 (perf/k6/mix.js) and writes its summary to perf/results/k6-summary-<time>.json. k6's own
   REST API listens on a free loopback port, so runs on one machine do not collide on 6565.

Rate-limit counters go to ``--redis`` (``JOBRESULTS_PERF_REDIS``), by default Redis db 15 on
127.0.0.1, away from db 0 that a local service or the test suite uses.

Exits with k6's status: non-zero when a threshold is crossed. Targets only loopback.

    uv run python perf/run_perf.py --server mysql://root:@127.0.0.1:3306/test --rate 200 --duration 30s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pymysql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config.settings import DatabaseURL, Settings  # noqa: E402
from repositories.domain import SCOPES  # noqa: E402
from repositories.migrations import apply_migrations  # noqa: E402
from service.operator import create_key  # noqa: E402

BIN = Path(sys.executable).parent
MAX_PAYLOAD = 100_000
RESULTS = ROOT / "perf" / "results"
DEFAULT_SERVER = "mysql://root:@127.0.0.1:3306/test"
DEFAULT_DATABASE = "jr_perf"
DEFAULT_REDIS = "redis://127.0.0.1:6379/15"
K6_API_ADDRESS = "127.0.0.1:0"
"""k6's REST API on any free loopback port (its default, localhost:6565, collides between runs)."""
_DATABASE_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")


def database_name(value: str) -> str:
    """``value`` if it is a plain MySQL database name (``A-Z a-z 0-9 _``, 1-64 characters).

    Raises:
        argparse.ArgumentTypeError: anything else (it is interpolated into ``DROP DATABASE``).
    """
    if not _DATABASE_NAME.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a database name of 1-64 characters A-Z a-z 0-9 _")
    return value


def realdata() -> Path:
    configured = os.environ.get("JOBRESULTS_REALDATA")
    for candidate in (configured, ROOT.parent / "shared" / "realdata", Path("/work/shared/realdata")):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    raise SystemExit("real data not found: set JOBRESULTS_REALDATA to ../shared/realdata")


def payloads() -> list[str]:
    """Real documents of at most 100 KB, minified (k6 sends them as the PUT's result)."""
    docs = []
    for path in sorted(realdata().glob("*/*.json")):
        if path.stat().st_size > MAX_PAYLOAD:
            continue
        try:
            docs.append(json.dumps(json.loads(path.read_bytes()), separators=(",", ":")))
        except json.JSONDecodeError:
            continue  # the govulncheck stream is not one document
    return docs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prepare(server_url: str, seed: int, database: str = DEFAULT_DATABASE) -> tuple[str, dict[str, str], Path, str, str]:
    """Database, keys, seeded rows and payload file; returns (database URL, tokens, payloads, range).

    ``database`` on ``server_url`` is dropped with everything in it and created afresh.
    """
    database = database_name(database)
    server = DatabaseURL.parse(server_url)
    url = f"mysql://{server.user}:{server.password}@{server.host}:{server.port}/{database}"
    print(f"perf: dropping and re-creating database {database} on {server.host}:{server.port}", file=sys.stderr)
    conn = pymysql.connect(
        host=server.host,
        port=server.port,
        user=server.user,
        password=server.password,
        autocommit=True,
        charset="utf8mb4",
    )
    with conn.cursor() as cur:
        # A fresh database each run: the rows PUT by earlier runs would otherwise pile up (GBs after a
        # day of runs, far beyond the default 128 MB buffer pool) and change what is measured.
        cur.execute(f"DROP DATABASE IF EXISTS `{database}`")
        cur.execute(f"CREATE DATABASE `{database}` CHARACTER SET utf8mb4")
    shutil.rmtree(RESULTS / "exports", ignore_errors=True)
    apply_migrations(Settings.from_env({}, database_url=url))
    conn.select_db(database)
    tokens = {}
    settings = Settings.from_env({}, database_url=url)
    for name, limit in (("perf-load", "100000/second"), ("perf-limited", None)):
        tokens[name], _key = asyncio.run(create_key(settings, name, SCOPES, limit))
    docs = payloads()
    seed_from = datetime.now(UTC)
    with conn.cursor() as cur:
        rows = []
        for i in range(seed):
            at = datetime.now(UTC).replace(tzinfo=None)
            rows.append((f"perf-seed-{i}", "succeeded", docs[i % len(docs)], at, at))
        cur.executemany(
            "INSERT INTO job_results (job_id, status, result_data, version, created_at, updated_at) "
            "VALUES (%s, %s, %s, 1, %s, %s)",
            rows,
        )
        # Labels for the filtered listings of the mix (FILTERED): tool (7 values) and shard (4) per row.
        cur.execute(
            "INSERT INTO job_result_labels (result_id, label_key, label_value, created_at) "
            "SELECT id, 'tool', CONCAT('tool-', id % 7), created_at FROM job_results UNION ALL "
            "SELECT id, 'shard', CONCAT('', id % 4), created_at FROM job_results"
        )
    conn.close()
    RESULTS.mkdir(parents=True, exist_ok=True)
    # One file per PUT body, envelope included: k6 loads them as bytes (ArrayBuffer) once per VU, so
    # the load generator spends no CPU building or copying 100 KB strings per request.
    bodies = RESULTS / "bodies"
    shutil.rmtree(bodies, ignore_errors=True)
    bodies.mkdir(parents=True)
    files = []
    for i, doc in enumerate(docs):
        body = bodies / f"{i:02d}.json"
        body.write_text(f'{{"status":"succeeded","result":{doc}}}')
        files.append(str(body))
    payload_file = RESULTS / "payloads.json"
    payload_file.write_text(json.dumps(files))
    range_from = (seed_from - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    range_to = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return url, tokens, payload_file, range_from, range_to


class Service:
    """A running ``jobresults serve`` (its own process group); stop it with :meth:`stop`."""

    def __init__(self, url: str, redis: str, workers: str, **overrides: str) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("JOBRESULTS_")}
        env.update(
            JOBRESULTS_DATABASE_URL=url,
            JOBRESULTS_PORT=str(self.port),
            JOBRESULTS_WORKERS=workers,
            JOBRESULTS_REDIS_URL=redis,
            JOBRESULTS_EXPORTS_DIR=str(RESULTS / "exports"),
            JOBRESULTS_POOL_MAX_SIZE="6",
            JOBRESULTS_LOG_LEVEL="info",
        )
        env.update(overrides)
        self.log = RESULTS / "perf-server.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "jobresults"), "serve"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the service exited: see {self.log}")
            try:
                if httpx.get(f"{self.base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the service did not get ready: see {self.log}")
            time.sleep(0.2)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


def run_k6(
    base: str,
    tokens: dict[str, str],
    payload_file: Path,
    range_from: str,
    range_to: str,
    *,
    rate: str,
    duration: str,
    seed: int,
    summary: Path,
    quiet: bool = False,
    **extra: str,
) -> int:
    """Run perf/k6/mix.js; returns k6's exit code (99 when a threshold is crossed)."""
    k6_env = dict(
        os.environ,
        BASE_URL=base,
        API_KEY=tokens["perf-load"],
        LIMITED_KEY=tokens["perf-limited"],
        RATE=str(rate),
        DURATION=duration,
        PAYLOADS=str(payload_file),
        SEEDED=str(seed),
        RANGE_FROM=range_from,
        RANGE_TO=range_to,
        K6_NO_USAGE_REPORT="true",
        **extra,
    )
    command = k6_command(summary, ROOT / "perf" / "k6" / "mix.js")
    output = subprocess.DEVNULL if quiet else None
    return subprocess.run(command, env=k6_env, check=False, stdout=output, stderr=output).returncode


def k6_command(summary: Path, script: Path) -> list[str]:
    """``k6 run`` of ``script``, its summary written to ``summary``, its REST API on a free port."""
    return [
        str(BIN / "k6"),
        "run",
        "--quiet",
        "--address",
        K6_API_ADDRESS,
        "--summary-export",
        str(summary),
        str(script),
    ]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", default=os.environ.get("JOBRESULTS_PERF_SERVER", DEFAULT_SERVER))
    parser.add_argument(
        "--database",
        type=database_name,
        default=os.environ.get("JOBRESULTS_PERF_DATABASE", DEFAULT_DATABASE),
        help="database on --server that is DROPPED and re-created (default jr_perf)",
    )
    parser.add_argument("--redis", default=os.environ.get("JOBRESULTS_PERF_REDIS", DEFAULT_REDIS))
    parser.add_argument("--rate", default=os.environ.get("RATE", "200"))
    parser.add_argument("--duration", default=os.environ.get("DURATION", "30s"))
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--workers", default="2")
    parser.add_argument(
        "--filtered", default="0", help="share of iterations that are filtered listings (two labels, a status)"
    )
    args = parser.parse_args()
    url, tokens, payload_file, range_from, range_to = prepare(args.server, args.seed, args.database)
    service = Service(url, args.redis, args.workers)
    try:
        summary = RESULTS / f"k6-summary-{datetime.now():%Y%m%dT%H%M%S}.json"
        code = run_k6(
            service.base,
            tokens,
            payload_file,
            range_from,
            range_to,
            rate=args.rate,
            duration=args.duration,
            seed=args.seed,
            summary=summary,
            FILTERED=args.filtered,
        )
        print(f"k6 summary: {summary}")
        return code
    finally:
        service.stop()


if __name__ == "__main__":
    raise SystemExit(main())
