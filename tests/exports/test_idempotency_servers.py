"""Idempotency-Key across two real Granian replicas on one database: duplicates fired at both make one export."""

from __future__ import annotations

import asyncio

import httpx

from tests.conftest import REDIS_URL, connect, fresh_database, make_token
from tests.support.servers import Servers


def test_duplicates_at_two_replicas_make_one_export(servers: Servers, server_url: str) -> None:
    with fresh_database(server_url, "jr_idem") as url:
        token = make_token(url)
        replicas = [
            servers.start(url, workers=2, redis_url=REDIS_URL, export_worker=False, webhooks_worker=False)
            for _ in range(2)
        ]
        headers = {"Authorization": f"Bearer {token}"}
        put = httpx.put(
            f"{replicas[0].base_url}/v1/job-results/idem-1",
            json={"status": "succeeded", "result": {"rows": [{"i": i, "s": "x" * 50} for i in range(3000)]}},
            headers=headers,
        )
        assert put.status_code == 201, put.text

        async def fire() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=30) as client:
                return await asyncio.gather(
                    *(
                        client.post(
                            f"{replicas[i % 2].base_url}/v1/job-results/idem-1/exports",
                            json={"format": "csv"},
                            headers={**headers, "Idempotency-Key": "two-replicas"},
                        )
                        for i in range(10)
                    )
                )

        answers = asyncio.run(fire())
        statuses = sorted(answer.status_code for answer in answers)
        first = [a for a in answers if a.status_code == 201 and "idempotent-replayed" not in a.headers]
        assert len(first) == 1, statuses
        for answer in answers:
            assert answer.status_code == 409 or answer.content == first[0].content, (answer.status_code, answer.text)
        with connect(url) as conn, conn.cursor() as cur:
            cur.execute("SELECT export_id FROM exports")
            assert cur.fetchall() == ((first[0].json()["export_id"],),)
        # Once the first finished, both replicas replay it.
        for replica in replicas:
            again = httpx.post(
                f"{replica.base_url}/v1/job-results/idem-1/exports",
                json={"format": "csv"},
                headers={**headers, "Idempotency-Key": "two-replicas"},
            )
            assert (again.status_code, again.content, again.headers["idempotent-replayed"]) == (
                201,
                first[0].content,
                "true",
            )
