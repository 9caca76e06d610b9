"""Capacity benchmark (issue 6): step the arrival rate up until the service misses its targets.

For the request mix and for GET alone, rates 200, 500, 1000, 1500, 2000, 3000, ... are run for
``--step`` each (k6, open model); a rate passes when p99 < 50 ms, under 0.1% errors and no dropped
iterations, and the series stops at the first failure. In the same run it measures the raw aiomysql
point-select rate on the same database with the same concurrency and no HTTP, and GET served with
logging, auth and rate limiting switched off, and prints the ratios so the cost of each layer shows.
Writes perf/results/capacity-<time>.json and perf/capacity.png (latency against rate).

    uv run python perf/capacity.py --server mysql://root:@127.0.0.1:3306/test
    uv run python perf/capacity.py --rates 500 750 1000 1250   # finer steps around a limit
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "perf"))

from run_perf import DEFAULT_REDIS, RESULTS, Service, prepare, run_k6  # noqa: E402

RATES = [200, 500, 1000, 1500, 2000, 3000, 4000, 5000]
P99_TARGET_MS = 50.0


def step(base: str, ctx: tuple, rate: int, duration: str, seed: int, mix: str) -> dict[str, float | int | bool]:
    _url, tokens, payload_file, range_from, range_to = ctx
    summary = RESULTS / f"capacity-step-{mix}-{rate}.json"
    code = run_k6(
        base,
        tokens,
        payload_file,
        range_from,
        range_to,
        rate=str(rate),
        duration=duration,
        seed=seed,
        summary=summary,
        quiet=True,
        MIX=mix,
        P99_MS=str(P99_TARGET_MS),
        LIMITER="off",
    )
    metrics = json.loads(summary.read_text())["metrics"]
    duration_ms = metrics["http_req_duration{scenario:mix}"]
    failed = metrics["http_req_failed{scenario:mix}"]
    dropped = metrics.get("dropped_iterations", {}).get("count", 0)
    return {
        "rate": rate,
        "p50_ms": duration_ms["med"],
        "p99_ms": duration_ms["p(99)"],
        "error_rate": failed.get("value", failed.get("rate", 0.0)),
        "dropped": dropped,
        "achieved_rps": metrics["iterations"]["rate"],
        "passed": code == 0,
    }


def series(base: str, ctx: tuple, duration: str, seed: int, mix: str, rates: list[int]) -> list[dict]:
    steps = []
    for rate in rates:
        result = step(base, ctx, rate, duration, seed, mix)
        steps.append(result)
        verdict = "pass" if result["passed"] else "FAIL"
        print(
            f"  {mix:>4} {rate:>5}/s  p50 {result['p50_ms']:6.1f} ms  p99 {result['p99_ms']:6.1f} ms  "
            f"errors {result['error_rate']:.4f}  dropped {result['dropped']:>5}  {verdict}",
            flush=True,
        )
        if not result["passed"]:
            break
    return steps


def best(steps: list[dict]) -> int:
    return max((s["rate"] for s in steps if s["passed"]), default=0)


async def raw_point_selects(url: str, seed: int, concurrency: int, seconds: float) -> float:
    """Point selects by job_id straight on aiomysql, ``concurrency`` at a time: selects per second."""
    from config.settings import Settings
    from repositories.database import Database
    from repositories.job_results import JobResultRepository

    settings = Settings.from_env(
        {}, database_url=url, pool_min_size=min(concurrency, 12), pool_max_size=min(concurrency, 12), log_level="error"
    )
    db = await Database.open(settings)
    done = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            job_id = f"perf-seed-{random.randrange(seed)}"
            await db.run(lambda conn, job_id=job_id: JobResultRepository(conn).get(job_id), transaction=False)
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    await db.close()
    return done / elapsed


def plot(mix_steps: list[dict], get_steps: list[dict], bare_steps: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for steps, label in ((mix_steps, "mix"), (get_steps, "GET"), (bare_steps, "GET, no logs/auth/limits")):
        rates = [s["rate"] for s in steps]
        ax.plot(rates, [s["p99_ms"] for s in steps], marker="o", label=f"{label} p99")
        ax.plot(rates, [s["p50_ms"] for s in steps], marker=".", linestyle="--", label=f"{label} p50")
    ax.axhline(P99_TARGET_MS, color="red", linewidth=0.8, label="p99 target 50 ms")
    ax.set_xlabel("arrival rate (requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title("Job Result Service on 2 cores (service, MariaDB and k6 share them)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--server", default=os.environ.get("JOBRESULTS_PERF_SERVER", "mysql://root:@127.0.0.1:3306/test")
    )
    parser.add_argument("--redis", default=os.environ.get("JOBRESULTS_PERF_REDIS", DEFAULT_REDIS))
    parser.add_argument("--step", default="15s")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--workers", default="2")
    parser.add_argument(
        "--rates", type=int, nargs="+", default=RATES, help="arrival rates to step through (default: %(default)s)"
    )
    args = parser.parse_args()
    ctx = prepare(args.server, args.seed)
    url = ctx[0]

    service = Service(url, args.redis, args.workers)
    try:
        print("full service (logs, auth, rate limits on):")
        mix_steps = series(service.base, ctx, args.step, args.seed, "mix", args.rates)
        get_steps = series(service.base, ctx, args.step, args.seed, "get", args.rates)
    finally:
        service.stop()
    bare = Service(
        url,
        args.redis,
        args.workers,
        JOBRESULTS_AUTH_ENABLED="false",
        JOBRESULTS_RATE_LIMIT_ENABLED="false",
        JOBRESULTS_LOG_LEVEL="warning",
    )
    try:
        print("GET with logging, auth and rate limiting off:")
        bare_steps = series(bare.base, ctx, args.step, args.seed, "get", args.rates)
    finally:
        bare.stop()
    raw = asyncio.run(raw_point_selects(url, args.seed, concurrency=50, seconds=10))

    figures = {
        "machine": {
            "cores": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        },
        "mix": mix_steps,
        "get": get_steps,
        "get_bare": bare_steps,
        "best_mix_rps": best(mix_steps),
        "best_get_rps": best(get_steps),
        "best_get_bare_rps": best(bare_steps),
        "raw_aiomysql_point_selects_per_s": raw,
    }
    print(
        f"highest passing rate: mix {figures['best_mix_rps']}/s, GET {figures['best_get_rps']}/s, "
        f"GET without logs/auth/limits {figures['best_get_bare_rps']}/s; raw aiomysql point selects {raw:.0f}/s"
    )
    if raw:
        print(
            f"ratios to raw aiomysql: GET {figures['best_get_rps'] / raw:.2f}, "
            f"bare GET {figures['best_get_bare_rps'] / raw:.2f}, mix {figures['best_mix_rps'] / raw:.2f}"
        )
    out = RESULTS / f"capacity-{datetime.now():%Y%m%dT%H%M%S}.json"
    out.write_text(json.dumps(figures, indent=2))
    plot(mix_steps, get_steps, bare_steps, ROOT / "perf" / "capacity.png")
    print(f"wrote {out} and perf/capacity.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
