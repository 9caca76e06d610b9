"""Long-polling ``GET /v1/exports/{id}?wait=N`` in-process: wake-ups, time-outs, limits, disconnects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from litestar import Litestar

from config.settings import Settings
from exports.pipeline import ExportService
from exports.waits import ExportWaits
from service.app import create_app
from tests.conftest import fresh_database, make_token

Client = httpx.AsyncClient
WIDE = {"created_from": "2000-01-01T00:00:00Z", "created_to": "2100-01-01T00:00:00Z"}


@pytest.fixture(scope="module")
def wait_database(server_url: str) -> Iterator[str]:
    """A database of this module's own: the tests run the export worker's step by hand on it."""
    with fresh_database(server_url, "jr_wait") as url:
        yield url


@pytest.fixture
def wait_settings(settings: Settings, wait_database: str, exports_dir: Path) -> Settings:
    """No background worker, and a poll too slow to matter (30 s): only wake-ups answer early."""
    return msgspec.structs.replace(
        settings, database_url=wait_database, exports_dir=str(exports_dir), export_wait_poll_s=30.0
    )


@asynccontextmanager
async def same_loop(settings: Settings, **overrides: Any) -> AsyncIterator[tuple[Client, Litestar]]:
    """The app on the test's own event loop, so requests overlap as on a real worker (Litestar's test
    client serves one request at a time from another thread). Not a fixture: the lifespan must end in
    the task it began in."""
    app = create_app(msgspec.structs.replace(settings, **overrides))
    async with app.lifespan():
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        headers = {"Authorization": f"Bearer {make_token(settings.database_url)}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers) as client:
            yield client, app


async def _queued(client: Client) -> str:
    response = await client.post("/v1/exports", json={"format": "ndjson", **WIDE})
    assert response.status_code == 202, response.text
    assert response.json()["state"] == "queued"
    export_id: str = response.json()["export_id"]
    return export_id


async def _until(check: Callable[[], bool], limit_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def drain(exports: ExportService) -> None:
    """Run the worker's step until no range export is queued (earlier tests leave some queued)."""
    ran = 0
    while await exports.run_next():
        ran += 1
    assert ran


def _waits(app: Litestar) -> ExportWaits:
    waits: ExportWaits = app.state.export_waits
    return waits


async def test_a_waiter_answers_as_soon_as_the_worker_finishes(wait_settings: Settings) -> None:
    async with same_loop(wait_settings) as (client, app):
        await client.put("/v1/job-results/wait-1", json={"status": "succeeded", "result": {"n": 1}})
        export_id = await _queued(client)
        loop = asyncio.get_running_loop()
        started = loop.time()
        request = asyncio.create_task(client.get(f"/v1/exports/{export_id}", params={"wait": "20"}))
        await _until(lambda: _waits(app).count == 1)
        exports: ExportService = app.state.exports
        await drain(exports)  # the worker's steps: claim, write, settle
        finished = loop.time()
        response = await request
        answered = loop.time()
        assert response.status_code == 200, response.text
        assert response.json()["state"] == "succeeded"
        assert response.json()["content_url"] == f"/v1/exports/{export_id}/content"
        assert answered - finished < 1.0, "the waiter was not woken when the export settled"
        assert answered - started < 10
        assert _waits(app).count == 0


async def test_a_waiter_answers_with_the_current_state_after_n_seconds(wait_settings: Settings) -> None:
    async with same_loop(wait_settings) as (client, app):
        export_id = await _queued(client)
        loop = asyncio.get_running_loop()
        started = loop.time()
        response = await client.get(f"/v1/exports/{export_id}", params={"wait": "2"})
        elapsed = loop.time() - started
        assert response.status_code == 200, response.text
        assert response.json()["state"] == "queued"
        assert 2.0 <= elapsed < 3.5, elapsed
        assert _waits(app).count == 0
        # wait=0 (and no wait) answers at once
        started = loop.time()
        assert (await client.get(f"/v1/exports/{export_id}", params={"wait": "0"})).json()["state"] == "queued"
        assert loop.time() - started < 1.0


async def test_a_settled_export_answers_at_once_and_unknown_ones_404(wait_settings: Settings) -> None:
    async with same_loop(wait_settings) as (client, app):
        await client.put("/v1/job-results/wait-2", json={"status": "succeeded", "result": {}})
        done = await client.post("/v1/job-results/wait-2/exports", json={"format": "json"})
        assert done.status_code == 201
        loop = asyncio.get_running_loop()
        started = loop.time()
        response = await client.get(f"/v1/exports/{done.json()['export_id']}", params={"wait": "30"})
        assert response.status_code == 200
        assert response.json() == done.json()
        assert loop.time() - started < 1.0
        missing = await client.get(f"/v1/exports/{'0' * 32}", params={"wait": "30"})
        assert missing.status_code == 404
        assert missing.json()["type"].endswith("/export-not-found")
        assert _waits(app).count == 0


@pytest.mark.parametrize("value", ["61", "-1", "1.5", "abc", "", "007", "1e1"])
async def test_wait_must_be_whole_seconds_from_0_to_60(wait_settings: Settings, value: str) -> None:
    async with same_loop(wait_settings) as (client, _):
        response = await client.get(f"/v1/exports/{'0' * 32}", params={"wait": value})
        assert response.status_code == 400, response.text
        problem = response.json()
        assert problem["errors"] == [
            {"name": "wait", "source": "query", "message": problem["errors"][0]["message"]},
        ]
        assert "from 0 to 60" in problem["errors"][0]["message"]


async def test_the_poll_finds_exports_settled_elsewhere_when_redis_is_down(wait_settings: Settings) -> None:
    """No message arrives (Redis unreachable, the settling process unknown): the poll answers within ~1 s."""
    async with same_loop(
        wait_settings,
        export_wait_poll_s=0.5,
        redis_url="redis://127.0.0.1:1/0",  # nothing listens there
        rate_limit_enabled=False,
    ) as (client, app):
        await client.put("/v1/job-results/wait-3", json={"status": "succeeded", "result": {"n": 3}})
        export_id = await _queued(client)
        request = asyncio.create_task(client.get(f"/v1/exports/{export_id}", params={"wait": "20"}))
        await _until(lambda: _waits(app).count == 1)
        # Another replica (a service of its own, announcing to nobody) finishes the export.
        other = ExportService(app.state.db, app.state.settings)
        await drain(other)
        loop = asyncio.get_running_loop()
        finished = loop.time()
        response = await request
        assert response.json()["state"] == "succeeded"
        assert loop.time() - finished < 0.5 + 1.0
        assert _waits(app).count == 0


async def test_waiters_are_bounded_per_process(wait_settings: Settings) -> None:
    async with same_loop(wait_settings, export_wait_max=2) as (client, app):
        export_id = await _queued(client)
        held = [asyncio.create_task(client.get(f"/v1/exports/{export_id}", params={"wait": "3"})) for _ in range(2)]
        await _until(lambda: _waits(app).count == 2)
        refused = await client.get(f"/v1/exports/{export_id}", params={"wait": "3"})
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["type"].endswith("/too-many-waiters")
        assert (await client.get(f"/v1/exports/{export_id}")).status_code == 200  # no wait: not counted
        for task in held:
            assert (await task).status_code == 200
        assert _waits(app).count == 0
        assert (await client.get(f"/v1/exports/{export_id}", params={"wait": "1"})).status_code == 200


async def test_a_waiting_request_counts_against_the_rate_limit(wait_settings: Settings) -> None:
    async with same_loop(wait_settings) as (client, _):
        export_id = await _queued(client)
        limited = {"Authorization": f"Bearer {make_token(wait_settings.database_url, rate_limit='2/minute')}"}
        for _ in range(2):
            waited = await client.get(f"/v1/exports/{export_id}", params={"wait": "1"}, headers=limited)
            assert waited.status_code == 200
        refused = await client.get(f"/v1/exports/{export_id}", params={"wait": "1"}, headers=limited)
        assert refused.status_code == 429, refused.text


async def test_a_client_that_hangs_up_stops_waiting(wait_settings: Settings) -> None:
    """Drive the app as Granian does when the client closes the socket while its request waits."""
    async with same_loop(wait_settings) as (client, app):
        export_id = await _queued(client)
        token = client.headers["authorization"].encode()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": f"/v1/exports/{export_id}",
            "raw_path": f"/v1/exports/{export_id}".encode(),
            "root_path": "",
            "query_string": b"wait=60",
            "headers": [(b"host", b"testserver"), (b"authorization", token)],
            "client": ("127.0.0.1", 40001),
            "server": ("127.0.0.1", 8000),
            "state": {},
        }
        hang_up = asyncio.Event()
        received: list[str] = []

        async def receive() -> dict[str, Any]:
            if not received:
                received.append("request")
                return {"type": "http.request", "body": b"", "more_body": False}
            await hang_up.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            pass

        loop = asyncio.get_running_loop()
        handler = asyncio.create_task(app(scope, receive, send))  # type: ignore[arg-type]
        await _until(lambda: _waits(app).count == 1)
        hung_up = loop.time()
        hang_up.set()
        await asyncio.wait_for(handler, 5)
        assert loop.time() - hung_up < 1.0
        assert _waits(app).count == 0
