"""The failover run (issue 11): two service replicas on a Galera cluster, its writer node killed under load.

Needs ``.ci/cluster start`` (3 MariaDB Galera nodes behind HAProxy, SeaweedFS) and Redis. Then:

1. seeds the database ``jr_perf`` through HAProxy (``run_perf.prepare``: API keys, ``--seed`` results);
2. starts two replicas (``jobresults serve``, 2 Granian workers each), each on its own port with its own
   local exports directory, both on the HAProxy URL, sharing Redis db ``--redis`` (not db 0, the tests');
3. runs the k6 mix (perf/k6/failover.js) across both replicas for ``--duration``, while this script
   itself creates a single-job export and a range export through alternating replicas every
   ``--export-every`` seconds; at ``--kill-at`` seconds, ``.ci/cluster kill-writer`` SIGKILLs the Galera
   node HAProxy writes to;
4. checks, and exits 1 when any check fails:
   - every PUT that got a 2xx reads back with identical content (status and result);
   - no 5xx other than 503, and no request without an answer, from the kill on; nothing but 2xx before;
   - every request answers 2xx again within ``--recover-s`` (10) seconds of the kill;
   - no range export ran twice: no (export, attempt) claimed by two workers, none finished twice, each
     succeeded in the end;
   - with ``--s3``: every export, made through either replica, downloads complete and identical
     (the sha256 of its record) through both replicas.
5. prints the figures (requests, 503s, seconds back to all-2xx, p99) and writes them to
   perf/results/failover-<time>.json.

``--s3`` passes the S3 export store settings to the replicas (``JOBRESULTS_EXPORTS_STORE=s3`` with the
cluster's SeaweedFS; credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY); without it each replica
keeps its exports on its own disk and the cross-replica download check is skipped.

    uv run python perf/failover.py [--s3 [--download stream|redirect]]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "perf"))

from run_perf import BIN, RESULTS, free_port, prepare  # noqa: E402

CLUSTER = ROOT / ".ci" / "cluster"
_TIME = re.compile(r"^(?P<base>[^.]+)(?:\.(?P<frac>\d+))?(?P<tz>Z|[+-]\d\d:\d\d)$")


def cluster(*args: str) -> str:
    return subprocess.run([str(CLUSTER), *args], check=True, capture_output=True, text=True).stdout.strip()


class Replica:
    """One ``jobresults serve`` (2 Granian workers by default, its own process group); stop with :meth:`stop`."""

    def __init__(self, name: str, url: str, redis: str, workers: str, env_extra: dict[str, str]) -> None:
        self.name = name
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.exports_dir = RESULTS / f"failover-exports-{name}"
        self.log = RESULTS / f"failover-replica-{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("JOBRESULTS_")}
        env.update(
            JOBRESULTS_DATABASE_URL=url,
            JOBRESULTS_PORT=str(self.port),
            JOBRESULTS_WORKERS=workers,
            JOBRESULTS_REDIS_URL=redis,
            JOBRESULTS_EXPORTS_DIR=str(self.exports_dir),
            JOBRESULTS_POOL_MAX_SIZE="6",
            JOBRESULTS_LOG_LEVEL="info",
            JOBRESULTS_EXPORT_POLL_S="0.5",
        )
        env.update(env_extra)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "jobresults"), "serve"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"replica {self.name} exited: see {self.log}")
            try:
                if httpx.get(f"{self.base}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"replica {self.name} did not get ready: see {self.log}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def events(self, *names: str) -> list[dict[str, Any]]:
        """This replica's JSON log lines whose ``event`` is one of ``names``."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("event") in names:
                found.append(record)
        return found


@dataclass
class Outcome:
    """One request's answer: wall-clock time (s), status (0: no answer), operation, replica, duration (ms)."""

    at: float
    status: int
    op: str
    replica: str
    ms: float | None = None


@dataclass
class Driver:
    """Creates exports through alternating replicas during the load, and records every answer."""

    replicas: list[Replica]
    token: str
    range_from: str
    range_to: str
    every_s: float
    outcomes: list[Outcome] = field(default_factory=list)
    job_exports: list[tuple[str, int]] = field(default_factory=list)
    range_exports: list[tuple[str, int]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def _post(self, client: httpx.Client, index: int, op: str, path: str, body: dict[str, Any]) -> str | None:
        try:
            response = client.post(f"{self.replicas[index].base}{path}", json=body)
            status = response.status_code
        except httpx.TransportError:
            status, response = 0, None
        self.outcomes.append(Outcome(time.time(), status, op, str(index)))
        if response is not None and response.is_success:
            return str(response.json()["export_id"])
        return None

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(headers=headers, timeout=20) as client:
            n = 0
            while not self.stop.wait(self.every_s):
                index = n % len(self.replicas)
                made = self._post(
                    client, index, "job-export", f"/v1/job-results/perf-seed-{n % 50}/exports", {"format": "json"}
                )
                if made:
                    self.job_exports.append((made, index))
                body = {"created_from": self.range_from, "created_to": self.range_to, "format": "ndjson"}
                made = self._post(client, index, "range-export", "/v1/exports", body)
                if made:
                    self.range_exports.append((made, index))
                n += 1


def parse_time(text: str) -> float:
    """k6's RFC 3339 time (nanoseconds) as a POSIX timestamp."""
    match = _TIME.match(text)
    if match is None:
        raise ValueError(f"unexpected time {text!r}")
    frac = (match["frac"] or "0")[:6].ljust(6, "0")
    tz = "+00:00" if match["tz"] == "Z" else match["tz"]
    return datetime.fromisoformat(f"{match['base']}.{frac}{tz}").timestamp()


def k6_outcomes(path: Path) -> tuple[list[Outcome], list[tuple[str, int]]]:
    """Every k6 request (from --out json) and the PUTs that got a 2xx: (job id, body index)."""
    outcomes, puts = [], []
    durations: dict[tuple[str, str, str], float] = {}
    keys: list[tuple[Outcome, tuple[str, str, str]]] = []
    with path.open() as lines:
        for line in lines:
            if '"http_reqs"' not in line and '"http_req_duration"' not in line:
                continue
            point = json.loads(line)
            if point.get("type") != "Point":
                continue
            data = point["data"]
            tags = data["tags"]
            if point.get("metric") == "http_req_duration":
                durations[(data["time"], tags["method"], tags["url"])] = float(data["value"])
                continue
            status = int(tags.get("status") or 0)
            outcome = Outcome(parse_time(data["time"]), status, tags.get("op", "?"), tags["replica"])
            keys.append((outcome, (data["time"], tags["method"], tags["url"])))
            if tags.get("op") == "put" and 200 <= status < 300:
                puts.append((tags["url"].rsplit("/", 1)[1], int(tags["body"])))
    for outcome, key in keys:
        outcome.ms = durations.get(key)
        outcomes.append(outcome)
    return outcomes, puts


def p99(values: list[float]) -> float | None:
    """The 99th percentile (nearest rank), or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1)


def latency_windows(outcomes: list[Outcome], killed_at: float, recover_s: float) -> dict[str, float | None]:
    """p99 (ms) of the k6 requests before the kill, in the ``recover_s`` after it, and after that."""
    timed = [o for o in outcomes if o.ms is not None]
    return {
        "p99_ms_before_kill": p99([o.ms for o in timed if o.at < killed_at]),  # type: ignore[misc]
        "p99_ms_failover_window": p99([o.ms for o in timed if killed_at <= o.at < killed_at + recover_s]),  # type: ignore[misc]
        "p99_ms_after_window": p99([o.ms for o in timed if o.at >= killed_at + recover_s]),  # type: ignore[misc]
        "max_ms": max((o.ms for o in timed), default=None),  # type: ignore[type-var]
    }


def judge_answers(outcomes: list[Outcome], killed_at: float, recover_s: float) -> dict[str, Any]:
    """The answer figures and criteria around the kill."""
    outcomes = sorted(outcomes, key=lambda o: o.at)
    before = [o for o in outcomes if o.at < killed_at]
    after = [o for o in outcomes if o.at >= killed_at]
    bad_before = Counter(o.status for o in before if not 200 <= o.status < 300)
    bad_after = [o for o in after if not 200 <= o.status < 300]
    forbidden = Counter(o.status for o in bad_after if o.status != 503)
    back_s = (bad_after[-1].at - killed_at) if bad_after else 0.0
    return {
        "requests": len(outcomes),
        "non_2xx_before_kill": dict(bad_before),
        "status_503": sum(1 for o in bad_after if o.status == 503),
        "non_2xx_after_kill_other_than_503": dict(forbidden),
        "seconds_back_to_all_2xx": round(back_s, 2),
        "ok_no_error_before_kill": not bad_before,
        "ok_only_503_after_kill": not forbidden,
        "ok_back_to_2xx_in_time": back_s <= recover_s,
    }


def check_puts(client: httpx.Client, bases: list[str], puts: list[tuple[str, int]], files: list[str]) -> list[str]:
    """Read every acknowledged PUT back (alternating replicas); the job ids whose content differs."""
    documents = [json.loads(Path(file).read_bytes()) for file in files]
    lost = []
    for i, (job_id, body) in enumerate(puts):
        response = client.get(f"{bases[i % len(bases)]}/v1/job-results/{job_id}")
        sent = documents[body]
        if response.status_code != 200:
            lost.append(f"{job_id}: {response.status_code}")
            continue
        got = response.json()
        if got.get("status") != sent["status"] or got.get("result") != sent["result"]:
            lost.append(f"{job_id}: content differs")
    return lost


def wait_settled(client: httpx.Client, base: str, export_ids: list[str], seconds: float) -> dict[str, dict[str, Any]]:
    """The records of ``export_ids`` once none is queued or running (or the time is up)."""
    deadline = time.monotonic() + seconds
    records: dict[str, dict[str, Any]] = {}
    while True:
        for export_id in export_ids:
            if records.get(export_id, {}).get("state") in ("succeeded", "failed"):
                continue
            response = client.get(f"{base}/v1/exports/{export_id}")
            if response.status_code == 200:
                records[export_id] = response.json()
        pending = [e for e in export_ids if records.get(e, {}).get("state") not in ("succeeded", "failed")]
        if not pending or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def check_range_runs(replicas: list[Replica], records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """No range export claimed twice for one attempt, none finished twice, each succeeded."""
    claims: dict[tuple[str, int], list[str]] = defaultdict(list)
    finished: Counter[str] = Counter()
    for replica in replicas:
        for event in replica.events("export.claimed", "export.finished"):
            if event["event"] == "export.claimed":
                claims[(event["export_id"], int(event["attempt"]))].append(str(event["owner"]))
            elif event.get("kind") == "range":
                finished[event["export_id"]] += 1
    double_claims = sorted(f"{e} attempt {a}: {owners}" for (e, a), owners in claims.items() if len(owners) > 1)
    twice = sorted(e for e, n in finished.items() if n > 1)
    not_succeeded = sorted(e for e, r in records.items() if r.get("state") != "succeeded")
    retried = len({e for (e, attempt) in claims if attempt > 1 and e in records})
    return {
        "range_exports": len(records),
        "range_exports_requeued": retried,
        "double_claims": double_claims,
        "finished_twice": twice,
        "not_succeeded": not_succeeded,
        "ok_no_range_export_ran_twice": not double_claims and not twice,
        "ok_range_exports_succeeded": not not_succeeded,
    }


def check_downloads(
    client: httpx.Client, replicas: list[Replica], records: dict[str, dict[str, Any]], redirect: bool
) -> list[str]:
    """Download every succeeded export through every replica; the mismatches (sha256 of the record).

    With ``redirect`` each download must have come from the store through a redirect.
    """
    wrong = []
    for export_id, record in records.items():
        if record.get("state") != "succeeded":
            continue
        for replica in replicas:
            response = client.get(f"{replica.base}/v1/exports/{export_id}/content", follow_redirects=True)
            if response.status_code != 200:
                wrong.append(f"{export_id} via {replica.name}: {response.status_code}")
                continue
            if redirect and not response.history:
                wrong.append(f"{export_id} via {replica.name}: no redirect")
            digest = hashlib.sha256(response.content).hexdigest()
            if digest != record.get("sha256") or len(response.content) != record.get("bytes"):
                wrong.append(f"{export_id} via {replica.name}: {len(response.content)} bytes, sha256 {digest[:12]}")
    return wrong


def run_k6(replicas: list[Replica], token: str, payload_file: Path, args: argparse.Namespace, out: Path) -> int:
    env = dict(
        os.environ,
        BASE_URLS=",".join(r.base for r in replicas),
        API_KEY=token,
        RATE=str(args.rate),
        DURATION=f"{args.duration}s",
        PAYLOADS=str(payload_file),
        SEEDED=str(args.seed),
        RANGE_FROM=args.range_from,
        RANGE_TO=args.range_to,
        K6_NO_USAGE_REPORT="true",
    )
    command = [
        str(BIN / "k6"),
        "run",
        "--quiet",
        "--address",
        f"127.0.0.1:{free_port()}",
        "--system-tags",
        "status,method,url,scenario,error_code",
        "--summary-export",
        str(out.with_suffix(".summary.json")),
        "--out",
        f"json={out}",
        str(ROOT / "perf" / "k6" / "failover.js"),
    ]
    # The end-of-test summary goes to --summary-export; failover.py prints its own figures.
    return subprocess.run(command, env=env, check=False, stdout=subprocess.DEVNULL).returncode


def s3_settings(args: argparse.Namespace) -> dict[str, str]:
    endpoint = args.s3_endpoint or cluster("s3-endpoint")
    return {
        "JOBRESULTS_EXPORTS_STORE": "s3",
        "JOBRESULTS_S3_BUCKET": args.s3_bucket or cluster("s3-bucket"),
        "JOBRESULTS_S3_PREFIX": f"failover-{datetime.now():%Y%m%dT%H%M%S}/",
        "JOBRESULTS_S3_ENDPOINT": endpoint,
        "JOBRESULTS_S3_PUBLIC_ENDPOINT": endpoint,
        "JOBRESULTS_S3_REGION": "us-east-1",
        "JOBRESULTS_EXPORTS_DOWNLOAD": args.download,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", help="database URL through HAProxy (default: .ci/cluster url)")
    parser.add_argument("--redis", default=os.environ.get("JOBRESULTS_FAILOVER_REDIS", "redis://127.0.0.1:6379/14"))
    parser.add_argument("--rate", type=int, default=50, help="k6 iterations/s across both replicas")
    parser.add_argument("--duration", type=int, default=40, help="seconds of load")
    parser.add_argument("--kill-at", type=float, default=15, help="seconds into the load")
    parser.add_argument("--recover-s", type=float, default=10)
    parser.add_argument("--seed", type=int, default=200)
    parser.add_argument("--workers", default="2")
    parser.add_argument("--export-every", type=float, default=2.0, help="seconds between the script's own exports")
    parser.add_argument("--keep-points", action="store_true", help="keep k6's per-request output")
    parser.add_argument("--s3", action="store_true", help="exports in the cluster's S3 store; check cross-replica")
    parser.add_argument("--s3-endpoint")
    parser.add_argument("--s3-bucket")
    parser.add_argument("--download", choices=("stream", "redirect"), default="stream")
    args = parser.parse_args()
    if not 0 < args.kill_at < args.duration:
        parser.error("--kill-at must fall inside the load (0 < kill-at < duration)")

    url = args.url or cluster("url")
    server = url.rsplit("/", 1)[0] + "/test"
    _, tokens, payload_file, args.range_from, args.range_to = prepare(server, args.seed)
    perf_url = url.rsplit("/", 1)[0] + "/jr_perf"
    token = tokens["perf-load"]
    env_extra = s3_settings(args) if args.s3 else {}
    replicas = [Replica(name, perf_url, args.redis, args.workers, env_extra) for name in ("a", "b")]
    stamp = f"{datetime.now():%Y%m%dT%H%M%S}"
    k6_out = RESULTS / f"failover-k6-{stamp}.json"
    try:
        for replica in replicas:
            replica.wait_ready()
        print(f"replicas ready: {', '.join(r.base for r in replicas)}; writer {cluster('writer')}", flush=True)
        driver = Driver(replicas, token, args.range_from, args.range_to, args.export_every)
        driver_thread = threading.Thread(target=driver.run, daemon=True)
        killed: dict[str, Any] = {}

        def kill_writer() -> None:
            killed["at"] = time.time()
            killed["node"] = cluster("kill-writer")
            print(f"killed the writer node {killed['node']} at +{args.kill_at:.0f} s", flush=True)

        started = time.time()
        killer = threading.Timer(args.kill_at, kill_writer)
        driver_thread.start()
        killer.start()
        k6_code = run_k6(replicas, token, payload_file, args, k6_out)
        driver.stop.set()
        driver_thread.join()
        killer.join()
        if k6_code != 0:
            print(f"k6 exited {k6_code}", file=sys.stderr)

        k6_requests, puts = k6_outcomes(k6_out)
        answers = judge_answers(k6_requests + driver.outcomes, killed["at"], args.recover_s)
        files = json.loads(payload_file.read_text())
        with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
            lost = check_puts(client, [r.base for r in replicas], puts, files)
            records = wait_settled(client, replicas[0].base, [e for e, _ in driver.range_exports], 90)
            ranges = check_range_runs(replicas, records)
            downloads: list[str] | None = None
            if args.s3:
                job_records = wait_settled(client, replicas[0].base, [e for e, _ in driver.job_exports], 10)
                downloads = check_downloads(client, replicas, records | job_records, args.download == "redirect")
        summary = json.loads(k6_out.with_suffix(".summary.json").read_text())
        p99_all = summary["metrics"]["http_req_duration"].get("p(99)")
        results = {
            "time": stamp,
            "rate": args.rate,
            "duration_s": args.duration,
            "kill_at_s": round(killed["at"] - started, 2),
            "killed_node": killed["node"],
            "replicas": len(replicas),
            "workers_per_replica": int(args.workers),
            "s3": args.s3,
            "download": args.download if args.s3 else None,
            **answers,
            "p99_ms": round(p99_all, 1) if p99_all is not None else None,
            **latency_windows(k6_requests, killed["at"], args.recover_s),
            "puts_acknowledged": len(puts),
            "puts_lost_or_changed": lost,
            "ok_no_acknowledged_write_lost": not lost,
            "database_retries": sum(len(r.events("stamina.retry_scheduled")) for r in replicas),
            "job_exports": len(driver.job_exports),
            **ranges,
            "cross_replica_download_mismatches": downloads,
            "ok_exports_identical_on_every_replica": downloads == [] if args.s3 else None,
        }
    finally:
        for replica in replicas:
            replica.stop()
    out = RESULTS / f"failover-{stamp}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    if not args.keep_points:
        k6_out.unlink(missing_ok=True)  # per-request points: large, and summarised above
    print(
        f"failover: {results['requests']} requests at {args.rate}/s over {args.duration} s, "
        f"{results['killed_node']} killed at +{results['kill_at_s']} s: {results['status_503']} x 503, "
        f"all 2xx again after {results['seconds_back_to_all_2xx']} s, p99 {results['p99_ms']} ms "
        f"(before the kill {results['p99_ms_before_kill']}, in the {args.recover_s:.0f} s after it "
        f"{results['p99_ms_failover_window']}, later {results['p99_ms_after_window']}), "
        f"{results['database_retries']} database retries; "
        f"{len(puts)} acknowledged PUTs, {len(lost)} lost; {ranges['range_exports']} range exports "
        f"({ranges['range_exports_requeued']} requeued), ran twice: {len(ranges['finished_twice'])}"
    )
    failed = [key for key, value in results.items() if key.startswith("ok_") and value is False]
    for key in failed:
        print(f"FAILED: {key}", file=sys.stderr)
    for key in ("non_2xx_before_kill", "non_2xx_after_kill_other_than_503", "puts_lost_or_changed", "double_claims"):
        if results[key]:
            print(f"  {key}: {results[key]}", file=sys.stderr)
    print(f"results: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
