"""What the canonical request log line costs: server CPU per GET with logging on and off.

Starts the service (1 worker, auth and rate limits off so only logging differs), sends the same
number of GETs with k6 at a fixed rate, and reads the worker processes' CPU time from /proc. Run it
twice or more: the machine is shared and noisy.

    uv run python perf/log_cost.py --requests 20000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "perf"))

from run_perf import BIN, RESULTS, Service, prepare  # noqa: E402

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
            [str(BIN / "k6"), "run", "--quiet", str(script)],
            check=True,
            stdout=subprocess.DEVNULL,
            env=dict(os.environ, BASE_URL=service.base, N=str(requests), K6_NO_USAGE_REPORT="true"),
        )
        return (cpu_seconds(service.proc.pid) - before) / requests * 1e6
    finally:
        service.stop()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--server", default=os.environ.get("JOBRESULTS_PERF_SERVER", "mysql://root:@127.0.0.1:3306/test")
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    url = prepare(args.server, 1000)[0]
    rows = []
    for _ in range(args.rounds):
        off = measure(url, args.redis, args.requests, "warning")
        on = measure(url, args.redis, args.requests, "info")
        rows.append({"cpu_us_per_get_logging_off": off, "cpu_us_per_get_logging_on": on, "cost": on / off - 1})
        print(f"CPU per GET: logging off {off:.0f} µs, on {on:.0f} µs, cost {100 * (on / off - 1):+.1f}%")
    (RESULTS / "log-cost.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
