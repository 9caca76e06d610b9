"""``POST /v1/job-results:batch`` through the real ``jobresults serve`` (Granian, 2 workers) over HTTP."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from tests.conftest import REALDATA
from tests.support.servers import Server, log_on_failure

pytestmark = pytest.mark.slow
JSON = {"Content-Type": "application/json"}


def test_batch_over_real_http(server: Server, auth_headers: dict[str, str]) -> None:
    prefix = f"bg-{uuid.uuid4().hex[:12]}"
    with log_on_failure(server.log), httpx.Client(base_url=server.base_url, timeout=60.0, headers=auth_headers) as http:
        existing = f"{prefix}-0000"
        assert http.put(f"/v1/job-results/{existing}", json={"status": "failed", "result": 0}).status_code == 201
        items = [
            {"job_id": f"{prefix}-{n:04d}", "status": "succeeded", "result": {"n": n, "big": 18446744073709551615}}
            for n in range(1000)
        ]
        stored = http.post("/v1/job-results:batch", json={"items": items})
        assert stored.status_code == 200, stored.text[:500]
        answer = stored.json()["items"]
        assert [entry["outcome"] for entry in answer] == ["replaced"] + ["created"] * 999
        read = http.get(f"/v1/job-results/{prefix}-0999")
        assert read.json()["result"] == {"n": 999, "big": 18446744073709551615}
        assert read.headers["etag"] == answer[999]["etag"]

        refused = http.post(
            "/v1/job-results:batch",
            json={"items": [{"job_id": f"{prefix}-x", "status": "failed", "result": 1}, {"job_id": "../etc"}]},
        )
        assert refused.status_code == 400
        assert [(e["index"], e["job_id"]) for e in refused.json()["errors"]] == [(1, "../etc")]
        assert http.get(f"/v1/job-results/{prefix}-x").status_code == 404

        not_allowed = http.get("/v1/job-results:batch")
        assert not_allowed.status_code == 405
        assert not_allowed.headers["allow"] == "POST, OPTIONS"
        assert http.head("/v1/job-results:batch").status_code == 405

        # Real documents: a body over 64 KiB, checked in a worker thread of the Granian worker.
        paths = sorted(p for p in REALDATA.glob("*/*.json") if p.name != "govulncheck-json-stream.json")[:12]
        if paths:
            documents = [(f"{prefix}-real-{n}", path.read_bytes()) for n, path in enumerate(paths)]
            body = (
                b'{"items": ['
                + b", ".join(
                    b'{"job_id": "' + job_id.encode() + b'", "status": "succeeded", "result": ' + raw + b"}"
                    for job_id, raw in documents
                )
                + b"]}"
            )
            real = http.post("/v1/job-results:batch", content=body, headers=JSON)
            assert real.status_code == 200, real.text[:500]
            for job_id, raw in documents:
                assert http.get(f"/v1/job-results/{job_id}").json()["result"] == json.loads(raw)

        too_big = http.post(
            "/v1/job-results:batch", content=b'{"items": ["' + b"x" * (16 * 1024 * 1024) + b'"]}', headers=JSON
        )
        assert too_big.status_code == 413
        assert too_big.headers["content-type"] == "application/problem+json"
