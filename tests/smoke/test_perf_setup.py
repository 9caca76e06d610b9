"""``just perf`` touches only what it says: the database it is told to drop, and a free port for k6."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from config.settings import DatabaseURL
from tests.conftest import connect

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "perf"))
import filter_benchmark  # type: ignore[import-not-found]
import run_perf  # type: ignore[import-not-found]


def test_perf_prepares_the_database_it_is_given(server_url: str) -> None:
    name = f"jr_perftest_{uuid.uuid4().hex[:8]}"
    try:
        url, tokens, *_ = run_perf.prepare(server_url, 3, name)
        assert DatabaseURL.parse(url).database == name
        with connect(url) as conn, conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM job_results")
            assert cur.fetchone() == (3,)
        assert set(tokens) == {"perf-load", "perf-limited"}
    finally:
        admin = DatabaseURL.parse(server_url)
        with connect(f"mysql://{admin.user}:{admin.password}@{admin.host}:{admin.port}/mysql") as conn:
            conn.cursor().execute(f"DROP DATABASE IF EXISTS {name}")


@pytest.mark.parametrize("name", ["", "jr perf", "x`; DROP DATABASE test; --", "a" * 65])
def test_perf_refuses_database_names_that_are_not_plain(server_url: str, name: str) -> None:
    with pytest.raises(Exception, match="not a database name"):
        run_perf.prepare(server_url, 1, name)


def test_perf_defaults_keep_away_from_redis_db_0() -> None:
    assert not run_perf.DEFAULT_REDIS.rstrip("/").endswith("/0")


def test_k6_api_port_does_not_collide(tmp_path: Path) -> None:
    """With 6565 taken (another k6 run on the machine), k6 still gets an API port of its own."""
    script = tmp_path / "noop.js"
    script.write_text("export default function () {}\n")
    blocker = socket.socket()
    try:
        blocker.bind(("127.0.0.1", 6565))
        blocker.listen()
    except OSError:
        pass  # already taken by someone else: the same situation
    try:
        command = run_perf.k6_command(tmp_path / "summary.json", script)
        command[2:2] = ["--iterations", "1"]
        done = subprocess.run(
            command,
            env=dict(os.environ, K6_NO_USAGE_REPORT="true"),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        blocker.close()
    assert done.returncode == 0, done.stderr
    assert "address already in use" not in done.stderr + done.stdout


def test_filter_benchmark_seeds_results_and_their_labels(server_url: str) -> None:
    name = f"jr_perftest_{uuid.uuid4().hex[:8]}"
    try:
        url = filter_benchmark.prepare(server_url, name, 2000, False)
        with connect(url) as conn, conn.cursor() as cur:
            cur.execute("SELECT COUNT(*), COUNT(DISTINCT job_id), SUM(status = 'failed') FROM job_results")
            assert cur.fetchone() == (2000, 2000, 400)
            cur.execute(
                "SELECT l.label_key, COUNT(*), COUNT(DISTINCT l.label_value), SUM(l.created_at = r.created_at) "
                "FROM job_result_labels l JOIN job_results r ON r.id = l.result_id GROUP BY l.label_key"
            )
            counts = {key: (int(n), int(values), int(same)) for key, n, values, same in cur.fetchall()}
        assert counts == {
            "branch": (2000, 10, 2000),
            "env": (2000, 3, 2000),
            "shard": (2000, 16, 2000),
            "team": (2000, 13, 2000),
            "tool": (2000, 7, 2000),
        }
        assert filter_benchmark.prepare(server_url, name, 2000, True) == url  # --reuse keeps it
    finally:
        admin = DatabaseURL.parse(server_url)
        with connect(f"mysql://{admin.user}:{admin.password}@{admin.host}:{admin.port}/mysql") as conn:
            conn.cursor().execute(f"DROP DATABASE IF EXISTS {name}")
