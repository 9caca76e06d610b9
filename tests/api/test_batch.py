"""``POST /v1/job-results:batch``: all or nothing, every item checked as a PUT, events per item."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from httpx import Response
from litestar import Litestar
from litestar.testing import AsyncTestClient

from config.settings import Settings
from repositories.database import Database
from repositories.domain import EVENT_TYPES
from repositories.job_results import JobResultExists, JobResultRepository, NewJobResult
from service.controllers.batch import MULTI_ROW_FIELDS
from service.controllers.job_results import store_write
from service.schemas import JobResultWrite
from tests.api.test_large_put import same_loop_client
from tests.conftest import REALDATA
from tests.support.database import connect

Client = AsyncTestClient[Litestar]
BATCH = "/v1/job-results:batch"
JSON = {"Content-Type": "application/json"}


class _Stored(msgspec.Struct):
    result: msgspec.Raw


def ids(count: int) -> list[str]:
    prefix = f"b-{uuid.uuid4().hex[:12]}"
    return [f"{prefix}-{n:04d}" for n in range(count)]


def item(job_id: str, result: str = '{"ok": true}', status: str = "succeeded", **extra: str) -> bytes:
    """One item as JSON text, its result given as raw JSON text (so any literal can be sent)."""
    fields = "".join(f", {json.dumps(key)}: {json.dumps(value)}" for key, value in extra.items())
    return f'{{"job_id": {json.dumps(job_id)}, "status": {json.dumps(status)}, "result": {result}{fields}}}'.encode()


async def post_items(client: Client, items: list[bytes]) -> Response:
    return await client.post(BATCH, content=b'{"items": [' + b", ".join(items) + b"]}", headers=JSON)


async def stored_text(client: Client, job_id: str) -> bytes:
    """The stored result's JSON text exactly as GET returns it."""
    response = await client.get(f"/v1/job-results/{job_id}")
    assert response.status_code == 200, response.text
    return bytes(msgspec.json.decode(response.content, type=_Stored).result)


def count_stored(database_url: str, job_ids: list[str]) -> int:
    with connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(
            f"SELECT COUNT(*) FROM job_results WHERE job_id IN ({', '.join(['%s'] * len(job_ids))})",
            job_ids,
        )
        return int(cur.fetchone()[0])


NUMBERS = (
    '{"max": 18446744073709551615, "min": -9223372036854775808, "float": 0.1, "big": 1.7976931348623157e308, '
    '"tiny": 5e-324, "neg0": -0.0, "nested": [1, [2.5, {"x": 123456789012345678}]], "s": "\\u00e9\\ud83d\\ude00"}'
)


async def test_mixed_creates_and_replaces_roundtrip_exactly(client: Client, database_url: str) -> None:
    old, new = ids(3), ids(3)
    for job_id in old:
        assert (
            await client.put(f"/v1/job-results/{job_id}", json={"status": "failed", "result": 1})
        ).status_code == 201
    etags = {job_id: (await client.get(f"/v1/job-results/{job_id}")).headers["etag"] for job_id in old}
    reference = ids(1)[0]  # the same document through a plain PUT, to compare what GET returns
    assert (
        await client.put(
            f"/v1/job-results/{reference}",
            content=b'{"status": "succeeded", "result": ' + NUMBERS.encode() + b"}",
            headers=JSON,
        )
    ).status_code == 201
    order = [new[0], old[0], new[1], old[1], new[2], old[2]]
    response = await post_items(client, [item(job_id, NUMBERS) for job_id in order])
    assert response.status_code == 200, response.text
    items = response.json()["items"]
    assert [entry["index"] for entry in items] == list(range(6))
    assert [entry["job_id"] for entry in items] == order
    assert [entry["outcome"] for entry in items] == ["created", "replaced"] * 3
    assert [entry["version"] for entry in items] == [1, 2] * 3
    for entry in items:
        read = await client.get(f"/v1/job-results/{entry['job_id']}")
        assert read.headers["etag"] == entry["etag"]
        assert read.json()["status"] == entry["status"] == "succeeded"
        assert read.json()["updated_at"] == entry["updated_at"]
        assert read.json()["created_at"] == entry["created_at"]
        assert await stored_text(client, entry["job_id"]) == await stored_text(client, reference)
        if entry["outcome"] == "replaced":
            assert entry["etag"] != etags[entry["job_id"]]
            assert entry["created_at"] != entry["updated_at"]
    document = json.loads(await stored_text(client, new[0]))
    assert document["max"] == 18446744073709551615
    assert document["min"] == -9223372036854775808
    assert document["nested"][1][1]["x"] == 123456789012345678
    assert document["s"] == "\u00e9\U0001f600"
    assert count_stored(database_url, order) == 6


@pytest.mark.parametrize(
    ("bad", "status", "slug", "json_path"),
    [
        (lambda job_id: item("bad id/with slash"), 400, "invalid-job-id", None),
        (lambda job_id: item("x" * 129), 400, "invalid-job-id", None),
        (lambda job_id: item(job_id, status="done"), 400, "invalid-body", None),
        (lambda job_id: item(job_id, extra="field"), 400, "invalid-body", None),
        (lambda job_id: b'{"job_id": "' + job_id.encode() + b'", "status": "failed"}', 400, "invalid-body", None),
        (lambda job_id: item(job_id, '{"a": 1, "a": 2}'), 422, "unfaithful-json", "$.items[2].result.a"),
        (lambda job_id: item(job_id, "[" * 65 + "]" * 65), 422, "unfaithful-json", "$.items[2].result" + "[0]" * 64),
        (lambda job_id: item(job_id, "18446744073709551616"), 422, "unfaithful-json", "$.items[2].result"),
        (lambda job_id: item(job_id, '"\\ud800"'), 422, "unfaithful-json", "$.items[2].result"),
        (
            lambda job_id: (
                b'{"job_id": "' + job_id.encode() + b'", "status": "failed", "status": "failed", "result": 1}'
            ),
            422,
            "unfaithful-json",
            "$.items[2].status",
        ),
        (
            lambda job_id: b'{"job_id": "' + job_id.encode() + b'", "status": "failed", "result": "\xff"}',
            400,
            "malformed-json",
            None,
        ),
    ],
    ids=[
        "slash",
        "too-long",
        "status",
        "unknown-field",
        "no-result",
        "dup-key",
        "too-deep",
        "big-int",
        "surrogate",
        "dup-envelope-key",
        "not-utf8",
    ],
)
async def test_one_bad_item_refuses_the_whole_batch(
    client: Client, database_url: str, bad: Any, status: int, slug: str, json_path: str | None
) -> None:
    good = ids(4)
    existing = good[0]
    assert (await client.put(f"/v1/job-results/{existing}", json={"status": "failed", "result": 1})).status_code == 201
    before = await stored_text(client, existing)
    bad_id = ids(1)[0]
    items = [item(good[0]), item(good[1]), bad(bad_id), item(good[2]), item(good[3])]
    response = await post_items(client, items)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert "nothing was stored" in problem["detail"]
    [error] = problem["errors"]
    assert error["index"] == 2
    assert error["name"] == "items[2]"
    assert error["status"] == status
    assert error["type"] == f"tag:jobresults,2026:problem/{slug}"
    assert error["message"]
    if json_path is not None:
        assert error["json_path"] == json_path
    sent_id = json.loads(bad(bad_id).decode("utf-8", "replace"))["job_id"]
    assert error["job_id"] == (sent_id if len(sent_id) <= 200 else sent_id[:200] + "...")
    assert count_stored(database_url, [*good[1:], bad_id]) == 0
    assert await stored_text(client, existing) == before


async def test_every_refused_item_is_named(client: Client, database_url: str) -> None:
    good = ids(3)
    items = [item(good[0]), item("-bad"), item(good[1], "1e400"), item(good[2], status="nope")]
    response = await post_items(client, items)
    assert response.status_code == 400  # a 400 among the refusals makes the batch a 400
    errors = response.json()["errors"]
    assert [(e["index"], e["status"]) for e in errors] == [(1, 400), (2, 422), (3, 400)]
    assert [e["job_id"] for e in errors] == ["-bad", good[1], good[2]]
    assert count_stored(database_url, good) == 0


async def test_only_fidelity_refusals_make_a_422(client: Client) -> None:
    [job_id] = ids(1)
    response = await post_items(client, [item(job_id, '{"k": [1, 2, {"k": 1, "k": 1}]}')])
    assert response.status_code == 422
    assert response.json()["errors"][0]["json_path"] == "$.items[0].result.k[2].k"


async def test_duplicate_job_ids_are_refused_naming_both(client: Client, database_url: str) -> None:
    first, second = ids(2)
    response = await post_items(client, [item(first), item(second), item(first, "2")])
    assert response.status_code == 400
    [error] = response.json()["errors"]
    assert error["index"] == 2
    assert error["job_id"] == first
    assert error["type"].endswith("/duplicate-job-id")
    assert "item 0" in error["message"]
    assert count_stored(database_url, [first, second]) == 0


async def test_1001_items_are_400_and_1000_are_stored(client: Client, database_url: str) -> None:
    job_ids = ids(1001)
    refused = await post_items(client, [item(job_id) for job_id in job_ids])
    assert refused.status_code == 400
    assert "1000" in refused.json()["detail"]
    assert count_stored(database_url, job_ids) == 0
    stored = await post_items(client, [item(job_id) for job_id in job_ids[:1000]])
    assert stored.status_code == 200, stored.text
    assert len(stored.json()["items"]) == 1000
    assert count_stored(database_url, job_ids) == 1000


@pytest.mark.parametrize(
    "content",
    [b"", b"[]", b'{"items": []}', b'{"items": {}}', b'{"items": [], "more": 1}', b"{", b'{"items": [1]}'],
)
async def test_bodies_that_are_not_batches_are_400(client: Client, content: bytes) -> None:
    response = await client.post(BATCH, content=content, headers=JSON)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"


async def test_a_second_items_member_is_refused(client: Client, database_url: str) -> None:
    first, second = ids(2)
    content = b'{"items": [' + item(first) + b'], "items": [' + item(second) + b"]}"
    response = await client.post(BATCH, content=content, headers=JSON)
    assert response.status_code == 422
    assert response.json()["json_path"] == "$.items"
    assert count_stored(database_url, [first, second]) == 0


async def test_a_body_over_the_cap_is_413(client: Client, settings: Any) -> None:
    job_ids = ids(2)
    filler = '"' + "x" * (settings.max_body_bytes // 2) + '"'
    response = await post_items(client, [item(job_id, filler) for job_id in job_ids])
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"


async def test_not_json_is_415(client: Client) -> None:
    response = await client.post(BATCH, content=b'{"items": []}', headers={"Content-Type": "text/plain"})
    assert response.status_code == 415


async def test_conditions_per_item(client: Client, database_url: str) -> None:
    existing, fresh = ids(2)
    etag = (await client.put(f"/v1/job-results/{existing}", json={"status": "failed", "result": 1})).headers["etag"]
    ok = await post_items(client, [item(existing, "2", if_match=etag), item(fresh, "3", if_none_match="*")])
    assert ok.status_code == 200, ok.text
    assert [e["outcome"] for e in ok.json()["items"]] == ["replaced", "created"]
    new_etag = ok.json()["items"][0]["etag"]
    [other] = ids(1)
    stale = await post_items(client, [item(other), item(existing, "4", if_match=etag)])
    assert stale.status_code == 412
    [error] = stale.json()["errors"]
    assert (error["index"], error["job_id"]) == (1, existing)
    assert count_stored(database_url, [other]) == 0  # written before the failed item, rolled back
    taken = await post_items(client, [item(fresh, if_none_match="*")])
    assert taken.status_code == 412
    assert (await client.get(f"/v1/job-results/{existing}")).headers["etag"] == new_etag
    assert await stored_text(client, fresh) == b"3"


async def test_get_is_405_with_allow(client: Client) -> None:
    response = await client.get(BATCH)
    assert response.status_code == 405
    assert response.headers["allow"] == "POST, OPTIONS"
    assert response.headers["content-type"] == "application/problem+json"
    options = await client.options(BATCH)
    assert options.headers["allow"] == "POST, OPTIONS"


async def test_put_by_id_is_untouched_by_the_batch_route(client: Client) -> None:
    """``job-results:batch`` is also a valid job id; a PUT to it is an ordinary job result."""
    response = await client.put("/v1/job-results/job-results:batch", json={"status": "failed", "result": 1})
    assert response.status_code in (200, 201)


async def test_batch_needs_results_write(client: Client, database_url: str) -> None:
    from tests.conftest import make_token

    token = make_token(database_url, ("results:read",))
    [job_id] = ids(1)
    response = await client.post(
        BATCH, content=b'{"items": [' + item(job_id) + b"]}", headers={**JSON, "Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 403


@pytest.fixture
async def webhook(client: Client) -> AsyncIterator[dict[str, Any]]:
    response = await client.post("/v1/webhooks", json={"url": "https://1.1.1.1/hook", "events": list(EVENT_TYPES)})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    yield created
    await client.delete(f"/v1/webhooks/{created['id']}")


def outbox(database_url: str, webhook_id: str) -> list[tuple[str, dict[str, Any]]]:
    with connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT o.event_type, o.payload FROM webhook_outbox o JOIN webhook_endpoints e ON e.id = o.endpoint_id "
            "WHERE e.webhook_id = %s ORDER BY o.id",
            (webhook_id,),
        )
        return [(kind, json.loads(payload)["data"]) for kind, payload in cur.fetchall()]


async def test_one_event_per_item_and_none_for_a_refused_batch(
    client: Client, database_url: str, webhook: dict[str, Any]
) -> None:
    existing, fresh, other = ids(3)
    assert (await client.put(f"/v1/job-results/{existing}", json={"status": "failed", "result": 1})).status_code == 201
    before = len(outbox(database_url, webhook["id"]))
    response = await post_items(client, [item(fresh), item(existing, status="cancelled")])
    assert response.status_code == 200
    events = outbox(database_url, webhook["id"])[before:]
    assert sorted((kind, data["job_id"]) for kind, data in events) == sorted(
        [("job_result.created", fresh), ("job_result.replaced", existing)]
    )
    by_id = {data["job_id"]: data for _, data in events}
    for entry in response.json()["items"]:
        assert by_id[entry["job_id"]]["etag"] == entry["etag"]
    assert by_id[existing]["status"] == "cancelled"
    refused = await post_items(client, [item(other), item(fresh, "[1,")])
    assert refused.status_code == 400
    stale = await post_items(client, [item(other), item(existing, if_match='"0.0"')])
    assert stale.status_code == 412
    assert len(outbox(database_url, webhook["id"])) == before + 2


REAL = sorted(p for p in REALDATA.glob("*/*.json") if p.name != "govulncheck-json-stream.json")


@pytest.mark.skipif(not REAL, reason="no real data")
async def test_real_documents_in_one_batch(client: Client) -> None:
    """Every real document of ../shared/realdata in one batch (a body over 64 KiB: checked in a thread)."""
    chosen: list[Path] = []
    size = 0
    for path in sorted(REAL, key=lambda p: p.stat().st_size):
        if size + path.stat().st_size > 12 * 1024 * 1024:
            break
        chosen.append(path)
        size += path.stat().st_size
    job_ids = ids(len(chosen))
    items = [item(job_id, path.read_text()) for job_id, path in zip(job_ids, chosen, strict=True)]
    response = await post_items(client, items)
    assert response.status_code == 200, response.text[:2000]
    assert sum(len(i) for i in items) > 64 * 1024
    for job_id, path in zip(job_ids, chosen, strict=True):
        read = await client.get(f"/v1/job-results/{job_id}")
        assert read.json()["result"] == json.loads(path.read_bytes()), path.name


def empty_objects_items(job_ids: list[str], size: int) -> bytes:
    """A batch of about ``size`` bytes whose results are arrays of ``{}``: the checker's worst case."""
    per_item = (size // len(job_ids) - 60) // 3
    result = b"[" + b"{}," * (per_item - 1) + b"{}]"
    return b'{"items": [' + b", ".join(item(job_id, result.decode()) for job_id in job_ids) + b"]}"


async def test_loop_keeps_answering_while_a_large_batch_is_checked(
    settings: Settings, database_url: str, auth_headers: dict[str, str]
) -> None:
    job_ids = ids(500)
    body = empty_objects_items(job_ids, 8 * 1024 * 1024)
    async with same_loop_client(settings, database_url, auth_headers) as client:
        post = asyncio.create_task(client.post(BATCH, content=body, headers=JSON))
        answered, longest_gap = 0, 0.0
        loop = asyncio.get_running_loop()
        last = loop.time()
        while not post.done():
            await asyncio.sleep(0.01)
            assert (await client.get("/healthz")).status_code == 200
            now = loop.time()
            longest_gap, last = max(longest_gap, now - last), now
            answered += not post.done()
        response = await post
        assert response.status_code == 200, response.text[:500]
        assert answered >= 3
        assert longest_gap < 1.0  # loose (a loaded machine); checked on the loop it would be seconds
        assert len(response.json()["items"]) == 500
    assert count_stored(database_url, job_ids) == 500


async def test_large_batch_refusals_name_items_and_store_nothing(client: Client, database_url: str) -> None:
    """Over 64 KiB the checks run in a thread (large items by the streaming check); the rule is the same."""
    job_ids = ids(4)
    big = '{"rows": [' + ", ".join(f'{{"n": {n}, "s": "{"x" * 40}"}}' for n in range(3000)) + "]}"
    bad = big[:-2] + ', {"n": 1, "n": 2}]}'
    response = await post_items(
        client, [item(job_ids[0], big), item(job_ids[1], bad), item(job_ids[2], "1e999"), item(job_ids[3], big)]
    )
    assert response.status_code == 422, response.text[:500]
    errors = response.json()["errors"]
    assert [(e["index"], e["job_id"], e["json_path"]) for e in errors] == [
        (1, job_ids[1], "$.items[1].result.rows[3000].n"),
        (2, job_ids[2], "$.items[2].result"),
    ]
    assert count_stored(database_url, job_ids) == 0


async def test_an_item_over_max_allowed_packet_is_413_before_any_check(
    settings: Settings, database_url: str, auth_headers: dict[str, str]
) -> None:
    """The packet size is read once per process; here the app is told 1 MiB, as a server set so would say."""
    small, large, broken = ids(3)
    body = (
        b'{"items": ['
        + b", ".join([item(small), item(large, '"' + "x" * 1_100_000 + '"'), item(broken, '{"a": 1, "a": 1}')])
        + b"]}"
    )
    async with same_loop_client(settings, database_url, auth_headers) as client:
        client_app: Any = client._transport.app  # type: ignore[attr-defined]
        client_app.state.max_allowed_packet = 1024 * 1024
        response = await client.post(BATCH, content=body, headers=JSON)
    assert response.status_code == 413, response.text[:500]
    problem = response.json()
    assert problem["type"].endswith("/too-large-for-database")
    # Only the item that cannot fit is named: the fidelity check (which would refuse item 2) never ran.
    assert [(e["index"], e["job_id"]) for e in problem["errors"]] == [(1, large)]
    assert count_stored(database_url, [small, large, broken]) == 0


async def test_create_many_inserts_every_row_or_none(db: Database, database_url: str) -> None:
    taken, first, second = ids(3)
    await db.run(lambda conn: JobResultRepository(conn).create(taken, "failed", "1"))
    with pytest.raises(JobResultExists):
        await db.run(
            lambda conn: JobResultRepository(conn).create_many(
                [NewJobResult(first, "succeeded", "2"), NewJobResult(taken, "succeeded", "3")]
            )
        )
    assert count_stored(database_url, [first]) == 0
    expires = datetime(2099, 1, 2, 3, 4, 5, 678901)
    rows = [
        NewJobResult(first, "succeeded", "[2]", labels={"branch": "main", "tool": "x"}, expires_at=expires),
        NewJobResult(second, "cancelled", '{"x": 3}', pinned=True),
    ]
    metas = await db.run(lambda conn: JobResultRepository(conn).create_many(rows))
    for meta, row in zip(metas, rows, strict=True):
        stored = await db.run(lambda conn, job_id=row.job_id: JobResultRepository(conn).get(job_id))  # type: ignore[misc]
        assert stored.meta == meta
        assert (meta.job_id, meta.status, meta.version) == (row.job_id, row.status, 1)
        # Every field a PUT stores is stored by the multi-row path too.
        assert (stored.meta.expires_at, stored.meta.pinned) == (row.expires_at, row.pinned)
        assert stored.labels == (row.labels or {})


async def test_a_job_seen_stored_but_deleted_since_is_created(db: Database) -> None:
    """``likely_exists`` only saves a round trip: a row deleted in between is created, not lost."""
    [job_id] = ids(1)
    write = JobResultWrite(status="failed", result=msgspec.Raw(b"[1]"))
    meta, created = await db.run(
        lambda conn: store_write(JobResultRepository(conn), job_id, write, "[1]", likely_exists=True)
    )
    assert created
    assert meta.version == 1
    meta, created = await db.run(
        lambda conn: store_write(JobResultRepository(conn), job_id, write, "[1]", likely_exists=True)
    )
    assert not created
    assert meta.version == 2


def test_multi_row_inserts_store_every_field_of_the_put_body() -> None:
    """New rows skip ``store_write`` only while ``create_many`` stores every PUT body field.

    A field added to ``JobResultWrite`` makes every batch item go through ``store_write`` (correct,
    but one round trip or more per row) until ``create_many`` stores it and ``MULTI_ROW_FIELDS`` names it.
    """
    assert JobResultWrite.__struct_fields__ == MULTI_ROW_FIELDS, (
        "JobResultWrite has new fields: store them in JobResultRepository.create_many, then list them in "
        "service.controllers.batch.MULTI_ROW_FIELDS (until then batches write row by row)"
    )


async def test_batch_items_expire_retention_days_after_their_write(client: Client) -> None:
    """As a PUT: ``expires_at`` is the write's own time plus ``retention_days``, on the multi-row path too."""
    new = ids(3)
    items = [
        item(new[0])[:-1] + b', "retention_days": 3}',
        item(new[1])[:-1] + b', "pinned": true}',
        item(new[2]),
    ]
    assert (await post_items(client, items)).status_code == 200
    first = (await client.get(f"/v1/job-results/{new[0]}")).json()
    written = datetime.fromisoformat(first["updated_at"].replace("Z", "+00:00"))
    assert first["expires_at"] == (written + timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    pinned = (await client.get(f"/v1/job-results/{new[1]}")).json()
    assert (pinned["pinned"], pinned["expires_at"]) == (True, None)
    assert (await client.get(f"/v1/job-results/{new[2]}")).json()["expires_at"] is None
