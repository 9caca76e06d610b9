"""Crash recovery of range exports: SIGKILL the real ``jobresults serve`` mid-export, restart, finish.

Acceptance test of the issue: after a SIGKILL during a range export and a restart there is no file
with a final name that is incomplete, no temporary file is left, and the restarted service finished
the export (a second attempt, once the dead worker's lease expired).

The tests use a database of their own (not the session database), as every test of an export worker
does: only the service under test may claim the range export, and the ~200k seeded rows stay out of
other tests' ranges.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pymysql
import pytest

from tests.support.database import connect, fresh_database, make_token
from tests.support.servers import Server, Servers

SEEDED_ROWS = 200_000
"""Rows in the export's range (~200 MB). Measured: one attempt takes ~3 s on both engines, and the first
lease renewal (which makes ``rows_written`` > 0) comes 1 s in, so the kill lands about a third of the way."""
WINDOW_START = datetime(1999, 1, 1)
"""Rows are created at WINDOW_START + i microseconds: a far-past window no other test writes into."""
LEASE_S = 3.0


# --- helpers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crash_database_url(server_url: str) -> Iterator[str]:
    """A fresh, migrated database for this module only; dropped afterwards."""
    with fresh_database(server_url, "jr_crash") as url:
        yield url


def _seed(url: str, prefix: str, count: int) -> None:
    """Insert ``count`` ~1 KB results created at ``WINDOW_START + i`` microseconds, in one transaction."""
    pad = "x" * 900
    rows = []
    for i in range(count):
        at = WINDOW_START + timedelta(microseconds=i)
        document = json.dumps({"i": i, "ok": True, "pad": pad}, separators=(",", ":"))
        rows.append((f"{prefix}-{i:07d}", "succeeded", document, 1, at, at))
    with connect(url) as conn, conn.cursor() as cur:
        cur.max_stmt_length = 8 * 1024 * 1024  # fewer, larger multi-row INSERTs (below max_allowed_packet)
        conn.begin()
        cur.executemany(
            "INSERT INTO job_results (job_id, status, result_data, version, created_at, updated_at) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            rows,
        )
        conn.commit()


def _export_row(url: str, export_id: str) -> dict[str, Any]:
    with connect(url) as conn, conn.cursor(pymysql.cursors.DictCursor) as cur:
        cur.execute(
            "SELECT state, attempts, rows_written, lease_owner, lease_until, bytes, sha256, file_name "
            "FROM exports WHERE export_id = %s",
            (export_id,),
        )
        row = cur.fetchone()
    assert row is not None, f"no exports row for {export_id}"
    return dict(row)


def _start(servers: Servers, database_url: str, exports_dir: Path) -> Server:
    """One Granian worker with a short export lease, a fast poll and small chunks, logging at info."""
    return servers.start(
        database_url,
        exports_dir=exports_dir,
        workers=1,
        export_lease_s=LEASE_S,
        export_poll_s=0.2,
        export_chunk_rows=200,
        log_level="info",
    )


def _temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob(".*.tmp"))


def _rfc3339(at: datetime) -> str:
    return at.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z")


# --- tests -------------------------------------------------------------------------------------


def test_sigkill_during_range_export_then_restart_finishes_it_cleanly(
    crash_database_url: str, servers: Servers, tmp_path: Path
) -> None:
    timings: dict[str, float] = {}
    started = time.monotonic()
    prefix = f"crash-{uuid.uuid4().hex[:8]}"
    _seed(crash_database_url, prefix, SEEDED_ROWS)
    timings["seed"] = time.monotonic() - started

    exports_dir = tmp_path / "exports"
    first = _start(servers, crash_database_url, exports_dir)
    base = first.base_url
    window = {
        "format": "ndjson",
        "compression": "none",
        "created_from": _rfc3339(WINDOW_START),
        "created_to": _rfc3339(WINDOW_START + timedelta(seconds=1)),
    }
    headers = {"Authorization": f"Bearer {make_token(crash_database_url)}"}
    with httpx.Client(base_url=base, timeout=10.0, headers=headers) as http:
        queued = http.post("/v1/exports", json=window)
        assert queued.status_code == 202, queued.text
        export_id = queued.json()["export_id"]
        assert queued.headers["location"] == f"/v1/exports/{export_id}"
        export_started = time.monotonic()

        # Wait until the worker is mid-export: running, and a lease renewal recorded progress.
        deadline = time.monotonic() + 30.0
        while True:
            record = http.get(f"/v1/exports/{export_id}").json()
            assert record["state"] in {"queued", "running"}, (
                f"the export ended ({record['state']}) before it could be killed; seed more rows: {record}"
            )
            if record["state"] == "running" and record["rows_written"] > 0:
                break
            assert time.monotonic() < deadline, f"the export did not make progress: {record}"
            time.sleep(0.05)
    rows_before_kill = record["rows_written"]
    assert rows_before_kill < SEEDED_ROWS

    first.kill()
    timings["first_run_until_kill"] = time.monotonic() - export_started

    final = exports_dir / f"{export_id}.ndjson"
    assert not final.exists(), "a file with the final name exists although the export never finished"
    temps = _temp_files(exports_dir)
    assert len(temps) == 1, f"expected the killed worker's temporary file, found {temps}"
    assert temps[0].startswith(f".{export_id}."), temps
    assert (exports_dir / temps[0]).stat().st_size > 0, "the temporary file is empty: the kill was not mid-write"
    assert sorted(os.listdir(exports_dir)) == temps, "only the temporary file may exist"
    killed = _export_row(crash_database_url, export_id)
    assert killed["state"] == "running"
    assert killed["attempts"] == 1
    assert killed["lease_owner"], killed
    assert killed["rows_written"] >= rows_before_kill

    # Restart on the same database and directory: the new worker claims the export once the dead
    # worker's lease has expired, removes the dead worker's temporary file and exports from scratch.
    restarted_at = time.monotonic()
    base = _start(servers, crash_database_url, exports_dir).base_url
    with httpx.Client(base_url=base, timeout=10.0, headers=headers) as http:
        deadline = time.monotonic() + 45.0
        while True:
            record = http.get(f"/v1/exports/{export_id}").json()
            assert record["state"] != "failed", record
            if record["state"] == "succeeded":
                break
            assert time.monotonic() < deadline, f"the restarted service did not finish the export: {record}"
            time.sleep(0.1)
        download = hashlib.sha256()
        with http.stream("GET", f"/v1/exports/{export_id}/content") as content:
            assert content.status_code == 200
            for part in content.iter_bytes():
                download.update(part)
    timings["restart_until_succeeded"] = time.monotonic() - restarted_at

    assert record["rows_written"] == SEEDED_ROWS
    assert record["content_url"] == f"/v1/exports/{export_id}/content"
    stored = _export_row(crash_database_url, export_id)
    assert stored["state"] == "succeeded"
    assert stored["attempts"] == 2, stored
    assert stored["lease_owner"] is None
    assert stored["lease_until"] is None
    assert stored["rows_written"] == SEEDED_ROWS
    assert stored["file_name"] == final.name

    assert sorted(os.listdir(exports_dir)) == [final.name], "no temporary file may remain"
    data = final.read_bytes()
    assert len(data) == record["bytes"] == stored["bytes"]
    assert hashlib.sha256(data).hexdigest() == record["sha256"] == stored["sha256"]
    assert download.hexdigest() == record["sha256"], "the downloaded content differs from the file"

    assert data.endswith(b"\n")
    lines = data.split(b"\n")
    assert lines.pop() == b""
    assert len(lines) == SEEDED_ROWS
    for i, line in enumerate(lines):
        row = json.loads(line)
        assert row["job_id"] == f"{prefix}-{i:07d}", f"line {i} holds {row['job_id']}"
        assert row["result"]["i"] == i
    first, last = json.loads(lines[0]), json.loads(lines[-1])
    assert first["status"] == "succeeded"
    assert first["created_at"] == "1999-01-01T00:00:00.000000Z"
    assert last["created_at"] == (WINDOW_START + timedelta(microseconds=SEEDED_ROWS - 1)).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ"
    )
    second_attempt = datetime.fromisoformat(record["finished_at"]) - datetime.fromisoformat(record["started_at"])
    timings["second_attempt"] = second_attempt.total_seconds()
    timings["total"] = time.monotonic() - started
    print(f"crash recovery: killed at {rows_before_kill} rows written;", {k: round(v, 2) for k, v in timings.items()})


def test_stale_temp_files_of_dead_owners_are_removed_at_startup(
    crash_database_url: str, servers: Servers, tmp_path: Path
) -> None:
    exports_dir = tmp_path / "exports"
    exports_dir.mkdir(mode=0o700)
    stale = exports_dir / f".{uuid.uuid4().hex}.deadhost-424242-deadbeef.tmp"
    stale.write_bytes(b'{"job_id":"half-written"')
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    # A young temporary file of an unknown export may be a single-job export about to COMMIT: kept.
    young = exports_dir / f".{uuid.uuid4().hex}.otherhost-1-cafebabe.tmp"
    young.write_bytes(b"in flight")
    # A file with a final name is never touched by the clean-up.
    finished = exports_dir / f"{uuid.uuid4().hex}.ndjson"
    finished.write_bytes(b"{}\n")

    _start(servers, crash_database_url, exports_dir)
    deadline = time.monotonic() + 10.0
    while stale.exists():
        assert time.monotonic() < deadline, "the stale temporary file was not removed at start-up"
        time.sleep(0.05)
    assert young.exists()
    assert finished.exists()
    assert sorted(os.listdir(exports_dir)) == sorted([young.name, finished.name])
