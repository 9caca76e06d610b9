"""API v1 job results: create, replace, read, conditional requests, delete, errors."""

from __future__ import annotations

import re

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

Client = AsyncTestClient[Litestar]
RFC3339_MICRO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")


def body(result: object = None, status: str = "succeeded") -> dict[str, object]:
    return {"status": status, "result": {"ok": True} if result is None else result}


async def test_put_creates_then_replaces(client: Client, job_id: str) -> None:
    created = await client.put(f"/v1/job-results/{job_id}", json=body({"n": 1}))
    assert created.status_code == 201
    assert created.headers["location"] == f"/v1/job-results/{job_id}"
    first = created.json()
    assert first["job_id"] == job_id
    assert first["status"] == "succeeded"
    assert first["result"] == {"n": 1}
    assert RFC3339_MICRO_UTC.match(first["created_at"])
    assert first["created_at"] == first["updated_at"]

    replaced = await client.put(f"/v1/job-results/{job_id}", json=body({"n": 2}, status="failed"))
    assert replaced.status_code == 200
    second = replaced.json()
    assert second["result"] == {"n": 2}
    assert second["status"] == "failed"
    assert second["created_at"] == first["created_at"]
    assert second["updated_at"] > first["updated_at"]
    assert replaced.headers["etag"] != created.headers["etag"]

    read = await client.get(f"/v1/job-results/{job_id}")
    assert read.status_code == 200
    assert read.json() == second
    assert read.headers["etag"] == replaced.headers["etag"]


async def test_get_unknown_is_404_problem(client: Client, job_id: str) -> None:
    response = await client.get(f"/v1/job-results/{job_id}")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 404
    assert problem["title"] == "Not Found"
    assert job_id in problem["detail"]


async def test_if_none_match_on_get_gives_304(client: Client, job_id: str) -> None:
    etag = (await client.put(f"/v1/job-results/{job_id}", json=body())).headers["etag"]
    not_modified = await client.get(f"/v1/job-results/{job_id}", headers={"If-None-Match": etag})
    assert not_modified.status_code == 304
    assert not_modified.content == b""
    assert not_modified.headers["etag"] == etag
    weak = await client.get(f"/v1/job-results/{job_id}", headers={"If-None-Match": f'"x", W/{etag}'})
    assert weak.status_code == 304
    stale = await client.get(f"/v1/job-results/{job_id}", headers={"If-None-Match": '"0.0"'})
    assert stale.status_code == 200


async def test_if_none_match_star_is_create_only(client: Client, job_id: str) -> None:
    url = f"/v1/job-results/{job_id}"
    assert (await client.put(url, json=body({"v": 1}), headers={"If-None-Match": "*"})).status_code == 201
    again = await client.put(url, json=body({"v": 2}), headers={"If-None-Match": "*"})
    assert again.status_code == 412
    assert again.headers["content-type"] == "application/problem+json"
    assert (await client.get(url)).json()["result"] == {"v": 1}


async def test_if_match_replaces_only_if_unchanged(client: Client, job_id: str) -> None:
    url = f"/v1/job-results/{job_id}"
    etag = (await client.put(url, json=body({"v": 1}))).headers["etag"]
    ok = await client.put(url, json=body({"v": 2}), headers={"If-Match": etag})
    assert ok.status_code == 200
    stale = await client.put(url, json=body({"v": 3}), headers={"If-Match": etag})
    assert stale.status_code == 412
    assert (await client.get(url)).json()["result"] == {"v": 2}
    star = await client.put(url, json=body({"v": 4}), headers={"If-Match": "*"})
    assert star.status_code == 200


async def test_if_match_on_missing_job_is_412(client: Client, job_id: str) -> None:
    url = f"/v1/job-results/{job_id}"
    assert (await client.put(url, json=body(), headers={"If-Match": "*"})).status_code == 412
    assert (await client.get(url)).status_code == 404


async def test_etag_changes_when_deleted_and_recreated(client: Client, job_id: str) -> None:
    url = f"/v1/job-results/{job_id}"
    first = (await client.put(url, json=body())).headers["etag"]
    assert (await client.delete(url)).status_code == 204
    second = (await client.put(url, json=body())).headers["etag"]
    assert first != second


async def test_delete(client: Client, job_id: str) -> None:
    url = f"/v1/job-results/{job_id}"
    await client.put(url, json=body())
    deleted = await client.delete(url)
    assert deleted.status_code == 204
    assert (await client.get(url)).status_code == 404
    again = await client.delete(url)
    assert again.status_code == 404
    assert again.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize(
    "bad_id",
    ["a" * 129, "a b", "%2E%2E", ".hidden", "-x", "_x", "caf\u00e9", "x\u2028", "a%2Fb", "a*b", "a%3Fb%3D1"],
)
async def test_invalid_job_id_is_400_saying_what_is_allowed(client: Client, bad_id: str) -> None:
    for method in ("GET", "PUT", "DELETE"):
        response = await client.request(method, f"/v1/job-results/{bad_id}", json=body())
        assert response.status_code == 400, (method, bad_id, response.text)
        problem = response.json()
        assert "A-Z a-z 0-9 . _ : -" in problem["detail"]
        assert "128" in problem["detail"]


@pytest.mark.parametrize("path", ["/v1/job-results/a/b", "/v1/job-results/a/b/c"])
async def test_job_id_with_slash_is_400(client: Client, path: str) -> None:
    response = await client.get(path)
    assert response.status_code == 400
    assert "A-Z a-z 0-9" in response.json()["detail"]


async def test_empty_job_id_is_400(client: Client) -> None:
    for method in ("PUT", "DELETE"):
        response = await client.request(method, "/v1/job-results/", json=body())
        assert response.status_code == 400, method
        assert "1 to 128" in response.json()["detail"]


async def test_valid_job_id_edges(client: Client, job_id: str) -> None:
    for valid in ("A", "9", job_id[:100] + "x" * 28, f"{job_id}.b_c:d-e"):
        assert len(valid) <= 128
        response = await client.put(f"/v1/job-results/{valid}", json=body({"id": valid}))
        assert response.status_code in (200, 201), valid
        assert (await client.get(f"/v1/job-results/{valid}")).json()["result"] == {"id": valid}


async def test_ids_differing_in_case_are_different_jobs(client: Client, job_id: str) -> None:
    lower, upper = f"{job_id}-abc", f"{job_id}-ABC"
    assert (await client.put(f"/v1/job-results/{lower}", json=body({"c": "lower"}))).status_code == 201
    assert (await client.put(f"/v1/job-results/{upper}", json=body({"c": "upper"}))).status_code == 201
    assert (await client.get(f"/v1/job-results/{lower}")).json()["result"] == {"c": "lower"}
    assert (await client.get(f"/v1/job-results/{upper}")).json()["result"] == {"c": "upper"}
    assert (await client.get(f"/v1/job-results/{job_id}-Abc")).status_code == 404


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b'{"status": "succeeded", "result": ', "malformed JSON"),
        (b'{"status": "succeeded", "result": NaN}', "malformed JSON"),
        (b'{"status": "succeeded", "result": "\xff\xfe"}', "UTF-8"),
        (b'{"status": "done", "result": 1}', "succeeded"),
        (b'{"result": 1}', "status"),
        (b'{"status": "failed"}', "result"),
        (b'{"status": "failed", "result": 1, "extra": 2}', "extra"),
        (b"[1, 2]", "status"),
        (b"", "malformed JSON"),
    ],
)
async def test_bad_body_is_400(client: Client, job_id: str, content: bytes, fragment: str) -> None:
    url = f"/v1/job-results/{job_id}"
    response = await client.put(url, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert fragment in response.json()["detail"]
    assert (await client.get(url)).status_code == 404


async def test_bad_body_loses_nothing_stored(client: Client, job_id: str) -> None:
    url = f"/v1/job-results/{job_id}"
    await client.put(url, json=body({"keep": "me"}))
    bad = await client.put(
        url, content=b'{"status": "failed", "result": {"a": 1, "a": 2}}', headers={"Content-Type": "application/json"}
    )
    assert bad.status_code == 422
    assert (await client.get(url)).json()["result"] == {"keep": "me"}


async def test_wrong_content_type_is_415(client: Client, job_id: str) -> None:
    response = await client.put(
        f"/v1/job-results/{job_id}", content=b'{"status":"failed","result":1}', headers={"Content-Type": "text/plain"}
    )
    assert response.status_code == 415
    assert "application/json" in response.json()["detail"]


async def test_body_over_cap_is_413(client: Client, job_id: str, app: Litestar) -> None:
    cap = app.state.settings.max_body_bytes
    huge = b'{"status":"failed","result":"' + b"x" * cap + b'"}'
    response = await client.put(f"/v1/job-results/{job_id}", content=huge, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"


async def test_unsupported_method_is_405_problem(client: Client, job_id: str) -> None:
    response = await client.post(f"/v1/job-results/{job_id}", json=body())
    assert response.status_code == 405
    assert response.headers["content-type"] == "application/problem+json"
    assert "allow" in response.headers


async def test_unknown_route_is_404_problem(client: Client) -> None:
    response = await client.get("/nope")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


async def test_error_bodies_leak_no_internals(client: Client, job_id: str) -> None:
    responses = [
        await client.put(f"/v1/job-results/{job_id}", content=b"{", headers={"Content-Type": "application/json"}),
        await client.get("/v1/job-results", params={"limit": "abc"}),
        await client.get("/v1/job-results", params={"cursor": "!!!"}),
        await client.get(f"/v1/job-results/{job_id}"),
    ]
    for response in responses:
        text = response.text
        assert response.status_code >= 400
        for leak in ("Traceback", "SELECT", "INSERT", "/work/", "site-packages", ".py", "pymysql"):
            assert leak not in text, (leak, text)


async def test_delete_honours_if_match(client: Client, job_id: str) -> None:
    url = f"/v1/job-results/{job_id}"
    etag = (await client.put(url, json=body())).headers["etag"]
    await client.put(url, json=body({"v": 2}))
    stale = await client.delete(url, headers={"If-Match": etag})
    assert stale.status_code == 412
    assert (await client.get(url)).status_code == 200
    current = (await client.get(url)).headers["etag"]
    assert (await client.delete(url, headers={"If-Match": f'"x", {current}'})).status_code == 204


async def test_if_match_uses_strong_comparison(client: Client, job_id: str) -> None:
    url = f"/v1/job-results/{job_id}"
    etag = (await client.put(url, json=body())).headers["etag"]
    weak = await client.put(url, json=body({"v": 2}), headers={"If-Match": f"W/{etag}"})
    assert weak.status_code == 412
    listed = await client.put(url, json=body({"v": 3}), headers={"If-Match": f'"nope", {etag}'})
    assert listed.status_code == 200


async def test_compressed_body_is_415(client: Client, job_id: str) -> None:
    response = await client.put(
        f"/v1/job-results/{job_id}",
        content=b'{"status":"failed","result":1}',
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert response.status_code == 415
    assert "Content-Encoding" in response.json()["detail"]


async def test_duplicate_keys_in_the_envelope_are_422(client: Client, job_id: str) -> None:
    response = await client.put(
        f"/v1/job-results/{job_id}",
        content=b'{"status": "succeeded", "status": "failed", "result": 1}',
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 422
    assert response.json()["json_path"] == "$.status"


async def test_405_says_what_is_allowed(client: Client) -> None:
    response = await client.delete("/healthz")
    assert response.status_code == 405
    assert "GET" in response.json()["detail"]
