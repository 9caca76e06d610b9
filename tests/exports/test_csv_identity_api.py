"""CSV range exports through the API, full and with chosen columns: the bytes of the reference writer.

The rows and their stored text come from a json export of the same range (``result`` is the stored
text, embedded unchanged), so the check holds on both engines whatever each stores.
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from litestar import Litestar
from litestar.testing import AsyncTestClient

from exports.formats import ExportRow
from tests.conftest import REALDATA
from tests.exports.csv_reference import lines, reference_csv
from tests.support.exports import wait_done

Client = AsyncTestClient[Litestar]
csv.field_size_limit(2**31 - 1)  # the long cell is larger than the reader's default limit of 128 KiB
REAL_FILES = sorted(p for p in REALDATA.glob("*/*.json") if p.name != "govulncheck-json-stream.json")
LONG = 'a "quoted", line\r\nbreak é 😀 ' * 80_000  # about 2 MiB: quoted in several slices


class _Item(msgspec.Struct):
    job_id: str
    status: str
    created_at: str
    result: msgspec.Raw


def stamp(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def export(client: Client, body: dict[str, Any]) -> bytes:
    response = await client.post("/v1/exports", json=body)
    assert response.status_code == 202, response.text
    record = await wait_done(client, response.json()["export_id"])
    assert record["state"] == "succeeded", record
    content = await client.get(record["content_url"])
    assert content.status_code == 200
    return content.content


async def test_range_csv_full_and_chosen_give_the_reference_bytes(worker_client: Client, job_id: str) -> None:
    start = datetime.now(UTC)
    documents: list[bytes] = [p.read_bytes() for p in REAL_FILES[:12]]
    documents += [
        msgspec.json.encode({"log": LONG, "n": 1.50, "big": 18446744073709551615, "=f": "-1+1"}),
        b'{"metrics": {"ms": 2, "cpu": 0.5}, "tags": ["a,b", "c\\"d"], "empty": {}, "none": null}',
        b'"just a string, with a comma"',
    ]
    for i, document in enumerate(documents):
        response = await worker_client.put(
            f"/v1/job-results/{job_id}-{i:02d}",
            content=b'{"status": "succeeded", "result": ' + document + b"}",
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code == 201, response.text
    window = {"created_from": stamp(start), "created_to": stamp(datetime.now(UTC) + timedelta(microseconds=1))}

    items = msgspec.json.decode(await export(worker_client, {"format": "json", **window}), type=list[_Item])
    assert len(items) == len(documents)
    rows = [ExportRow(i.job_id, i.status, i.created_at, bytes(i.result)) for i in items]

    full = await export(worker_client, {"format": "csv", **window})
    assert full == reference_csv([rows])

    header, *records = list(csv.reader(io.StringIO(full.decode("utf-8"), newline="")))
    chosen = ["log", "metrics.cpu", "n", "result", "tags"]
    picked = [header.index(name) for name in chosen]
    out = await export(worker_client, {"format": "csv", "columns": chosen, **window})
    assert out == lines([[*header[:3], *chosen], *[[*r[:3], *(r[i] for i in picked)] for r in records]])
