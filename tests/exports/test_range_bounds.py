"""Numbers in a Range header are bounded: a huge one gets 416 or the whole file, never a 5xx."""

from __future__ import annotations

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

Client = AsyncTestClient[Litestar]
HUGE = "9" * 5000  # past CPython's 4300-digit limit on int(str)


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (f"bytes={HUGE}-", 416),  # starts past the end
        (f"bytes={HUGE}-{HUGE}", 416),
        (f"bytes=0-{HUGE}", 200),  # to the end: the whole file
        (f"bytes=-{HUGE}", 200),  # a suffix longer than the file: the whole file
        (f"bytes=10-{HUGE}", 206),
        (f"bytes={'0' * 5000}5-9", 206),  # leading zeros are still a small number
    ],
)
async def test_huge_range_numbers(client: Client, job_id: str, header: str, status: int) -> None:
    response = await client.put(f"/v1/job-results/{job_id}", json={"status": "succeeded", "result": "x" * 100})
    assert response.status_code == 201
    record = (await client.post(f"/v1/job-results/{job_id}/exports", json={"format": "json"})).json()
    full = (await client.get(record["content_url"])).content
    response = await client.get(record["content_url"], headers={"Range": header})
    assert response.status_code == status, response.text
    if status == 200:
        assert response.content == full
    elif status == 206:
        start = 5 if "0000" in header else 10
        assert response.content == full[start : 10 if start == 5 else None]
    else:
        assert response.headers["content-range"] == f"bytes */{len(full)}"
        assert response.headers["content-type"] == "application/problem+json"
