"""A document larger than the server's max_allowed_packet is a clear 413, and loses nothing stored."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from config.settings import Settings
from service.app import create_app
from tests.support.database import connect


@pytest.fixture
def small_packet_limit(server_url: str) -> Iterator[None]:
    with connect(server_url, database=False) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT @@GLOBAL.max_allowed_packet")
            (before,) = cur.fetchone()
            cur.execute("SET GLOBAL max_allowed_packet = 1048576")  # only new connections see it
        try:
            yield
        finally:
            with conn.cursor() as cur:
                cur.execute(f"SET GLOBAL max_allowed_packet = {int(before)}")


async def test_document_above_max_allowed_packet_is_413(
    small_packet_limit: None, settings: Settings, exports_dir: Path, job_id: str, auth_headers: dict[str, str]
) -> None:
    app = create_app(
        Settings.from_env(
            {}, database_url=settings.database_url, log_level="error", export_worker=False, exports_dir=str(exports_dir)
        )
    )
    async with AsyncTestClient(app=app) as client:
        client.headers.update(auth_headers)
        url = f"/v1/job-results/{job_id}"
        assert (await client.put(url, json={"status": "succeeded", "result": {"small": True}})).status_code == 201
        big = {"status": "failed", "result": {"blob": "x" * 2_000_000}}
        response = await client.put(url, json=big)
        assert response.status_code == 413
        assert response.headers["content-type"] == "application/problem+json"
        assert "max_allowed_packet" in response.json()["detail"]
        kept = await client.get(url)
        assert kept.status_code == 200
        assert kept.json()["result"] == {"small": True}
