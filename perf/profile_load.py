"""Profile the service under load: py-spy samples every Granian worker while k6 runs the mix.

Starts the service as ``just perf`` does (2 workers, logs, auth and rate limits on), runs
``perf/k6/mix.js`` at ``--rate`` for ``--duration`` seconds and records each worker with py-spy
(Python frames only, no pauses; only the thread holding the GIL, so samples are CPU). Writes each
worker's collapsed stacks to ``perf/results/profile-<time>-<pid>.txt`` (input of flamegraph.pl and
speedscope) and prints the functions that were on the stack in the most samples, own code and
libraries alike.

    uv run python perf/profile_load.py --rate 800 --duration 15

py-spy needs ptrace rights over the workers (root, or ``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "perf"))

from run_perf import BIN, DEFAULT_REDIS, RESULTS, Service, prepare, run_k6  # noqa: E402

_WRAPPERS = ("jobresults", "service/cli.py", "granian/server/", "multiprocessing/", "threading.py")
"""Frames on every worker stack (process start-up); left out of the summary."""
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^:()]+)(?::\d+)?\)$")


def workers_of(pid: int) -> list[int]:
    """Child processes of Granian's main process (its workers)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in children]


def record(pid: int, seconds: int, rate: int, out: Path, fmt: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            str(BIN / "py-spy"),
            "record",
            "--pid",
            str(pid),
            "--rate",
            str(rate),
            "--duration",
            str(seconds),
            "--nonblocking",
            "--gil",
            "--format",
            fmt,
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def summarize(raw_files: list[Path], top: int) -> list[tuple[str, float]]:
    """Inclusive share of samples per function (``name (file)``) over the collapsed-stack files."""
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for path in raw_files:
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            samples = int(count)
            total += samples
            seen = set()
            for frame in stack.split(";"):
                match = _FRAME.match(frame)
                name = f"{match['function']} ({match['file']})" if match else frame or "(no Python frame: native code)"
                if match and match["file"].startswith(_WRAPPERS):
                    continue
                if name not in seen:
                    seen.add(name)
                    inclusive[name] += samples
    return [(name, samples / total) for name, samples in inclusive.most_common(top)] if total else []


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--server", default=os.environ.get("JOBRESULTS_PERF_SERVER", "mysql://root:@127.0.0.1:3306/test")
    )
    parser.add_argument("--redis", default=os.environ.get("JOBRESULTS_PERF_REDIS", DEFAULT_REDIS))
    parser.add_argument("--rate", type=int, default=800, help="k6 iterations per second")
    parser.add_argument("--duration", type=int, default=15, help="seconds of load (and of sampling)")
    parser.add_argument("--mix", default="mix", help="mix, or one operation alone: get, put, list, export")
    parser.add_argument("--samples", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    ctx = prepare(args.server, 1000)
    service = Service(ctx[0], args.redis, "2")
    stamp = f"{datetime.now():%Y%m%dT%H%M%S}"
    try:
        pids = workers_of(service.proc.pid)
        raw = [RESULTS / f"profile-{stamp}-{pid}.txt" for pid in pids]
        recorders = [record(pid, args.duration, args.samples, out, "raw") for pid, out in zip(pids, raw, strict=True)]
        load = threading.Thread(
            target=run_k6,
            args=(service.base, ctx[1], ctx[2], ctx[3], ctx[4]),
            kwargs={
                "rate": str(args.rate),
                "duration": f"{args.duration}s",
                "seed": 1000,
                "summary": RESULTS / f"profile-{stamp}-k6.json",
                "quiet": True,
                "MIX": args.mix,
                "LIMITER": "off",
            },
        )
        load.start()
        for recorder in recorders:
            recorder.wait()
        load.join()
    finally:
        service.stop()
    print(f"{args.mix} at {args.rate}/s for {args.duration} s; inclusive share of worker samples:")
    for name, share in summarize([p for p in raw if p.exists()], args.top):
        print(f"{100 * share:6.1f}%  {name}")
    print("collapsed stacks (flamegraph.pl / speedscope input): " + ", ".join(str(p) for p in raw))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
