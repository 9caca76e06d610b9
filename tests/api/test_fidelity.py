"""What a job stores comes back the same, on MySQL and on MariaDB alike; what cannot, is refused (422)."""

from __future__ import annotations

import json
import math

import pytest
from httpx import Response
from litestar import Litestar
from litestar.testing import AsyncTestClient

from tests.support.database import connect

Client = AsyncTestClient[Litestar]


async def put_raw(client: Client, job_id: str, result_json: str | bytes) -> Response:
    if isinstance(result_json, str):
        result_json = result_json.encode()
    content = b'{"status": "succeeded", "result": ' + result_json + b"}"
    return await client.put(f"/v1/job-results/{job_id}", content=content, headers={"Content-Type": "application/json"})


async def roundtrip(client: Client, job_id: str, result_json: str | bytes) -> object:
    response = await put_raw(client, job_id, result_json)
    assert response.status_code == 201, response.text
    read = await client.get(f"/v1/job-results/{job_id}")
    assert read.status_code == 200
    return read.json()["result"]


STRINGS = [
    "plain",
    "emoji \U0001f600 \U0001f5b4 and U+1D7D9 \U0001d7d9",
    "nul \x00 inside",
    "newlines\n\r\n and tabs\t",
    'quotes " and \\ backslashes',
    "\u2028\u2029 separators",
    "\x1b[38;5;33mansi\x1b[0m",
    "\u00a0 no-break, \u00e9, \u4e2d\u6587, \u0393",
    "\ufeff bom and \uffff noncharacter",
    "",
    " trailing space ",
]


@pytest.mark.parametrize("text", STRINGS)
async def test_strings_are_exact(client: Client, job_id: str, text: str) -> None:
    document = {"s": text, text: "as key"}
    assert await roundtrip(client, job_id, json.dumps(document)) == document
    # Sent as UTF-8 rather than escapes, too.
    other = job_id + "-utf8"
    assert await roundtrip(client, other, json.dumps(document, ensure_ascii=False)) == document


async def test_every_unicode_plane_roundtrips(client: Client, job_id: str) -> None:
    chars = "".join(chr(cp) for cp in list(range(0, 0xD800, 97)) + list(range(0xE000, 0x110000, 4099)))
    assert await roundtrip(client, job_id, json.dumps([chars])) == [chars]


@pytest.mark.parametrize(
    "value", [0, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), 14541957942, -(2**53) - 1]
)
async def test_integers_are_exact(client: Client, job_id: str, value: int) -> None:
    result = await roundtrip(client, job_id, f'{{"n": {value}, "a": [{value}]}}')
    assert result == {"n": value, "a": [value]}
    assert isinstance(result["n"], int)


@pytest.mark.parametrize(
    ("literal", "path"),
    [
        ("18446744073709551616", "$.result.big"),
        ("-9223372036854775809", "$.result.big"),
        # Beyond CPython's 4300-digit int conversion limit: was a 500 (ValueError) before.
        ("9" * 5000, "$.result.big"),
        ("-" + "1" * 4400, "$.result.big"),
    ],
)
async def test_integers_out_of_range_are_422(client: Client, job_id: str, literal: str, path: str) -> None:
    response = await put_raw(client, job_id, f'{{"ok": 1, "big": {literal}}}')
    assert response.status_code == 422
    problem = response.json()
    assert problem["json_path"] == path
    assert path in problem["detail"]
    assert "2^64-1" in problem["detail"]


@pytest.mark.parametrize(
    "literal",
    [
        "0.1",
        "1e-7",
        "5e-324",
        "1.7976931348623157e308",
        "-0.5",
        "19.7799999999999985",
        "4.0",
        "9.918212890625e-05",
        "0.33427651000000014",
        "1E+2",
        "-1.5e-300",
    ],
)
async def test_floats_are_equal_as_doubles(client: Client, job_id: str, literal: str) -> None:
    result = await roundtrip(client, job_id, f"[{literal}]")
    assert result == [float(literal)]
    assert math.copysign(1, result[0]) == math.copysign(1, float(literal))


@pytest.mark.parametrize(
    ("document", "path"),
    [
        ('{"a": 1, "a": 2}', "$.result.a"),
        ('{"x": [{"k": 1, "k": 1}]}', "$.result.x[0].k"),
        ('{"x y": {"dup": 1, "dup": {}}}', '$.result["x y"].dup'),
    ],
)
async def test_duplicate_keys_are_422(client: Client, job_id: str, document: str, path: str) -> None:
    response = await put_raw(client, job_id, document)
    assert response.status_code == 422
    assert response.json()["json_path"] == path
    assert (await client.get(f"/v1/job-results/{job_id}")).status_code == 404


async def test_lone_surrogate_is_422(client: Client, job_id: str) -> None:
    response = await put_raw(client, job_id, '{"ok": "\\ud83d\\ude00", "bad": ["x", "\\ud800"]}')
    assert response.status_code == 422
    assert response.json()["json_path"] == "$.result.bad[1]"
    assert "surrogate" in response.json()["detail"]


async def test_number_beyond_double_is_422(client: Client, job_id: str) -> None:
    response = await put_raw(client, job_id, '{"x": 1e400}')
    assert response.status_code == 422
    assert response.json()["json_path"] == "$.result.x"


async def test_nesting_64_is_kept_and_65_refused(client: Client, job_id: str) -> None:
    deep = "[" * 64 + "1" + "]" * 64
    result = await roundtrip(client, job_id, deep)
    for _ in range(64):
        assert isinstance(result, list)
        result = result[0]
    assert result == 1
    too_deep = "[" * 65 + "]" * 65
    response = await put_raw(client, job_id + "-deep", too_deep)
    assert response.status_code == 422
    assert "64" in response.json()["detail"]
    very_deep = "[" * 100_000 + "]" * 100_000
    assert (await put_raw(client, job_id + "-vdeep", very_deep)).status_code == 422


@pytest.mark.parametrize("document", ["null", "true", "0", '"text"', "[]", "{}", '[{}, [], ""]'])
async def test_any_json_value_is_a_result(client: Client, job_id: str, document: str) -> None:
    assert await roundtrip(client, job_id, document) == json.loads(document)


async def test_get_passes_the_stored_text_through(client: Client, job_id: str, database_url: str) -> None:
    """GET returns the database's own JSON text byte for byte: no decode and re-encode in Python."""
    await put_raw(client, job_id, '{"b" : [1,   2.50, "x"],\n "a": {"k": null}}')
    with connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT result_data FROM job_results WHERE job_id = %s", (job_id,))
        (stored,) = cur.fetchone()
    response = await client.get(f"/v1/job-results/{job_id}")
    prefix = b'"result":'
    start = response.content.index(prefix) + len(prefix)
    end = response.content.index(b',"created_at"')
    assert response.content[start:end] == stored.encode()
