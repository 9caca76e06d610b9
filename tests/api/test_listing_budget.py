"""``GET /v1/job-results?include=result`` pages end at a byte budget (``JOBRESULTS_LIST_MAX_BYTES``),
never skip a row, and always hold at least one (issue 12 item 4), with real multi-megabyte documents."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from config.settings import Settings
from repositories.database import Database
from service.app import create_app
from tests.conftest import REALDATA, fresh_database, make_token

Client = AsyncTestClient[Litestar]

LARGE = [
    REALDATA / "grype" / "grype-many-vulns-large.json",
    REALDATA / "lighthouse" / "lighthouse-flow-result-sample.json",
]
"""Real documents of 3.3 MB and 1.8 MB."""


class _Item(msgspec.Struct):
    job_id: str
    result: msgspec.Raw


class _Page(msgspec.Struct):
    items: list[_Item]
    next_cursor: str | None


DOCUMENTS = [LARGE[0], LARGE[1], LARGE[0], LARGE[0], LARGE[1], LARGE[0]]
"""About 16.6 MB in all: more than two pages of the default 8 MiB budget."""


@pytest.fixture(scope="module")
def own_url(server_url: str) -> Iterator[str]:
    """A database of its own holding only :data:`DOCUMENTS`, so pages hold nothing else."""
    with fresh_database(server_url, "jr_budget") as url:
        yield url


@pytest.fixture(scope="module")
async def stored(settings: Settings, own_url: str) -> dict[str, object]:
    """``job_id -> document`` of :data:`DOCUMENTS`, stored with PUT in that order."""
    async with _client(settings, own_url) as (client, _app):
        return await _store(client, DOCUMENTS)


@asynccontextmanager
async def _client(settings: Settings, url: str, **overrides: object) -> AsyncIterator[tuple[Client, Litestar]]:
    app = create_app(msgspec.structs.replace(settings, database_url=url, export_worker=False, **overrides))
    async with AsyncTestClient(app=app) as client:
        client.headers.update({"Authorization": f"Bearer {make_token(url)}"})
        yield client, app


async def _store(client: Client, documents: list[Path]) -> dict[str, object]:
    stored: dict[str, object] = {}
    for i, path in enumerate(documents):
        job_id = f"big-{i:02d}-{path.stem}"
        body = b'{"status": "succeeded", "result": ' + path.read_bytes() + b"}"
        response = await client.put(
            f"/v1/job-results/{job_id}", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 201, response.text
        stored[job_id] = json.loads(path.read_bytes())
    return stored


async def _pages(client: Client, limit: int) -> list[_Page]:
    pages: list[_Page] = []
    cursor: str | None = None
    while True:
        params = {"include": "result", "limit": str(limit)} | ({"cursor": cursor} if cursor else {})
        response = await client.get("/v1/job-results", params=params)
        assert response.status_code == 200
        page = msgspec.json.decode(response.content, type=_Page)
        pages.append(page)
        cursor = page.next_cursor
        if cursor is None:
            return pages


async def test_pages_stop_at_the_byte_budget_and_skip_nothing(
    settings: Settings, own_url: str, stored: dict[str, object]
) -> None:
    async with _client(settings, own_url) as (client, app):
        budget = app.state.settings.list_max_bytes
        assert budget == 8 * 1024 * 1024  # the documented default
        pages = await _pages(client, limit=1000)
        db: Database = app.state.db
        assert db.pool.size - db.pool.freesize == 0  # pages cut short gave their connections back
    assert len(pages) > 1  # 16.6 MB cannot fit one 8 MiB page
    seen = [item.job_id for page in pages for item in page.items]
    assert seen == sorted(stored)  # oldest first, each exactly once
    for page, following in itertools.pairwise(pages):
        sizes = [len(item.result) for item in page.items]
        assert sum(sizes) <= budget
        assert sum(sizes) + len(following.items[0].result) > budget  # stopped only for want of room
    for page in pages:
        for item in page.items:
            assert msgspec.json.decode(item.result) == stored[item.job_id]


async def test_a_document_above_the_budget_comes_alone(
    settings: Settings, own_url: str, stored: dict[str, object]
) -> None:
    async with _client(settings, own_url, list_max_bytes=1_000_000) as (client, _app):
        pages = await _pages(client, limit=3)
    big = [page for page in pages if any(item.job_id.endswith(LARGE[0].stem) for item in page.items)]
    assert big
    assert all(len(page.items) == 1 for page in big)
    assert [item.job_id for page in pages for item in page.items] == sorted(stored)


async def test_metadata_pages_are_not_cut_by_bytes(settings: Settings, own_url: str, stored: dict[str, object]) -> None:
    async with _client(settings, own_url, list_max_bytes=1) as (client, _app):
        page = (await client.get("/v1/job-results", params={"limit": "4"})).json()
    assert len(page["items"]) == 4
    assert page["next_cursor"] is not None
