"""``jobresults purge``: ``--dry-run`` lists what would go and deletes nothing; without it, one pass now."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from tests.conftest import connect, fresh_database
from tests.purge.test_purge import job_ids, seed, utcnow
from tests.support.servers import JOBRESULTS, service_env

pytestmark = pytest.mark.slow  # each test runs the CLI in processes of its own


@pytest.fixture
def url(server_url: str) -> Iterator[str]:
    with fresh_database(server_url, "jr_purge_cli") as database_url:
        yield database_url


def run(url: str, tmp_path: Path, *args: str, **settings: object) -> subprocess.CompletedProcess[str]:
    env = service_env({"database_url": url, "exports_dir": tmp_path / "exports", **settings})
    return subprocess.run(
        [JOBRESULTS, "purge", *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_dry_run_lists_what_would_go_and_deletes_nothing(url: str, tmp_path: Path) -> None:
    seed(url, "old", 4, expires_at=utcnow() - timedelta(days=1))
    seed(url, "kept", 2, expires_at=utcnow() + timedelta(days=1))
    done = run(url, tmp_path, "--dry-run")
    assert done.returncode == 0, done.stderr
    listed = {line.removeprefix("job_results: ") for line in done.stdout.splitlines() if "old-" in line}
    assert listed == {f"old-{n}" for n in range(4)}
    assert "job_results: 4 would be purged" in done.stdout
    assert "nothing was deleted" in done.stdout
    assert "kept-" not in done.stdout
    assert len(job_ids(url)) == 6

    capped = run(url, tmp_path, "--dry-run", "--limit", "2")
    assert capped.returncode == 0, capped.stderr
    assert "job_results: 2 or more (raise --limit to list them) would be purged" in capped.stdout
    assert len(job_ids(url)) == 6


def test_purge_runs_one_pass_now(url: str, tmp_path: Path) -> None:
    seed(url, "old", 1200, expires_at=utcnow() - timedelta(days=1))
    seed(url, "kept", 2, expires_at=None)
    done = run(url, tmp_path, purge_batch_rows=500)
    assert done.returncode == 0, done.stderr
    assert "job_results: purged 1200" in done.stdout
    assert job_ids(url) == {"kept-0", "kept-1"}


def test_purge_exits_1_while_a_service_holds_the_lease(url: str, tmp_path: Path) -> None:
    seed(url, "old", 3, expires_at=utcnow() - timedelta(days=1))
    with connect(url) as conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE leases SET lease_owner = 'service-1', lease_until = %(until)s WHERE name = 'purge'",
            {"until": utcnow() + timedelta(minutes=1)},
        )
    done = run(url, tmp_path)
    assert done.returncode == 1
    assert "a purge pass is running" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(job_ids(url)) == 3


def test_a_bad_limit_is_refused(url: str, tmp_path: Path) -> None:
    done = run(url, tmp_path, "--dry-run", "--limit", "0")
    assert done.returncode == 2
    assert "--limit" in done.stderr


def test_import_applies_the_default_retention(url: str, tmp_path: Path) -> None:
    document = tmp_path / "imported-1.json"
    document.write_text('{"ok": true}')
    env = service_env({"database_url": url, "exports_dir": tmp_path / "exports", "result_retention_days": 3})
    done = subprocess.run(
        [JOBRESULTS, "import", str(document)], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    with connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT TIMESTAMPDIFF(SECOND, updated_at, expires_at) FROM job_results WHERE job_id = 'imported-1'")
        (seconds,) = cur.fetchone()
    assert seconds == 3 * 86400
