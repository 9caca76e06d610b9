"""Side by side, in one run: this service against the seed's Express stack and our bare framework.

Targets, each with 2 workers, all serving the same one-row ``GET /v1/job-results/{job_id}`` from the
same rows:

* ``express``: Express 5 + mysql2 + helmet in a cluster of 2 (``perf/peers/express``), the reference;
* ``bare``: Litestar + Granian + aiomysql + ``msgspec.Raw``, no middleware (``perf/peers/bare``);
* ``service``: ``jobresults serve`` with production settings (auth, rate limit in Redis, JSON logs,
  metrics);
* ``service-lean``: the same with auth, rate limit and request logs off (metrics stay on).

What it does:

1. creates the database ``--database`` (default ``jr_peers``) afresh on ``--server``: it DROPS a
   database of that name first. It seeds ``--rows`` results of about 530 bytes and makes one API key
   with ``jobresults keys create``;
2. starts the four targets on free loopback ports (the service's rate-limit counters go to the Redis
   database ``--redis``, db 14 by default, never the shared db 0);
3. warms each target up with ``--warmup`` seconds of wrk, then runs ``wrk -t2 -c32`` for
   ``--seconds`` against each target in turn, ``--rounds`` times (interleaved: the order
   rotates each round), each request for a random seeded id;
4. with ``--k6``, finds for each target the highest k6 open-model rate (constant arrival rate) whose
   p99 stays under 50 ms with no dropped iterations, stepping through ``--k6-rates``;
5. prints a table with ratios to Express and to the bare stack, and writes
   ``perf/results/peers-<time>.json``; ``--plot`` also draws ``perf/peers.png``.

    uv run python perf/peers/compare.py --server mysql://root:@127.0.0.1:3306/test --k6 --plot

Needs ``node``/``npm`` (the Express peer is installed from its lock file with ``npm ci``) and ``wrk``
(Debian's package). Targets only loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pymysql

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from config.settings import DatabaseURL  # noqa: E402

BIN = Path(sys.executable).parent
PEERS = ROOT / "perf" / "peers"
RESULTS = ROOT / "perf" / "results"
SCOPES = "results:read,results:write,exports:read,exports:write,metrics:read"

WRK_SCRIPT = """
local rows = {rows}
local auth = "{auth}"
math.randomseed(os.time() + tonumber(tostring({{}}):sub(8), 16))
request = function()
  local headers = {{}}
  if auth ~= "" then headers["Authorization"] = "Bearer " .. auth end
  return wrk.format("GET", "/v1/job-results/peer-" .. math.random(0, rows - 1), headers)
end
"""

K6_SCRIPT = """
import http from "k6/http";
const rows = Number(__ENV.ROWS);
const params = __ENV.TOKEN ? { headers: { Authorization: `Bearer ${__ENV.TOKEN}` } } : {};
export const options = {
  discardResponseBodies: true,
  summaryTrendStats: ["p(50)", "p(99)", "max"],
  scenarios: {
    get: {
      executor: "constant-arrival-rate",
      rate: Number(__ENV.RATE),
      timeUnit: "1s",
      duration: __ENV.DURATION,
      preAllocatedVUs: 100,
      maxVUs: 400,
    },
  },
};
export default function () {
  http.get(`${__ENV.BASE_URL}/v1/job-results/peer-${Math.floor(Math.random() * rows)}`, params);
}
"""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 at the time of the call."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def document(i: int) -> str:
    """A test-runner-like result of about 480 bytes of JSON (a row of about 530 bytes)."""
    doc = {
        "runner": "pytest",
        "summary": {"passed": 120 + i % 7, "failed": i % 3, "skipped": 4, "duration_ms": 31_000 + i},
        "commit": f"{i:040x}",
        "branch": "main" if i % 4 else f"feature/peer-{i % 97}",
        "failures": [
            {"test": f"tests/api/test_case_{i % 50}.py::test_{j}", "message": "assert 1 == 2"} for j in range(2)
        ],
        "env": {"python": "3.11.7", "os": "debian-12", "arch": "x86_64"},
    }
    return json.dumps(doc, separators=(",", ":"))


def seed(server_url: str, database: str, rows: int) -> str:
    """Create ``database`` afresh (dropping it), migrate it, insert ``rows`` results; return its URL."""
    server = DatabaseURL.parse(server_url)
    url = f"mysql://{server.user}:{server.password}@{server.host}:{server.port}/{database}"
    conn = pymysql.connect(
        host=server.host,
        port=server.port,
        user=server.user,
        password=server.password,
        autocommit=True,
        charset="utf8mb4",
    )
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{database}`")
        cur.execute(f"CREATE DATABASE `{database}` CHARACTER SET utf8mb4")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBRESULTS_")} | {"JOBRESULTS_DATABASE_URL": url}
    subprocess.run([str(BIN / "jobresults"), "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
    conn.select_db(database)
    at = datetime.now(UTC).replace(tzinfo=None) - timedelta(days=1)
    with conn.cursor() as cur:
        for start in range(0, rows, 2000):
            batch = [
                (f"peer-{i}", "succeeded" if i % 5 else "failed", document(i), at, at)
                for i in range(start, min(start + 2000, rows))
            ]
            cur.executemany(
                "INSERT INTO job_results (job_id, status, result_data, version, created_at, updated_at) "
                "VALUES (%s, %s, %s, 1, %s, %s)",
                batch,
            )
        cur.execute("ANALYZE TABLE job_results")
        cur.fetchall()
    conn.close()
    return url


def make_key(url: str) -> str:
    """An API key with every scope and a limit far above the load, made with the product's own CLI."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBRESULTS_")} | {"JOBRESULTS_DATABASE_URL": url}
    out = subprocess.run(
        [
            str(BIN / "jobresults"),
            "keys",
            "create",
            "--name",
            "peers",
            "--scopes",
            SCOPES,
            "--rate-limit",
            "1000000/second",
        ],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.strip().splitlines()[-1]


class Target:
    """One server under test, started in its own process group."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], cwd: Path, token: str = "") -> None:
        self.name = name
        self.token = token
        self.port = free_port()
        env = env | {"PORT": str(self.port), "JOBRESULTS_PORT": str(self.port)}
        self.log = RESULTS / f"peers-{name}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [part.replace("{port}", str(self.port)) for part in command],
                env=env,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.base = f"http://127.0.0.1:{self.port}"

    def wait(self) -> None:
        """Block until the target serves a seeded row (30 s at most)."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited: see {self.log}")
            try:
                if httpx.get(f"{self.base}/v1/job-results/peer-1", headers=headers, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"{self.name} did not get ready: see {self.log}")

    def stop(self) -> None:
        """SIGTERM the group, SIGKILL after 10 s."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_targets(url: str, token: str, redis: str) -> list[Target]:
    """The four targets, started concurrently and waited for."""
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBRESULTS_", "PEER_"))}
    exports = Path(tempfile.mkdtemp(prefix="jr-peers-"))
    service_env = base_env | {
        "JOBRESULTS_DATABASE_URL": url,
        "JOBRESULTS_WORKERS": "2",
        "JOBRESULTS_REDIS_URL": redis,
        "JOBRESULTS_EXPORTS_DIR": str(exports),
        "JOBRESULTS_POOL_MAX_SIZE": "6",
        "JOBRESULTS_LOG_LEVEL": "info",
        "JOBRESULTS_EXPORT_WORKER": "false",
    }
    lean_env = service_env | {
        "JOBRESULTS_AUTH_ENABLED": "false",
        "JOBRESULTS_RATE_LIMIT_ENABLED": "false",
        "JOBRESULTS_LOG_LEVEL": "warning",
    }
    express = PEERS / "express"
    if not (express / "node_modules").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=express, check=True)
    granian = str(BIN / "granian")
    targets = [
        Target("express", ["node", "server.js"], base_env | {"WORKERS": "2", "DATABASE_URL": url}, express),
        Target(
            "bare",
            [
                granian,
                "--interface",
                "asgi",
                "--factory",
                "--workers",
                "2",
                "--loop",
                "uvloop",
                "--host",
                "127.0.0.1",
                "--no-ws",
                "--log-level",
                "warning",
                "--port",
                "{port}",
                "app:create_app",
            ],
            base_env | {"PEER_DATABASE_URL": url},
            PEERS / "bare",
        ),
        Target("service", [str(BIN / "jobresults"), "serve"], service_env, ROOT, token),
        Target("service-lean", [str(BIN / "jobresults"), "serve"], lean_env, ROOT),
    ]
    try:
        for target in targets:
            target.wait()
    except BaseException:
        for target in targets:
            target.stop()
        raise
    return targets


def run_wrk(target: Target, rows: int, seconds: int, connections: int) -> dict[str, Any]:
    """One wrk run; req/s, latency percentiles (ms) and the count of non-2xx answers."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT.format(rows=rows, auth=target.token))
    try:
        out = subprocess.run(
            ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script.name, target.base],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    finally:
        os.unlink(script.name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)

    def percentile(p: str) -> float:
        match = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not match:
            return float("nan")
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    return {
        "rps": rps,
        "p50_ms": percentile("50"),
        "p99_ms": percentile("99"),
        "non_2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(0) if errors else "",
    }


def run_k6(target: Target, rows: int, rate: int, duration: str) -> dict[str, Any]:
    """One k6 constant-arrival-rate step; p99 in ms, dropped iterations, failed-request rate."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "get.js"
        script.write_text(K6_SCRIPT)
        summary = Path(tmp) / "summary.json"
        env = os.environ | {
            "BASE_URL": target.base,
            "TOKEN": target.token,
            "ROWS": str(rows),
            "RATE": str(rate),
            "DURATION": duration,
            "K6_NO_USAGE_REPORT": "true",
        }
        subprocess.run(
            [
                str(BIN / "k6"),
                "run",
                "--quiet",
                "--address",
                f"127.0.0.1:{free_port()}",
                "--summary-export",
                str(summary),
                str(script),
            ],
            env=env,
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        data = json.loads(summary.read_text())
    metrics = data["metrics"]
    dropped = metrics.get("dropped_iterations", {}).get("count", 0)
    failed = metrics.get("http_req_failed", {}).get("value", 0.0)
    return {"rate": rate, "p99_ms": metrics["http_req_duration"]["p(99)"], "dropped": dropped, "failed": failed}


def k6_capacity(target: Target, rows: int, rates: list[int], duration: str) -> dict[str, Any]:
    """The highest rate in ``rates`` with p99 < 50 ms, no dropped iterations and no failed requests."""
    steps = []
    best = 0
    for rate in rates:
        step = run_k6(target, rows, rate, duration)
        steps.append(step)
        print(f"  k6 {target.name:13} {rate:>6}/s  p99 {step['p99_ms']:7.1f} ms  dropped {step['dropped']}", flush=True)
        if step["p99_ms"] >= 50 or step["dropped"] or step["failed"] > 0:
            break
        best = rate
        time.sleep(2)
    return {"best_rate": best, "steps": steps}


def plot(report: dict[str, Any], path: Path) -> None:
    """Bar chart of median wrk req/s per target, with the min-max range as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["wrk"])
    medians = [statistics.median(r["rps"] for r in report["wrk"][n]) for n in names]
    lows = [m - min(r["rps"] for r in report["wrk"][n]) for m, n in zip(medians, names, strict=True)]
    highs = [max(r["rps"] for r in report["wrk"][n]) - m for m, n in zip(medians, names, strict=True)]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar(names, medians, yerr=[lows, highs], capsize=4, color=["#888", "#4a7", "#37c", "#7ad"])
    ax.set_ylabel("GET req/s (wrk -t2 -c32)")
    ax.set_title(f"One-row GET, 2 workers each, {report['machine']}")
    for i, m in enumerate(medians):
        ax.text(i, m, f"{m:,.0f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    """Run the comparison; 0 when every target answered every request 2xx."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--server", default=os.environ.get("JOBRESULTS_PERF_SERVER", "mysql://root:@127.0.0.1:3306/test")
    )
    parser.add_argument("--database", default="jr_peers", help="dropped and re-created (default jr_peers)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14", help="rate-limit store (not db 0)")
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3, help="seconds of unmeasured wrk per target first")
    parser.add_argument("--k6", action="store_true", help="also find each target's k6 open-model capacity")
    parser.add_argument("--k6-rates", type=int, nargs="+", default=[1000, 1500, 2000, 2500, 3000, 4000, 5000])
    parser.add_argument("--k6-duration", default="10s")
    parser.add_argument("--plot", action="store_true", help="draw perf/peers.png")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found: apt-get install wrk")
    RESULTS.mkdir(parents=True, exist_ok=True)
    url = seed(args.server, args.database, args.rows)
    token = make_key(url)
    targets = start_targets(url, token, args.redis)
    report: dict[str, Any] = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores",
        "rows": args.rows,
        "connections": args.connections,
        "seconds": args.seconds,
        "wrk": {t.name: [] for t in targets},
        "k6": {},
    }
    ok = True
    try:
        order = list(targets)
        for target in order:
            run_wrk(target, args.rows, args.warmup, args.connections)
        for rnd in range(args.rounds):
            for target in order:
                result = run_wrk(target, args.rows, args.seconds, args.connections)
                report["wrk"][target.name].append(result)
                ok &= result["non_2xx"] == 0
                print(
                    f"round {rnd + 1} {target.name:13} {result['rps']:9,.0f} req/s  p50 {result['p50_ms']:.2f} ms  "
                    f"p99 {result['p99_ms']:.2f} ms  non-2xx {result['non_2xx']}",
                    flush=True,
                )
                time.sleep(1)
            order = order[1:] + order[:1]
        if args.k6:
            random.shuffle(order)
            for target in order:
                report["k6"][target.name] = k6_capacity(target, args.rows, args.k6_rates, args.k6_duration)
    finally:
        for target in targets:
            target.stop()
    express = statistics.median(r["rps"] for r in report["wrk"]["express"])
    bare = statistics.median(r["rps"] for r in report["wrk"]["bare"])
    print(f"\n{'target':14} {'req/s (median)':>15} {'range':>17} {'/express':>9} {'/bare':>7} {'k6 p99<50ms':>12}")
    for name, runs in report["wrk"].items():
        rps = [r["rps"] for r in runs]
        med = statistics.median(rps)
        k6 = report["k6"].get(name, {}).get("best_rate", "")
        print(
            f"{name:14} {med:15,.0f} {min(rps):8,.0f}-{max(rps):<8,.0f} {med / express:9.2f} {med / bare:7.2f} "
            f"{k6!s:>12}"
        )
        report.setdefault("summary", {})[name] = {
            "median_rps": med,
            "min_rps": min(rps),
            "max_rps": max(rps),
            "ratio_to_express": med / express,
            "ratio_to_bare": med / bare,
            "ratio_to_express_range": [
                min(rps) / max(r["rps"] for r in report["wrk"]["express"]),
                max(rps) / min(r["rps"] for r in report["wrk"]["express"]),
            ],
            "k6_best_rate": k6 or None,
        }
    out = RESULTS / f"peers-{datetime.now():%Y%m%dT%H%M%S}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten: {out}")
    if args.plot:
        plot(report, ROOT / "perf" / "peers.png")
        print(f"plot: {ROOT / 'perf' / 'peers.png'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
