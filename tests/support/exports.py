"""Waiting for an export through the API, as a client polls it."""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Litestar
from litestar.testing import AsyncTestClient


async def wait_done(client: AsyncTestClient[Litestar], export_id: str, limit_s: float = 30) -> dict[str, Any]:
    """Poll ``GET /v1/exports/{export_id}`` every 50 ms until it finished: ``succeeded``, ``failed`` or ``cancelled``.

    Returns the final record. Raises ``AssertionError`` when a poll is not 200 or after ``limit_s`` s.
    """
    deadline = asyncio.get_running_loop().time() + limit_s
    while True:
        response = await client.get(f"/v1/exports/{export_id}")
        assert response.status_code == 200, response.text
        record: dict[str, Any] = response.json()
        if record["state"] in ("succeeded", "failed", "cancelled"):
            return record
        assert asyncio.get_running_loop().time() < deadline, f"export {export_id} did not finish: {record}"
        await asyncio.sleep(0.05)
