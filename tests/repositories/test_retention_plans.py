"""Query plans of retention (issue 14), checked with EXPLAIN on the engine under test.

The purge finds due rows through ``idx_job_results_expires`` alone (a range scan that reads the index
only, no sort); the listing stays a keyset scan of ``idx_created`` in order (no filesort) whatever the
retention filters, which are conditions on the rows it reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pymysql.cursors
import pytest

from repositories.job_results import SQL_DUE_IDS, SQL_OLDEST_DUE, Cursor, ResultFilter, page_query
from tests.conftest import connect, fresh_database


@pytest.fixture(scope="module")
def url(server_url: str) -> Iterator[str]:
    """3000 results: a third expired, a third expiring later, a sixth pinned, the rest never expiring."""
    with fresh_database(server_url, "jr_plans") as database_url:
        now = datetime.now(UTC).replace(tzinfo=None)
        rows = []
        for n in range(3000):
            kind = n % 6
            expires = (
                now - timedelta(hours=n) if kind in (0, 1) else now + timedelta(days=n) if kind in (2, 3) else None
            )
            doc = json.dumps({"n": n})
            rows.append((f"plan-{n}", "succeeded", doc, now - timedelta(seconds=n), now, expires, kind == 4))
        with connect(database_url) as conn, conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO job_results (job_id, status, result_data, version, created_at, updated_at, expires_at, "
                "pinned) VALUES (%s, %s, %s, 1, %s, %s, %s, %s)",
                rows,
            )
            cur.execute("ANALYZE TABLE job_results")
            cur.fetchall()
        yield database_url


def explain(url: str, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    with connect(url) as conn, conn.cursor(pymysql.cursors.DictCursor) as cur:
        cur.execute("SHOW SESSION VARIABLES LIKE 'explain_format'")
        if cur.fetchall():  # MySQL 9 defaults to TREE; MariaDB has only the table form
            cur.execute("SET SESSION explain_format = 'TRADITIONAL'")
        cur.execute("EXPLAIN " + sql, params)
        return list(cur.fetchall())


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def test_due_rows_are_found_in_the_expiry_index_alone(url: str) -> None:
    (plan,) = explain(url, SQL_DUE_IDS, {"now": now(), "limit": 500})
    assert plan["key"] == "idx_job_results_expires", plan
    assert plan["type"] == "range", plan
    assert "Using index" in plan["Extra"], plan  # covering: no row is read to find a batch
    assert "filesort" not in plan["Extra"], plan


def test_the_oldest_due_row_is_one_index_look_up(url: str) -> None:
    (plan,) = explain(url, SQL_OLDEST_DUE, {"now": now()})
    assert plan["key"] in ("idx_job_results_expires", None), plan
    extra = plan["Extra"] or ""
    # MySQL answers MIN() from the index ends ("Select tables optimized away"); MariaDB may range-scan it.
    assert "optimized away" in extra or "Using index" in extra, plan


@pytest.mark.parametrize(
    "filters",
    [
        {},
        {"pinned": True},
        {"pinned": False},
        {"expires_before": datetime(2030, 1, 1)},
        {"pinned": False, "expires_before": datetime(2030, 1, 1), "status": "succeeded"},
    ],
)
def test_listing_with_retention_filters_stays_a_keyset_scan(url: str, filters: dict[str, Any]) -> None:
    for after in (None, Cursor(created_at=now() - timedelta(seconds=1500), id=1500)):
        status = filters.get("status")
        sql, params = page_query(
            now() - timedelta(days=1),
            None,
            ResultFilter(statuses=(status,) if status else ()),
            after,
            101,
            False,
            pinned=filters.get("pinned"),
            expires_before=filters.get("expires_before"),
            now=now(),
        )
        # The page's rows (the labels come from a subquery on their primary key, a plan row of its own).
        plan = next(row for row in explain(url, sql, params) if row["table"] == "r")
        # The keyset scan of the time index (of the status index when a status is given).
        assert plan["key"] == ("idx_status_created" if status else "idx_created"), plan
        assert "filesort" not in (plan["Extra"] or ""), plan
