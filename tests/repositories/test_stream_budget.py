"""A range export reads its rows in chunks bounded in bytes as well as rows (issue 12 item 4).

With 500 rows a chunk whatever their size, three exports of 15 MB documents once held 2.87 GB.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta

from config.settings import Settings
from repositories.database import Connection, Database
from repositories.job_results import JobResultStream
from tests.conftest import connect

ROW_CHARS = 40_000
BUDGET = 100_000


async def test_chunks_end_at_the_byte_budget_and_lose_no_row(settings: Settings, db: Database) -> None:
    start = datetime(1997, 3, 1) + timedelta(seconds=uuid.uuid4().int % 86_400)
    ids = [f"budget-{uuid.uuid4().hex[:8]}-{i:02d}" for i in range(10)]
    with connect(settings.database_url) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO job_results (job_id, status, result_data, version, created_at, updated_at) "
            "VALUES (%s, 'succeeded', %s, 1, %s, %s)",
            [
                (job_id, json.dumps({"pad": "x" * (ROW_CHARS - 11)}), start + timedelta(microseconds=i), start)
                for i, job_id in enumerate(ids)
            ],
        )

    async def read(conn: Connection) -> list[list[tuple[bytes, str, str | None]]]:
        stream = JobResultStream(conn)
        return [chunk async for chunk in stream.chunks(start, start + timedelta(seconds=1), None, 500, BUDGET)]

    chunks = await db.run(read, transaction=False)
    sizes = [[len(row[1]) for row in chunk] for chunk in chunks]
    assert [len(chunk) for chunk in chunks] == [3, 3, 3, 1], sizes  # 3 x 40 KB reach the 100 KB budget
    assert all(sum(chunk) - chunk[-1] < BUDGET for chunk in sizes), "a chunk ends with the row that reaches the budget"
    seen = [row[0].decode().split(" ", 1)[0] for chunk in chunks for row in chunk]
    assert seen == ids

    async def one_row_over(conn: Connection) -> list[int]:
        stream = JobResultStream(conn)
        return [len(chunk) async for chunk in stream.chunks(start, start + timedelta(seconds=1), None, 500, 10)]

    assert await db.run(one_row_over, transaction=False) == [1] * 10, "a chunk holds at least one row"
