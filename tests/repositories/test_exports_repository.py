"""The export record that ``ExportRepository.insert`` returns is the row as the server stores it."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import pytest

from repositories.database import Connection, Database
from repositories.exports import ExportParameters, ExportRepository


class _RolledBack(Exception):
    """Carries the records out of a unit of work that is then rolled back."""


@pytest.mark.parametrize(
    "fields",
    [
        {
            "kind": "job",
            "state": "succeeded",
            "parameters": ExportParameters(job_id="a.b:c-1"),
            "rows_written": 1,
            "bytes": 1234,
            "sha256": "ab" * 32,
            "file_name": "x.json",
            "attempts": 1,
            "started_at": datetime(2026, 11, 29, 12, 0, 0, 123456),
            "finished_at": datetime(2026, 11, 29, 12, 0, 1, 1),
        },
        {
            "kind": "range",
            "state": "queued",
            "requested_by": "ip:2001:db8::1",
            "parameters": ExportParameters(
                created_from=datetime(2026, 1, 1, 0, 0, 0, 5), created_to=datetime(2026, 2, 1), status="failed"
            ),
        },
        {
            "kind": "range",
            "state": "running",
            "requested_by": "cli:é user",
            "attempts": 1,
            "lease_owner": "host-1-2",
            "lease_until": datetime(2026, 11, 29, 12, 0, 30, 999999),
            "parameters": ExportParameters(),
        },
    ],
)
async def test_insert_returns_what_get_reads(db: Database, fields: dict[str, Any]) -> None:
    export_id = uuid.uuid4().hex
    values = {"format": "ndjson", "compression": "gzip", "requested_by": None, **fields}

    async def unit(conn: Connection) -> None:
        repo = ExportRepository(conn)
        inserted = await repo.insert(export_id=export_id, **values)
        # Rolled back: a queued or lease-expired row must not stay where an export worker could claim it.
        raise _RolledBack(inserted, await repo.get(export_id))

    with pytest.raises(_RolledBack) as caught:
        await db.run(unit)
    inserted, stored = caught.value.args
    assert inserted == stored
