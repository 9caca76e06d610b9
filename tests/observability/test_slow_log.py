"""config/my.cnf's slow-query settings: accepted by the servers, and a slow query lands in the slow log."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.database import connect

MY_CNF = Path(__file__).resolve().parents[2] / "config" / "my.cnf"
SLOW_SETTINGS = ("slow_query_log", "long_query_time", "log_output")


def my_cnf() -> dict[str, str]:
    parser = configparser.ConfigParser(allow_no_value=True, inline_comment_prefixes=("#",))
    parser.read(MY_CNF)
    return {key.replace("-", "_"): (value or "").strip("'\"") for key, value in parser["mysqld"].items()}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mariadbd") is None, reason="needs the mariadbd binary")
def test_mariadb_accepts_every_option_of_my_cnf() -> None:
    done = subprocess.run(
        ["mariadbd", f"--defaults-file={MY_CNF}", "--user=mysql", "--verbose", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "unknown" not in done.stderr.lower(), done.stderr[-2000:]


@pytest.fixture
def slow_log(server_url: str) -> Iterator[Path]:
    """Apply my.cnf's slow-log settings to the test server (restored afterwards); yields the log file.

    The file is read from this machine: a server in a chroot (MySQL from Debian sid, see .ci/mysql-sid)
    names its root in JOBRESULTS_TEST_SERVER_ROOT.
    """
    settings = my_cnf()
    with connect(server_url, database=False) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT @@GLOBAL.slow_query_log, @@GLOBAL.long_query_time, @@GLOBAL.log_output, "
            "@@GLOBAL.slow_query_log_file, @@datadir"
        )
        before_on, before_time, before_output, log_file, datadir = cur.fetchone()
        cur.execute(
            "SET GLOBAL slow_query_log = %s, GLOBAL long_query_time = %s, GLOBAL log_output = %s",
            (int(settings["slow_query_log"]), float(settings["long_query_time"]), settings["log_output"]),
        )
        path = Path(log_file if os.path.isabs(log_file) else os.path.join(datadir, log_file))
        root = os.environ.get("JOBRESULTS_TEST_SERVER_ROOT")
        if root:
            path = Path(root) / path.relative_to("/")
        try:
            if not path.exists():
                pytest.skip(f"the server's slow log {path} is not on this machine")
            yield path
        finally:
            cur.execute(
                "SET GLOBAL slow_query_log = %s, GLOBAL long_query_time = %s, GLOBAL log_output = %s",
                (before_on, before_time, before_output),
            )


def _logged_after(server_url: str, slow_log: Path, queries: list[str], marker: str) -> str:
    """Run ``queries`` on a new connection, wait until ``marker`` is in the slow log, return the log."""
    # long_query_time is copied into each session when it connects: use a new connection.
    with connect(server_url, database=False) as conn, conn.cursor() as cur:
        for query in queries:
            cur.execute(query)
    deadline = time.monotonic() + 5
    while marker not in slow_log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{marker} not found in {slow_log}"
        time.sleep(0.1)
    return slow_log.read_text(errors="replace")


def test_a_slow_query_lands_in_the_slow_log(server_url: str, slow_log: Path) -> None:
    marker = f"slow-{uuid.uuid4().hex}"
    queries = [f"SELECT SLEEP(0.3) AS `{marker}`", f"SELECT 1 AS `fast-{marker}`"]
    text = _logged_after(server_url, slow_log, queries, marker)
    entry = text[text.rindex("# Query_time", 0, text.index(marker)) : text.index(marker)]
    query_time = float(entry.split("Query_time:")[1].split()[0])
    assert query_time >= 0.2
    assert f"fast-{marker}" not in text  # fast queries stay out


def test_queries_well_under_200_ms_stay_out_of_the_slow_log(server_url: str, slow_log: Path) -> None:
    """my.cnf's threshold is 200 ms, not the server's 10 s default (the test above) nor 0 (this one)."""
    marker = f"threshold-{uuid.uuid4().hex}"
    # The 300 ms query after the 50 ms one marks the point up to which the log is complete.
    text = _logged_after(
        server_url, slow_log, [f"SELECT SLEEP(0.05) AS `under-{marker}`", f"SELECT SLEEP(0.3) AS `{marker}`"], marker
    )
    assert f"under-{marker}" not in text
