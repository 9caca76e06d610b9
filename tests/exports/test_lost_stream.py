"""A range export whose database stream is lost mid-read is handed back to the queue, not failed.

The streaming connection is killed on the server (``KILL``) while the export reads its rows. The
client then sees error 2013 (lost connection), which aiomysql may re-raise from its cursor's close
as an ``AttributeError``; either way the export is transient-failed: requeued, and done by the next
attempt. The module has a database of its own, so the session app's worker never claims the export.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import msgspec
import pytest

from config.settings import Settings
from exports.pipeline import ExportService, new_export_id
from repositories.database import Database
from repositories.exports import Export, ExportParameters, ExportRepository
from tests.conftest import connect, fresh_database

WINDOW_START = datetime(1998, 6, 1)
ROWS = 5000
"""~8 KB each, ~40 MB in all: far more than the socket buffers on the way hold (loopback sockets grow to
about 6 MB each, and through HAProxy there are four of them), so the kill lands mid-stream."""


@pytest.fixture(scope="module")
def stream_database_url(server_url: str) -> Iterator[str]:
    with fresh_database(server_url, "jr_stream") as url:
        with connect(url) as conn, conn.cursor() as cur:
            rows = []
            for i in range(ROWS):
                at = WINDOW_START + timedelta(microseconds=i)
                document = json.dumps({"i": i, "pad": "z" * 8000})
                rows.append((f"stream-{i:05d}", "succeeded", document, at, at))
            cur.executemany(
                "INSERT INTO job_results (job_id, status, result_data, version, created_at, updated_at) "
                "VALUES (%s, %s, %s, 1, %s, %s)",
                rows,
            )
        yield url


@pytest.fixture
async def service(settings: Settings, stream_database_url: str, tmp_path: Path) -> AsyncIterator[ExportService]:
    local = msgspec.structs.replace(
        settings, database_url=stream_database_url, exports_dir=str(tmp_path), export_chunk_rows=50
    )
    db = await Database.open(local)
    try:
        yield ExportService(db, local)
    finally:
        await db.close()


async def _claimed(service: ExportService) -> Export:
    now = datetime.now().replace(microsecond=0)
    params = ExportParameters(created_from=WINDOW_START, created_to=WINDOW_START + timedelta(seconds=1))
    await service.db.run(
        lambda conn: ExportRepository(conn).insert(
            export_id=new_export_id(), kind="range", format="ndjson", compression="none",
            parameters=params, state="queued", requested_by="test", created_at=now,
        )
    )  # fmt: skip
    export = await service.db.run(lambda conn: ExportRepository(conn).claim(service.owner, service.lease))
    assert export is not None
    return export


def _kill_stream(database_url: str) -> bool:
    """KILL the connection that streams job_results for this database; False if none was found."""
    database = database_url.rsplit("/", 1)[1]
    with connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s AND INFO LIKE %s AND ID <> CONNECTION_ID()",
            (database, "%FROM job_results%"),
        )
        found = cur.fetchall()
        for (thread_id,) in found:
            cur.execute(f"KILL {int(thread_id)}")
    return bool(found)


async def test_a_stream_killed_mid_read_requeues_the_export(service: ExportService, stream_database_url: str) -> None:
    export = await _claimed(service)
    killed: list[bool] = []
    original = service.write_range

    async def write_and_kill(claimed: Export, **_: object) -> tuple[int, int]:
        def progress(rows: int) -> None:
            if not killed and rows >= 200:
                killed.append(_kill_stream(stream_database_url))

        return await original(claimed, progress=progress)

    service.write_range = write_and_kill  # type: ignore[method-assign,assignment]
    await service._run_claimed(export)
    assert killed == [True], "the streaming connection was not found to kill"

    row = await service.db.run(lambda conn: ExportRepository(conn).get(export.export_id), transaction=False)
    assert (row.state, row.error, row.lease_owner) == ("queued", None, None)
    assert list(Path(service.settings.exports_dir).iterdir()) == [], "the partial file must be removed"

    # The next attempt (this worker's, once the pool replaced the dead connection) finishes it.
    service.write_range = original  # type: ignore[method-assign]
    assert await service.run_next()
    row = await service.db.run(lambda conn: ExportRepository(conn).get(export.export_id), transaction=False)
    assert (row.state, row.rows_written, row.attempts) == ("succeeded", ROWS, 2)
