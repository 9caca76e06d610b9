"""Every real job-result document in ../shared/realdata goes in with PUT and comes back equal with GET."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from httpx import Response
from litestar import Litestar
from litestar.testing import AsyncTestClient

from tests.conftest import REALDATA

Client = AsyncTestClient[Litestar]

JSON_FILES = sorted(REALDATA.glob("*/*.json"))
NDJSON_FILES = sorted(REALDATA.glob("*/*.ndjson"))
STREAMS = {"govulncheck-json-stream.json"}
"""Concatenated JSON streams (``govulncheck -json``): not one document, so PUT refuses them as-is."""

if os.environ.get("CI") and not JSON_FILES:
    raise RuntimeError(f"real data missing at {REALDATA}; set JOBRESULTS_REALDATA")


def decode_stream(text: str) -> list[object]:
    decoder = json.JSONDecoder()
    items, index = [], 0
    while index < len(text):
        while index < len(text) and text[index].isspace():
            index += 1
        if index == len(text):
            break
        item, index = decoder.raw_decode(text, index)
        items.append(item)
    return items


async def put_bytes(client: Client, job_id: str, document: bytes) -> Response:
    content = b'{"status": "succeeded", "result": ' + document + b"}"
    return await client.put(f"/v1/job-results/{job_id}", content=content, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("path", [p for p in JSON_FILES if p.name not in STREAMS], ids=lambda p: p.name)
async def test_json_file_roundtrips(client: Client, job_id: str, path: Path) -> None:
    raw = path.read_bytes()
    stored = await put_bytes(client, job_id, raw)
    assert stored.status_code == 201, stored.text
    read = await client.get(f"/v1/job-results/{job_id}")
    assert read.status_code == 200
    assert read.json()["result"] == json.loads(raw)


@pytest.mark.parametrize("path", [p for p in JSON_FILES if p.name in STREAMS], ids=lambda p: p.name)
async def test_json_stream_is_refused_whole_and_kept_as_array(client: Client, job_id: str, path: Path) -> None:
    raw = path.read_bytes()
    refused = await put_bytes(client, job_id, raw)
    assert refused.status_code == 400
    assert "line" in refused.json()["detail"]
    items = decode_stream(raw.decode())
    assert len(items) > 1
    stored = await client.put(f"/v1/job-results/{job_id}", json={"status": "failed", "result": items})
    assert stored.status_code == 201
    assert (await client.get(f"/v1/job-results/{job_id}")).json()["result"] == items


@pytest.mark.parametrize("path", NDJSON_FILES, ids=lambda p: p.name)
async def test_ndjson_file_roundtrips_as_array(client: Client, job_id: str, path: Path) -> None:
    lines = [line for line in path.read_bytes().splitlines() if line.strip()]
    document = b"[" + b",".join(lines) + b"]"
    stored = await put_bytes(client, job_id, document)
    assert stored.status_code == 201, stored.text
    read = await client.get(f"/v1/job-results/{job_id}")
    assert read.json()["result"] == [json.loads(line) for line in lines]
