"""Labels on job results (issue 15): the rules, the round trip, replacement, filters and pagination."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pymysql
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from repositories.database import Connection, Database
from repositories.job_results import Cursor, LabelTerm, ResultFilter, page_query, range_filter

Client = AsyncTestClient[Litestar]


def stamp(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def put(client: Client, job_id: str, labels: dict[str, str] | None, status: str = "succeeded") -> Any:
    body: dict[str, Any] = {"status": status, "result": {"job": job_id}}
    if labels is not None:
        body["labels"] = labels
    return await client.put(f"/v1/job-results/{job_id}", json=body)


@pytest.mark.parametrize(
    ("labels", "named"),
    [
        ({"": "x"}, "''"),
        ({"1abc": "x"}, "'1abc'"),
        ({"Branch": "x"}, "'Branch'"),
        ({"a:b": "x"}, "'a:b'"),
        ({"a b": "x"}, "'a b'"),
        ({"k" * 64: "x"}, "'" + "k" * 64 + "'"),
        ({"ok": "v" * 256}, "'ok'"),
        ({"ok": "a\x00b"}, "'ok'"),
        ({"ok": "tab\there"}, "'ok'"),
        ({"ok": "del\x7f"}, "'ok'"),
        ({"ok": "c1\x85"}, "'ok'"),
        ({"ok": "line\u2028sep"}, "'ok'"),
    ],
)
async def test_each_label_rule_is_a_400_naming_the_label(
    client: Client, job_id: str, labels: dict[str, str], named: str
) -> None:
    response = await put(client, job_id, labels)
    assert response.status_code == 400, response.text
    problem = response.json()
    assert problem["type"] == "tag:jobresults,2026:problem/invalid-labels"
    assert f"label {named}" in problem["detail"]
    assert ("label key" in problem["detail"]) != ("label value" in problem["detail"])
    assert (await client.get(f"/v1/job-results/{job_id}")).status_code == 404


async def test_too_many_labels_and_non_string_values_are_refused(client: Client, job_id: str) -> None:
    response = await put(client, job_id, {f"k{i}": "v" for i in range(33)})
    assert response.status_code == 400
    assert "at most 32 labels" in response.json()["detail"]
    response = await client.put(f"/v1/job-results/{job_id}", json={"status": "failed", "result": 1, "labels": {"a": 1}})
    assert response.status_code == 400
    assert "labels" in response.json()["detail"]


async def test_labels_at_the_limits_round_trip(client: Client, job_id: str) -> None:
    labels = {f"k{i:02d}": f"v{i}" for i in range(28)}
    labels["a" + "-._/9" * 12 + "x" * 2] = "é" * 255  # a 63-character key, a 255-character value
    labels["emoji"] = "👩\u200d💻 family: ok"  # a format character (ZWJ) and a colon
    labels["empty"] = ""
    labels["k28"] = 'quote " backslash \\ slash / tab-free, ünïcödé ✓'  # JSON_OBJECTAGG escapes on both engines
    assert len(labels) == 32
    created = await put(client, job_id, labels)
    assert created.status_code == 201, created.text
    assert created.json()["labels"] == labels
    read = await client.get(f"/v1/job-results/{job_id}")
    assert read.json()["labels"] == labels
    listed = await client.get(
        "/v1/job-results", params={"created_from": created.json()["created_at"], "job_id_prefix": job_id}
    )
    (item,) = listed.json()["items"]
    assert item["labels"] == labels


async def test_large_body_with_labels(client: Client, job_id: str) -> None:
    big = {"status": "succeeded", "result": {"blob": "x" * 100_000}, "labels": {"size": "large"}}
    response = await client.put(f"/v1/job-results/{job_id}", json=big)
    assert response.status_code == 201, response.text
    assert (await client.get(f"/v1/job-results/{job_id}")).json()["labels"] == {"size": "large"}
    bad = dict(big, labels={"Size": "large"})
    response = await client.put(f"/v1/job-results/{job_id}", json=bad)
    assert response.status_code == 400
    assert response.json()["type"].endswith("/invalid-labels")


async def test_replacing_replaces_labels_and_changes_the_etag(client: Client, job_id: str) -> None:
    first = await put(client, job_id, {"branch": "main", "suite": "unit"})
    second = await put(client, job_id, {"branch": "dev"})
    assert second.status_code == 200
    assert second.headers["etag"] != first.headers["etag"]
    read = await client.get(f"/v1/job-results/{job_id}")
    assert read.json()["labels"] == {"branch": "dev"}
    assert read.headers["etag"] == second.headers["etag"]
    cleared = await put(client, job_id, None)
    assert cleared.json()["labels"] == {}
    assert (await client.get(f"/v1/job-results/{job_id}")).json()["labels"] == {}


async def test_deleting_a_result_deletes_its_labels(client: Client, db: Database, job_id: str) -> None:
    await put(client, job_id, {"gone": "soon"})
    read = await client.get(f"/v1/job-results/{job_id}")
    assert read.status_code == 200
    assert (await client.delete(f"/v1/job-results/{job_id}")).status_code == 204

    async def count(conn: Connection) -> int:
        async with conn.cursor() as cur:
            await cur.execute("SELECT COUNT(*) FROM job_result_labels WHERE label_key = 'gone'")
            (n,) = await cur.fetchone()
        return int(n)

    assert await db.run(count, transaction=False) == 0


async def listing(client: Client, params: list[tuple[str, str]], limit: int = 100) -> list[str]:
    """Every job id of a filtered listing, page by page."""
    seen: list[str] = []
    cursor = None
    while True:
        query: list[tuple[str, str | int | float | bool | None]] = [*params, ("limit", str(limit))]
        if cursor:
            query.append(("cursor", cursor))
        response = await client.get("/v1/job-results", params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        seen += [item["job_id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return seen


async def test_filters_and_across_keys_or_within_a_key(client: Client, job_id: str) -> None:
    run = uuid.uuid4().hex[:8]
    rows = [
        ("a", {"run": run, "branch": "main", "tool": "pytest"}, "failed"),
        ("b", {"run": run, "branch": "main", "tool": "jest"}, "succeeded"),
        ("c", {"run": run, "branch": "dev", "tool": "pytest"}, "failed"),
        ("d", {"run": run, "branch": "feat:x", "tool": "go"}, "cancelled"),
        ("e", {"run": run, "tool": "pytest"}, "failed"),
        ("f", {"run": run, "branch": "main"}, "cancelled"),
    ]
    made: dict[str, str] = {}
    for name, labels, status in rows:
        response = await put(client, f"{job_id}-{name}", labels, status)
        made[name] = response.json()["created_at"]
    mine = [("label", f"run:{run}")]

    def ids(*names: str) -> list[str]:
        return [f"{job_id}-{n}" for n in names]

    assert await listing(client, [*mine, ("label", "branch:main")]) == ids("a", "b", "f")
    assert await listing(client, [*mine, ("label", "branch:main"), ("label", "tool:pytest")]) == ids("a")
    assert await listing(client, [*mine, ("label", "branch:main"), ("label", "branch:dev")]) == ids("a", "b", "c", "f")
    assert await listing(client, [*mine, ("label", "branch:feat:x")]) == ids("d")  # split at the first colon
    assert await listing(client, [*mine, ("label", "branch")]) == ids("a", "b", "c", "d", "f")
    assert await listing(client, [*mine, ("label", "branch"), ("label", "tool:pytest")]) == ids("a", "c")
    assert await listing(client, [*mine, ("status", "failed"), ("status", "cancelled")]) == ids("a", "c", "d", "e", "f")
    assert await listing(client, [*mine, ("label", "tool:pytest"), ("status", "failed")]) == ids("a", "c", "e")
    assert await listing(client, [*mine, ("label", "branch:MAIN")]) == []  # values compare exactly
    assert await listing(client, [*mine, ("label", "branch:main ")]) == []  # no PAD SPACE
    assert await listing(client, [*mine, ("job_id_prefix", f"{job_id}-e")]) == ids("e")
    # label key, exists-term, status and prefix without a label value: driven by idx_status_created
    assert await listing(client, [("label", "run"), ("status", "cancelled"), ("job_id_prefix", job_id)]) == ids(
        "d", "f"
    )
    # with a time range
    assert await listing(
        client, [*mine, ("label", "branch"), ("created_from", made["b"]), ("created_to", made["f"])]
    ) == ids("b", "c", "d")
    # an exists term absorbs values of the same key
    assert await listing(client, [*mine, ("label", "tool:go"), ("label", "tool")]) == ids("a", "b", "c", "d", "e")
    # pages of one item give the same rows
    assert await listing(client, [*mine, ("label", "tool:pytest"), ("label", "tool:go")], limit=1) == ids(
        "a", "c", "d", "e"
    )


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("label=Branch:main", "label key"),
        ("label=:main", "label key"),
        ("label=k:" + "v" * 256, "label value"),
        ("label=k:a%00b", "label value"),
        ("&".join(f"label=k{i}" for i in range(9)), "at most 8 different label keys"),
        ("&".join(f"label=k{i % 4}:{i}" for i in range(33)), "at most 32"),
        ("job_id_prefix=a%20b", "job_id_prefix"),
        ("job_id_prefix=" + "a" * 129, "job_id_prefix"),
    ],
)
async def test_bad_filters_are_400_naming_the_rule(client: Client, query: str, fragment: str) -> None:
    response = await client.get(f"/v1/job-results?{query}")
    assert response.status_code == 400, response.text
    assert fragment in response.text
    # The problem's errors name the parameter, as for every other bad query parameter.
    (error,) = response.json()["errors"]
    assert error["name"] == query.split("=", 1)[0]
    assert error["source"] == "query"


async def test_pagination_is_exact_under_interleaved_writes(client: Client, job_id: str) -> None:
    run = uuid.uuid4().hex[:8]
    original = []
    for i in range(12):
        labels = {"run": run, "kind": "match" if i % 3 else "other"}
        await put(client, f"{job_id}-{i:02d}", labels, "failed" if i % 2 else "succeeded")
        if i % 3:
            original.append(f"{job_id}-{i:02d}")
    params = [("label", f"run:{run}"), ("label", "kind:match")]
    seen: list[str] = []
    cursor = None
    step = 0
    while True:
        query: list[tuple[str, str | int | float | bool | None]] = [*params, ("limit", "3")]
        if cursor:
            query.append(("cursor", cursor))
        page = (await client.get("/v1/job-results", params=query)).json()
        seen += [item["job_id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        # Between pages: replace rows already seen and rows still to come (labels kept, status changed),
        # add a matching and a non-matching row, delete a non-matching one.
        step += 1
        await put(client, original[0], {"run": run, "kind": "match"}, "cancelled")
        await put(client, original[-1], {"run": run, "kind": "match"}, "cancelled")
        await put(client, f"{job_id}-new{step}", {"run": run, "kind": "match"})
        await put(client, f"{job_id}-other{step}", {"run": run, "kind": "other"})
        await client.delete(f"/v1/job-results/{job_id}-{(step - 1) * 3:02d}")
    added = [f"{job_id}-new{s}" for s in range(1, step + 1)]
    assert step >= 3
    assert seen == original + added  # every matching row once, in (created_at, id) order
    assert len(set(seen)) == len(seen)


def _plans() -> list[tuple[str, ResultFilter]]:
    week_terms = (LabelTerm("tool", ("pytest",)), LabelTerm("branch", ("main",)))
    return [
        ("two labels, a status", ResultFilter(statuses=("failed",), labels=week_terms)),
        ("OR within a key", ResultFilter(labels=(LabelTerm("tool", ("pytest", "jest", "go")), LabelTerm("branch")))),
        ("statuses only", ResultFilter(statuses=("failed", "cancelled"), job_id_prefix="ci-")),
        ("one status, exists", ResultFilter(statuses=("failed",), labels=(LabelTerm("branch"),))),
        ("exists only", ResultFilter(labels=(LabelTerm("branch"), LabelTerm("tool")))),
        ("prefix only", ResultFilter(job_id_prefix="ci_1")),
        ("nothing", ResultFilter()),
    ]


async def _explain(db: Database, sql: str, params: dict[str, object]) -> list[dict[str, Any]]:
    async def run(conn: Connection) -> list[dict[str, Any]]:
        async with conn.cursor() as cur:
            # MySQL 9 may default to the tree format; MariaDB knows no FORMAT=TRADITIONAL (error 1064).
            try:
                await cur.execute("EXPLAIN FORMAT=TRADITIONAL " + sql, params)
            except pymysql.err.ProgrammingError:
                await cur.execute("EXPLAIN " + sql, params)
            names = [d[0].lower() for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]

    return await db.run(run, transaction=False)


_REAL_TABLES = {"r", "d", "lb", "job_results", "job_result_labels"} | {f"x{n}" for n in range(8)}


SEEDED_AT = datetime(2001, 2, 3)


@pytest.fixture(scope="module")
async def seeded(db: Database) -> None:
    """3,000 results of 2001 (out of every other test's ranges) with 3 labels each, then ANALYZE TABLE.

    Plans depend on the statistics: on MySQL an ``EXISTS`` over labels became a full scan of the labels
    table only once the tables held rows, so the plans are checked on a filled table.
    """

    async def unit(conn: Connection) -> None:
        async with conn.cursor() as cur:
            await cur.execute("SELECT COUNT(*) FROM job_results WHERE job_id LIKE 'explain-%%'")
            if (await cur.fetchone())[0]:
                return
            rows = [
                (f"explain-{i:05d}", ("succeeded", "failed", "cancelled")[i % 3], SEEDED_AT + timedelta(seconds=i))
                for i in range(3000)
            ]
            await cur.executemany(
                "INSERT INTO job_results (job_id, status, result_data, version, created_at, updated_at) "
                "VALUES (%s, %s, '{}', 1, %s, %s)",
                [(job, status, at, at) for job, status, at in rows],
            )
            await cur.execute(
                "INSERT INTO job_result_labels (result_id, label_key, label_value, created_at) "
                "SELECT id, 'tool', ELT(1 + id % 3, 'pytest', 'jest', 'go'), created_at FROM job_results "
                "WHERE job_id LIKE 'explain-%%' UNION ALL "
                "SELECT id, 'branch', IF(id % 4 = 0, 'main', 'dev'), created_at FROM job_results "
                "WHERE job_id LIKE 'explain-%%' UNION ALL "
                "SELECT id, 'shard', CONCAT('', id % 16), created_at FROM job_results WHERE job_id LIKE 'explain-%%'"
            )

    await db.run(unit)

    async def analyze(conn: Connection) -> None:
        async with conn.cursor() as cur:
            await cur.execute("ANALYZE TABLE job_results, job_result_labels")
            await cur.fetchall()

    await db.run(analyze, transaction=False)


@pytest.mark.usefixtures("seeded")
@pytest.mark.filterwarnings("ignore:.*select#1:Warning")  # EXPLAIN notes (MySQL)
@pytest.mark.parametrize(("name", "where"), _plans(), ids=[name for name, _ in _plans()])
async def test_every_filter_is_served_by_an_index(db: Database, name: str, where: ResultFilter) -> None:
    queries = []
    # The seeded 2001 rows, and the last week (the rows the other tests of this module wrote).
    for week_ago in (SEEDED_AT - timedelta(days=1), datetime.now(UTC).replace(tzinfo=None) - timedelta(days=7)):
        after = Cursor(created_at=week_ago + timedelta(days=1), id=5)
        queries.append(page_query(week_ago, None, where, None, 101, include_result=False))
        queries.append(page_query(week_ago, week_ago + timedelta(days=7), where, after, 101, include_result=True))
        where_sql, params = range_filter(week_ago, None, None, where)
        queries.append(
            (
                f"SELECT job_results.id FROM job_results FORCE INDEX (idx_created){where_sql} "
                "ORDER BY job_results.created_at, job_results.id",
                params,
            )
        )
    for sql, params in queries:
        plan = await _explain(db, sql, params)
        tables = [row for row in plan if row["table"] in _REAL_TABLES]
        assert tables, plan
        for row in tables:
            assert row["type"] != "ALL", (name, json.dumps(plan, default=str))
            assert row["key"], (name, json.dumps(plan, default=str))
            if row["type"] == "range":  # an index read in keyset order, never sorted
                assert "filesort" not in str(row.get("extra")), (name, json.dumps(plan, default=str))


def test_openapi_declares_the_filters_as_repeatable_arrays() -> None:
    """Schemathesis (tests/smoke) generates from this document, so it covers the filters only if declared."""
    spec = json.loads((Path(__file__).resolve().parents[2] / "openapi.json").read_text())
    params = {p["name"]: p for p in spec["paths"]["/v1/job-results"]["get"]["parameters"]}
    for name in ("label", "status"):
        schema = params[name]["schema"]
        assert params[name].get("style", "form") == "form"
        assert params[name].get("explode", True) is True
        assert {"type": "null"} in schema["oneOf"]
        assert any(option.get("type") == "array" for option in schema["oneOf"]), schema
    assert "job_id_prefix" in params
    body = spec["components"]["schemas"]["RangeExportRequest"]["properties"]
    assert {"label", "status", "job_id_prefix"} <= set(body)


async def test_filtered_pages_with_documents(client: Client, job_id: str) -> None:
    run = uuid.uuid4().hex[:8]
    for name, tool in (("a", "pytest"), ("b", "jest"), ("c", "go"), ("d", "jest")):
        await put(client, f"{job_id}-{name}", {"run": run, "tool": tool})
    seen = []
    cursor = None
    while True:  # two values of the driving key (a UNION of two index ranges), one item per page, documents
        query: list[tuple[str, str | int | float | bool | None]] = [
            ("label", f"run:{run}"),
            ("label", "tool:jest"),
            ("label", "tool:pytest"),
            ("include", "result"),
            ("limit", "1"),
        ]
        if cursor:
            query.append(("cursor", cursor))
        page = (await client.get("/v1/job-results", params=query)).json()
        seen += [(item["job_id"], item["result"], item["labels"]["tool"]) for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [
        (f"{job_id}-a", {"job": f"{job_id}-a"}, "pytest"),
        (f"{job_id}-b", {"job": f"{job_id}-b"}, "jest"),
        (f"{job_id}-d", {"job": f"{job_id}-d"}, "jest"),
    ]
