"""A retried unit of work is logged by its name, attempt and MySQL error code, never by object reprs."""

from __future__ import annotations

import json

import pymysql
import pytest

from observability.logging import configure_logging
from repositories.database import Connection, Database


async def test_the_retry_line_names_the_unit_the_attempt_and_the_error_code(
    db: Database, capfd: pytest.CaptureFixture[str]
) -> None:
    attempts = 0

    async def flaky_unit(conn: Connection) -> int:
        nonlocal attempts
        attempts += 1
        async with conn.cursor() as cur:
            await cur.execute("SELECT 1")
        if attempts == 1:
            raise pymysql.err.OperationalError(1213, "Deadlock found when trying to get lock")
        return attempts

    configure_logging("warning", json=True)
    capfd.readouterr()
    assert await db.run(flaky_unit) == 2
    lines = [json.loads(line) for line in capfd.readouterr().out.splitlines() if line.startswith("{")]
    retries = [line for line in lines if "retry" in line.get("event", "")]
    assert len(retries) == 1, lines
    line = retries[0]
    assert line["event"] == "db.retry_scheduled"
    assert line["unit"].startswith("tests.observability.test_retry_log.")
    assert line["unit"].endswith(".<locals>.flaky_unit")
    assert line["attempt"] == 1
    assert line["error_code"] == 1213
    assert " object at 0x" not in json.dumps(line)
    assert "Deadlock" not in json.dumps(line)
