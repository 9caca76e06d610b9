"""A full disk: exports fail cleanly (507 or state ``failed``), leave no file, and the service recovers.

The exports directory is a 256 KiB tmpfs (needs root, or CAP_SYS_ADMIN; the tests are skipped
otherwise) and the exported job result is ~1 MB, so writing the file hits ENOSPC. The app runs
in-process with its export worker on a database of its own, as every test of an export worker does.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from config.settings import Settings
from exports.pipeline import STORAGE_FULL_MESSAGE
from service.app import create_app
from tests.conftest import connect, fresh_database, make_token
from tests.support.exports import wait_done

TMPFS_SIZE = "256k"
BIG_RESULT = {"log": [f"line {i:07d} " + "x" * 90 for i in range(10_000)], "exit_code": 1}
"""~1 MB of JSON, about four times the tmpfs."""
SMALL_RESULT = {"exit_code": 0, "ok": True}


_connect = connect


@pytest.fixture(scope="module")
def full_database_url(server_url: str) -> Iterator[str]:
    """A fresh, migrated database for this module only; dropped afterwards."""
    with fresh_database(server_url, "jr_full") as url:
        yield url


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs mounted for this test; unmounted afterwards."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a {TMPFS_SIZE} tmpfs (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
async def full_client(
    settings: Settings, full_database_url: str, small_disk: Path
) -> AsyncIterator[AsyncTestClient[Litestar]]:
    """The app in-process, exporting to the small tmpfs, with a fast-polling export worker."""
    app = create_app(
        msgspec.structs.replace(
            settings,
            database_url=full_database_url,
            exports_dir=str(small_disk),
            export_poll_s=0.1,
            export_worker=True,
        )
    )
    async with AsyncTestClient(app=app) as client:
        client.headers["Authorization"] = f"Bearer {make_token(full_database_url)}"
        yield client


def _count_exports(url: str) -> int:
    with _connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM exports")
        (count,) = cur.fetchone()
    return int(count)


async def _put(client: AsyncTestClient[Litestar], result: Any) -> dict[str, Any]:
    job_id = f"t-{uuid.uuid4().hex}"
    created = await client.put(f"/v1/job-results/{job_id}", json={"status": "succeeded", "result": result})
    assert created.status_code == 201, created.text
    body: dict[str, Any] = created.json()
    return body


def _window(created_at: str) -> dict[str, str]:
    """A range covering exactly the result created at ``created_at`` (RFC 3339, six digits, Z)."""
    at = datetime.fromisoformat(created_at)
    upper = (at + timedelta(microseconds=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {"created_from": created_at, "created_to": upper}


@pytest.mark.parametrize("fmt", ["json", "ndjson", "csv"])
async def test_single_job_export_on_a_full_disk_is_507_and_leaves_nothing(
    full_client: AsyncTestClient[Litestar], full_database_url: str, small_disk: Path, fmt: str
) -> None:
    big = await _put(full_client, BIG_RESULT)
    exports_before = _count_exports(full_database_url)

    response = await full_client.post(f"/v1/job-results/{big['job_id']}/exports", json={"format": fmt})

    assert response.status_code == 507, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["status"] == 507
    assert problem["detail"] == STORAGE_FULL_MESSAGE
    for leak in (str(small_disk), "/tmp", ".tmp", "Errno", "errno", "ENOSPC", "No space", "Traceback"):
        assert leak not in response.text, f"the 507 body leaks {leak!r}: {response.text}"
    assert os.listdir(small_disk) == [], "neither a temporary nor a final file may be left"
    assert _count_exports(full_database_url) == exports_before, "a failed export must not be recorded"
    listed = await full_client.get("/v1/exports")
    assert listed.status_code == 200
    assert all(item.get("job_id") != big["job_id"] for item in listed.json()["items"])

    # The failed export freed its space: a small export on the same disk succeeds.
    small = await _put(full_client, SMALL_RESULT)
    created = await full_client.post(f"/v1/job-results/{small['job_id']}/exports", json={"format": fmt})
    assert created.status_code == 201, created.text
    record = created.json()
    assert record["state"] == "succeeded"
    final = small_disk / f"{record['export_id']}.{fmt}"
    assert os.listdir(small_disk) == [final.name]
    assert final.stat().st_size == record["bytes"]
    assert _count_exports(full_database_url) == exports_before + 1


async def test_range_export_on_a_full_disk_fails_and_leaves_nothing(
    full_client: AsyncTestClient[Litestar], small_disk: Path
) -> None:
    big = await _put(full_client, BIG_RESULT)

    queued = await full_client.post("/v1/exports", json={"format": "ndjson", **_window(big["created_at"])})
    assert queued.status_code == 202, queued.text
    record = await wait_done(full_client, queued.json()["export_id"])

    assert record["state"] == "failed", record
    assert record["error"] == STORAGE_FULL_MESSAGE
    assert record.get("bytes") is None
    assert record.get("sha256") is None
    assert record.get("content_url") is None
    assert os.listdir(small_disk) == [], "neither a temporary nor a final file may be left"
    content = await full_client.get(f"/v1/exports/{record['export_id']}/content")
    assert content.status_code == 409, content.text

    # The worker carries on: a range export that fits succeeds on the same disk.
    small = await _put(full_client, SMALL_RESULT)
    queued = await full_client.post("/v1/exports", json={"format": "ndjson", **_window(small["created_at"])})
    assert queued.status_code == 202, queued.text
    record = await wait_done(full_client, queued.json()["export_id"])
    assert record["state"] == "succeeded", record
    assert record["rows_written"] == 1
    final = small_disk / f"{record['export_id']}.ndjson"
    assert os.listdir(small_disk) == [final.name]
    assert final.stat().st_size == record["bytes"]
