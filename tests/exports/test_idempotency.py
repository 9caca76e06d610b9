"""Idempotency-Key on the export POSTs: replays, reuse, concurrency, scope, expiry, atomicity with the export."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import httpx
import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from prometheus_client import REGISTRY

from config.settings import Settings
from exports.pipeline import ExportService
from repositories.database import Database
from repositories.domain import utcnow
from repositories.exports import ExportParameters
from service.app import create_app
from service.idempotency import Claim, IdempotencyKeys, request_hash
from service.problems import ApiError
from tests.conftest import connect, make_token

Client = AsyncTestClient[Litestar]
WIDE = {"format": "ndjson", "created_from": "2000-01-01T00:00:00Z", "created_to": "2100-01-01T00:00:00Z"}


def key_id_of(token: str) -> str:
    return token.split("_")[1]


@pytest.fixture
def token(database_url: str) -> str:
    """A key of this test's own, so its exports and idempotency keys are its own."""
    return make_token(database_url)


@pytest.fixture
def own(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def exports_of(database_url: str, token: str) -> list[str]:
    with connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT export_id FROM exports WHERE requested_by = %s ORDER BY id", (f"key:{key_id_of(token)}",))
        return [row[0] for row in cur.fetchall()]


def stored_key(database_url: str, token: str, key: str) -> tuple[Any, ...] | None:
    with connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT state, export_id, status_code FROM idempotency_keys WHERE owner = %s AND idempotency_key = %s",
            (f"key:{key_id_of(token)}", key),
        )
        row: tuple[Any, ...] | None = cur.fetchone()
        return row


def replays() -> float:
    return REGISTRY.get_sample_value("jobresults_idempotent_replays_total") or 0.0


async def put_job(client: Client, job_id: str) -> None:
    response = await client.put(f"/v1/job-results/{job_id}", json={"status": "succeeded", "result": {"n": 1}})
    assert response.status_code in (200, 201), response.text


async def test_a_replay_returns_the_first_response_and_the_export_runs_once(
    client: Client, own: dict[str, str], token: str, database_url: str, job_id: str
) -> None:
    await put_job(client, job_id)
    headers = {**own, "Idempotency-Key": "order-1"}
    first = await client.post(f"/v1/job-results/{job_id}/exports", json={"format": "csv"}, headers=headers)
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    before = replays()
    again = await client.post(f"/v1/job-results/{job_id}/exports", json={"format": "csv"}, headers=headers)
    assert again.status_code == 201
    assert again.content == first.content
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["content-type"] == first.headers["content-type"]
    assert again.headers["idempotent-replayed"] == "true"
    assert replays() == before + 1
    assert exports_of(database_url, token) == [first.json()["export_id"]]
    assert stored_key(database_url, token, "order-1") == ("done", first.json()["export_id"], 201)


async def test_a_range_export_is_queued_once(
    client: Client, own: dict[str, str], token: str, database_url: str
) -> None:
    headers = {**own, "Idempotency-Key": "range-1"}
    first = await client.post("/v1/exports", json=WIDE, headers=headers)
    assert first.status_code == 202, first.text
    again = await client.post("/v1/exports", json=WIDE, headers=headers)
    assert (again.status_code, again.content, again.headers["location"]) == (
        202,
        first.content,
        first.headers["location"],
    )
    assert again.headers["idempotent-replayed"] == "true"
    assert exports_of(database_url, token) == [first.json()["export_id"]]
    # Without a key, every POST is a new export.
    assert (await client.post("/v1/exports", json=WIDE, headers=own)).status_code == 202
    assert len(exports_of(database_url, token)) == 2


async def test_the_same_key_with_another_request_is_422(
    client: Client, own: dict[str, str], token: str, database_url: str, job_id: str
) -> None:
    await put_job(client, job_id)
    headers = {**own, "Idempotency-Key": "order-2"}
    first = await client.post(f"/v1/job-results/{job_id}/exports", json={"format": "json"}, headers=headers)
    assert first.status_code == 201
    other_body = await client.post(f"/v1/job-results/{job_id}/exports", json={"format": "csv"}, headers=headers)
    assert other_body.status_code == 422, other_body.text
    assert other_body.headers["content-type"].startswith("application/problem+json")
    assert other_body.json()["type"].endswith("/idempotency-key-reused")
    # The same fields in another order (or other white space) are another raw body, hence another request.
    reordered = await client.post(
        f"/v1/job-results/{job_id}/exports",
        content=b'{"compression": "none", "format": "json"}',
        headers={**headers, "Content-Type": "application/json"},
    )
    assert reordered.status_code == 422
    other_path = await client.post("/v1/exports", json=WIDE, headers=headers)
    assert other_path.status_code == 422
    assert exports_of(database_url, token) == [first.json()["export_id"]]


async def test_keys_are_scoped_to_the_api_key(client: Client, database_url: str, job_id: str) -> None:
    await put_job(client, job_id)
    tokens = [make_token(database_url), make_token(database_url)]
    answers = [
        await client.post(
            f"/v1/job-results/{job_id}/exports",
            json={"format": "json"},
            headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "shared-name"},
        )
        for token in tokens
    ]
    assert [answer.status_code for answer in answers] == [201, 201]
    assert all("idempotent-replayed" not in answer.headers for answer in answers)
    assert answers[0].json()["export_id"] != answers[1].json()["export_id"]
    assert [len(exports_of(database_url, token)) for token in tokens] == [1, 1]


async def test_a_key_older_than_24_hours_is_new_again(
    client: Client, own: dict[str, str], token: str, database_url: str
) -> None:
    headers = {**own, "Idempotency-Key": "daily"}
    first = await client.post("/v1/exports", json=WIDE, headers=headers)
    assert first.status_code == 202
    with connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE idempotency_keys SET created_at = created_at - INTERVAL 1441 MINUTE, "
            "claimed_at = claimed_at - INTERVAL 1441 MINUTE WHERE owner = %s",
            (f"key:{key_id_of(token)}",),
        )
    again = await client.post("/v1/exports", json=WIDE, headers=headers)
    assert again.status_code == 202
    assert "idempotent-replayed" not in again.headers
    assert again.json()["export_id"] != first.json()["export_id"]
    # ...and, being new, takes another body too once it expired again.
    with connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE idempotency_keys SET created_at = created_at - INTERVAL 1441 MINUTE WHERE owner = %s",
            (f"key:{key_id_of(token)}",),
        )
    other = await client.post("/v1/exports", json={**WIDE, "format": "csv"}, headers=headers)
    assert other.status_code == 202, other.text
    assert len(exports_of(database_url, token)) == 3


@pytest.mark.parametrize(
    "value",
    [b"", b"a" * 256, "é".encode(), b"tab\there", b"del\x7f", b"\xff"],
    ids=["empty", "256 chars", "utf-8", "tab", "DEL", "latin-1"],
)
async def test_an_invalid_key_is_400(client: Client, own: dict[str, str], value: bytes) -> None:
    headers = [*((name.encode(), text.encode()) for name, text in own.items()), (b"Idempotency-Key", value)]
    response = await client.post("/v1/exports", json=WIDE, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["type"].endswith("/invalid-idempotency-key")
    assert "1 to 255 printable ASCII" in response.json()["detail"]


async def test_255_characters_are_fine(client: Client, own: dict[str, str]) -> None:
    longest = await client.post("/v1/exports", json=WIDE, headers={**own, "Idempotency-Key": "~ " + "k" * 253})
    assert longest.status_code == 202, longest.text


async def test_a_4xx_of_the_operation_is_replayed_and_a_429_releases_the_key(
    client: Client, own: dict[str, str], token: str, database_url: str, job_id: str
) -> None:
    headers = {**own, "Idempotency-Key": "missing-job"}
    missing = await client.post(f"/v1/job-results/{job_id}/exports", json={"format": "json"}, headers=headers)
    assert missing.status_code == 404
    await put_job(client, job_id)  # Stripe's semantics: the stored 4xx stands for 24 h
    again = await client.post(f"/v1/job-results/{job_id}/exports", json={"format": "json"}, headers=headers)
    assert (again.status_code, again.content, again.headers["idempotent-replayed"]) == (404, missing.content, "true")
    assert again.headers["content-type"].startswith("application/problem+json")
    # 429 (the key's 10 pending range exports; the session app runs no worker) is not kept.
    for _ in range(10):
        assert (await client.post("/v1/exports", json=WIDE, headers=own)).status_code == 202
    busy = {**own, "Idempotency-Key": "busy"}
    refused = await client.post("/v1/exports", json=WIDE, headers=busy)
    assert refused.status_code == 429
    assert stored_key(database_url, token, "busy") is None
    assert (await client.post("/v1/exports", json=WIDE, headers=busy)).status_code == 429  # runs again


async def test_a_claim_in_progress_is_409_and_a_dead_one_is_taken_over(
    client: Client, own: dict[str, str], token: str, database_url: str, job_id: str
) -> None:
    await put_job(client, job_id)
    path = f"/v1/job-results/{job_id}/exports"
    body = b'{"format":"json"}'
    owner = f"key:{key_id_of(token)}"
    with connect(database_url) as conn, conn.cursor() as cur:
        # A request holding the key right now (its claim is fresh), and one whose process died 2 minutes ago.
        for key, age_s in (("live", 0), ("dead", 120)):
            claimed = utcnow() - timedelta(seconds=age_s)
            cur.execute(
                "INSERT INTO idempotency_keys (owner, idempotency_key, request_sha256, claim, state, created_at, "
                "claimed_at) VALUES (%s, %s, %s, %s, 'started', %s, %s)",
                (owner, key, request_hash("POST", path, body), secrets.token_hex(16), claimed, claimed),
            )
    send = {**own, "Content-Type": "application/json"}
    busy = await client.post(path, content=body, headers={**send, "Idempotency-Key": "live"})
    assert busy.status_code == 409, busy.text
    assert busy.headers["retry-after"] == "1"
    assert busy.json()["type"].endswith("/idempotency-key-in-use")
    taken = await client.post(path, content=body, headers={**send, "Idempotency-Key": "dead"})
    assert taken.status_code == 201, taken.text
    assert exports_of(database_url, token) == [taken.json()["export_id"]]


@asynccontextmanager
async def same_loop(settings: Settings, exports_dir: str, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The app on the test's event loop, so requests overlap (the Litestar test client serializes them)."""
    app = create_app(msgspec.structs.replace(settings, exports_dir=exports_dir, **overrides))
    async with app.lifespan():
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


async def test_concurrent_duplicates_make_one_export_and_a_key_is_sent_once(
    settings: Settings, database_url: str, token: str, own: dict[str, str], exports_dir: Any
) -> None:
    job_id = f"t-{uuid.uuid4().hex}"
    async with same_loop(settings, str(exports_dir)) as client:
        put = await client.put(
            f"/v1/job-results/{job_id}",
            json={"status": "succeeded", "result": {"rows": [{"i": i, "s": "x" * 50} for i in range(3000)]}},
            headers=own,
        )
        assert put.status_code == 201
        headers = {**own, "Idempotency-Key": "race"}
        answers = await asyncio.gather(
            *(
                client.post(f"/v1/job-results/{job_id}/exports", json={"format": "csv"}, headers=headers)
                for _ in range(6)
            )
        )
        # Two Idempotency-Key fields (httpx's ASGI transport keeps them apart; Litestar's test client joins them).
        twice = await client.post(
            "/v1/exports", json=WIDE, headers=[*own.items(), ("Idempotency-Key", "a"), ("Idempotency-Key", "b")]
        )
        assert twice.status_code == 400, twice.text
        assert twice.json()["type"].endswith("/invalid-idempotency-key")
    statuses = sorted(answer.status_code for answer in answers)
    created = [a for a in answers if a.status_code == 201 and "idempotent-replayed" not in a.headers]
    assert len(created) == 1, statuses
    assert all(a.status_code == 409 or (a.status_code == 201 and a.content == created[0].content) for a in answers), (
        statuses
    )
    assert 409 in statuses, "no request overlapped the first"
    assert exports_of(database_url, token) == [created[0].json()["export_id"]]


async def test_a_5xx_releases_the_key(
    settings: Settings, database_url: str, token: str, own: dict[str, str], exports_dir: Any, job_id: str
) -> None:
    """A 507 (the file would pass JOBRESULTS_EXPORT_MAX_BYTES) is not kept: the same key runs the request again."""
    headers = {**own, "Idempotency-Key": "too-big"}
    async with same_loop(settings, str(exports_dir), export_max_bytes=10) as client:
        put = await client.put(
            f"/v1/job-results/{job_id}", json={"status": "failed", "result": {"x": "y" * 100}}, headers=own
        )
        assert put.status_code == 201
        refused = await client.post(f"/v1/job-results/{job_id}/exports", json={"format": "json"}, headers=headers)
        assert refused.status_code == 507, refused.text
        assert stored_key(database_url, token, "too-big") is None
    async with same_loop(settings, str(exports_dir)) as client:
        retried = await client.post(f"/v1/job-results/{job_id}/exports", json={"format": "json"}, headers=headers)
        assert retried.status_code == 201, retried.text
        assert "idempotent-replayed" not in retried.headers
    assert exports_of(database_url, token) == [retried.json()["export_id"]]


async def test_the_export_and_its_key_commit_together(
    db: Database, settings: Settings, token: str, exports_dir: Any
) -> None:
    """A unit that cannot store the key's response (its claim was taken over) records no export either."""
    owner = f"key:{key_id_of(token)}"
    keys = IdempotencyKeys(db, settings.query_timeout_s)
    service = ExportService(db, msgspec.structs.replace(settings, exports_dir=str(exports_dir)))

    claim = await keys.begin(owner, "atomic", request_hash("POST", "/v1/exports", b"{}"))
    assert isinstance(claim, Claim)
    with connect(settings.database_url) as conn, conn.cursor() as cur:
        cur.execute("UPDATE idempotency_keys SET claim = %s WHERE owner = %s", (secrets.token_hex(16), owner))
    with pytest.raises(ApiError) as refused:
        await service.enqueue_range(
            ExportParameters(),
            "json",
            "none",
            owner,
            on_recorded=claim.recorder(lambda export: (202, {}, b"{}")),
        )
    assert refused.value.status == 409
    with connect(settings.database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM exports WHERE requested_by = %s", (owner,))
        assert cur.fetchone() == (0,)


async def test_expired_keys_are_purged(db: Database, settings: Settings, token: str) -> None:
    owner = f"key:{key_id_of(token)}"
    with connect(settings.database_url) as conn, conn.cursor() as cur:
        for key, age in (("old", timedelta(hours=25)), ("young", timedelta(hours=23))):
            at = utcnow() - age
            cur.execute(
                "INSERT INTO idempotency_keys (owner, idempotency_key, request_sha256, claim, state, created_at, "
                "claimed_at) VALUES (%s, %s, %s, %s, 'done', %s, %s)",
                (owner, key, "0" * 64, secrets.token_hex(16), at, at),
            )
    # The session app may purge too (after a claim of another test): judge the rows, not the count.
    await IdempotencyKeys(db, settings.query_timeout_s).purge()
    with connect(settings.database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT idempotency_key FROM idempotency_keys WHERE owner = %s", (owner,))
        assert cur.fetchall() == (("young",),)
