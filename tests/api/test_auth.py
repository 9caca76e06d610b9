"""API keys with scopes: 401 without a valid key, 403 without the scope, revocation within the cache TTL."""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import subprocess
from typing import Any

import msgspec
import pytest
from httpx import Response
from litestar import Litestar
from litestar.testing import AsyncTestClient

from config.settings import Settings
from repositories.database import Database
from service.app import create_app
from service.auth import Authenticator
from service.operator import create_key, revoke_key
from service.problems import ApiError
from tests.conftest import ALL_SCOPES, connect, make_token
from tests.support.servers import JOBRESULTS, service_env

Client = AsyncTestClient[Litestar]

# (method, path template, body, scope the operation needs: one, or a tuple of scopes all needed)
OPERATIONS = [
    ("GET", "/v1/job-results/{job}", None, "results:read"),
    ("GET", "/v1/job-results", None, "results:read"),
    ("PUT", "/v1/job-results/{job}", {"status": "succeeded", "result": 1}, "results:write"),
    ("DELETE", "/v1/job-results/{job}-gone", None, "results:write"),
    ("POST", "/v1/job-results/{job}/exports", {"format": "json"}, ("exports:write", "results:read")),
    (
        "POST",
        "/v1/exports",
        {"format": "json", "created_from": "2020-01-01T00:00:00Z", "created_to": "2020-01-02T00:00:00Z"},
        ("exports:write", "results:read"),
    ),
    ("GET", "/v1/exports", None, "exports:read"),
    ("GET", "/v1/exports/" + "0" * 32, None, "exports:read"),
    ("DELETE", "/v1/exports/" + "0" * 32, None, "exports:write"),
    ("POST", "/v1/exports/" + "0" * 32 + "/cancel", None, "exports:write"),
    ("GET", "/metrics", None, "metrics:read"),
]


class Anonymous:
    """The session client without its API key (a second client would run the app's lifespan again)."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def request(
        self, method: str, url: str, headers: dict[str, str] | None = None, json: object = None
    ) -> Response:
        return await self.client.request(method, url, headers={"Authorization": "", **(headers or {})}, json=json)

    async def get(self, url: str, headers: dict[str, str] | None = None) -> Response:
        return await self.request("GET", url, headers=headers)


@pytest.fixture
def anonymous(client: Client) -> Anonymous:
    return Anonymous(client)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize(("method", "path", "body", "scope"), OPERATIONS)
async def test_every_protected_operation_needs_a_key(
    anonymous: Anonymous, job_id: str, method: str, path: str, body: object, scope: str
) -> None:
    response = await anonymous.request(method, path.format(job=job_id), json=body)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("scope", ALL_SCOPES)
async def test_each_scope_opens_exactly_its_operations(
    anonymous: Anonymous, database_url: str, client: Client, job_id: str, scope: str
) -> None:
    await client.put(f"/v1/job-results/{job_id}", json={"status": "succeeded", "result": 1})
    token = make_token(database_url, (scope,))
    for method, path, body, needed in OPERATIONS:
        response = await anonymous.request(method, path.format(job=job_id), json=body, headers=bearer(token))
        if needed == scope:
            assert response.status_code not in (401, 403), (method, path, response.text)
        else:
            assert response.status_code == 403, (method, path, scope, response.text)
            for missing in set(needed if isinstance(needed, tuple) else (needed,)) - {scope}:
                assert missing in response.json()["detail"]


async def test_creating_an_export_also_needs_results_read(
    anonymous: Anonymous, database_url: str, client: Client, job_id: str
) -> None:
    """An export hands out job results: exports:write alone must not read what results:read guards."""
    await client.put(f"/v1/job-results/{job_id}", json={"status": "succeeded", "result": 1})
    range_body = {"format": "json", "created_from": "2020-01-01T00:00:00Z", "created_to": "2020-01-02T00:00:00Z"}
    without = bearer(make_token(database_url, ("exports:write", "exports:read")))
    job = await anonymous.request("POST", f"/v1/job-results/{job_id}/exports", json={"format": "json"}, headers=without)
    assert job.status_code == 403
    assert "results:read" in job.json()["detail"]
    ranged = await anonymous.request("POST", "/v1/exports", json=range_body, headers=without)
    assert ranged.status_code == 403
    assert "results:read" in ranged.json()["detail"]
    both = bearer(make_token(database_url, ("exports:write", "results:read")))
    job = await anonymous.request("POST", f"/v1/job-results/{job_id}/exports", json={"format": "json"}, headers=both)
    assert job.status_code == 201, job.text
    assert (await anonymous.request("POST", "/v1/exports", json=range_body, headers=both)).status_code == 202


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer",
        "Basic dXNlcjpwYXNz",
        "Bearer not-a-key",
        "Bearer jr_0123456789ab_" + "A" * 43,  # well-formed, unknown
        "Bearer jr_0123456789ab_" + "A" * 42,  # too short
    ],
)
async def test_bad_keys_are_401(anonymous: Anonymous, authorization: str) -> None:
    response = await anonymous.get("/v1/job-results", headers={"Authorization": authorization})
    assert response.status_code == 401
    assert "Bearer" in response.headers["www-authenticate"]


async def test_right_key_id_with_wrong_secret_is_401(anonymous: Anonymous, database_url: str) -> None:
    token = make_token(database_url)
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert (await anonymous.get("/v1/job-results", headers=bearer(forged))).status_code == 401
    assert (await anonymous.get("/v1/job-results", headers=bearer(token))).status_code == 200


async def test_open_endpoints(anonymous: Anonymous) -> None:
    for path in ("/healthz", "/readyz", "/schema/openapi.json", "/schema/swagger"):
        assert (await anonymous.get(path)).status_code == 200, path


async def test_tokens_are_long_random_and_stored_only_as_a_hash(settings: Settings, database_url: str) -> None:
    """``create_key`` (behind ``jobresults keys create``) stores the SHA-256 of the secret, never the secret."""
    made = [await create_key(settings, "hash-check", ("results:read",)) for _ in range(2)]
    secrets = []
    for token, key in made:
        prefix, key_id, secret = token.split("_", 2)
        assert prefix == "jr"
        assert key_id == key.key_id
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", secret), secret  # 256 bits in base64url
        secrets.append(secret)
        with connect(database_url) as conn, conn.cursor() as cur:
            cur.execute("SELECT * FROM api_keys WHERE key_id = %s", (key_id,))
            row = cur.fetchone()
        assert row is not None
        stored = b"".join(v if isinstance(v, bytes) else str(v).encode() for v in row)
        assert secret.encode() not in stored
        assert token.encode() not in stored
        assert hashlib.sha256(secret.encode()).digest() in row
    assert secrets[0] != secrets[1]
    assert made[0][1].key_id != made[1][1].key_id


async def test_revoked_key_stops_within_the_cache_ttl(settings: Settings, database_url: str) -> None:
    ttl = 0.5
    app = create_app(msgspec.structs.replace(settings, auth_cache_ttl_s=ttl, export_worker=False))
    token = make_token(database_url, name="to-revoke")
    key_id = token.split("_")[1]
    async with AsyncTestClient(app=app) as test_client:
        test_client.headers.update(bearer(token))
        assert (await test_client.get("/v1/job-results")).status_code == 200
        await revoke_key(settings, key_id)
        await asyncio.sleep(ttl + 0.2)
        response = await test_client.get("/v1/job-results")
        assert response.status_code == 401
        assert "revoked" in response.json()["detail"]


async def test_exports_record_the_key_that_asked(client: Client, job_id: str, api_token: str) -> None:
    await client.put(f"/v1/job-results/{job_id}", json={"status": "succeeded", "result": 1})
    record = (await client.post(f"/v1/job-results/{job_id}/exports", json={"format": "json"})).json()
    assert record["requested_by"] == f"key:{api_token.split('_')[1]}"


@pytest.mark.slow
def test_keys_cli_creates_lists_and_revokes(database_url: str) -> None:
    env = service_env({"database_url": database_url})

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [JOBRESULTS, "keys", *args], env=env, capture_output=True, text=True, timeout=60, check=False
        )

    created = run(
        "create", "--name", "ci-uploader", "--scopes", "results:write,results:read", "--rate-limit", "50/second"
    )
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip().splitlines()[-1]
    assert token.startswith("jr_")
    key_id = token.split("_")[1]
    listed = run("list")
    assert key_id in listed.stdout
    assert "ci-uploader" in listed.stdout
    assert "50/second" in created.stdout
    assert token.split("_", 2)[2] not in listed.stdout
    assert run("revoke", key_id).returncode == 0
    assert "revoked" in run("list").stdout
    bad = run("create", "--name", "x", "--scopes", "results:read,admin")
    assert bad.returncode == 2
    assert "results:read" in bad.stderr
    assert run("revoke", "ffffffffffff").returncode == 1


# --- the key cache: the whole token is checked, unknown tokens cost one read and evict nothing ------


class CountingDatabase:
    """The real session Database, counting the units of work run through it (a spy, not a stand-in)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.runs = 0

    async def run(self, work, **kwargs: Any):  # type: ignore[no-untyped-def]
        self.runs += 1
        return await self.db.run(work, **kwargs)


def _unknown_token() -> str:
    return f"jr_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"


async def test_a_valid_secret_under_another_key_id_is_refused(anonymous: Anonymous, database_url: str) -> None:
    token = make_token(database_url)
    secret = token.split("_", 2)[2]
    # First under a wrong key id: must not poison the cache for the real token.
    assert (await anonymous.get("/v1/job-results", headers=bearer(f"jr_000000000000_{secret}"))).status_code == 401
    assert (await anonymous.get("/v1/job-results", headers=bearer(token))).status_code == 200
    # Then, with the real key cached, a wrong key id is still refused.
    assert (await anonymous.get("/v1/job-results", headers=bearer(f"jr_000000000000_{secret}"))).status_code == 401
    other_id = make_token(database_url).split("_")[1]
    assert (await anonymous.get("/v1/job-results", headers=bearer(f"jr_{other_id}_{secret}"))).status_code == 401
    assert (await anonymous.get("/v1/job-results", headers=bearer(token))).status_code == 200


async def test_unknown_tokens_cost_one_read_per_key_id_and_never_evict_known_keys(
    db: Database, database_url: str
) -> None:
    counting = CountingDatabase(db)
    authenticator = Authenticator(counting, ttl_s=60, max_entries=4)  # type: ignore[arg-type]
    token = make_token(database_url)
    assert (await authenticator.authenticate(f"Bearer {token}")).key_id == token.split("_")[1]
    assert counting.runs == 1
    unknown = _unknown_token()
    for _ in range(5):
        with pytest.raises(ApiError):
            await authenticator.authenticate(f"Bearer {unknown}")
    assert counting.runs == 2  # one read for the unknown key id, then the cache answers
    for _ in range(20):  # more random tokens than the cache holds
        with pytest.raises(ApiError):
            await authenticator.authenticate(f"Bearer {_unknown_token()}")
    before = counting.runs
    await authenticator.authenticate(f"Bearer {token}")
    assert counting.runs == before  # the known key is still cached
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(ApiError):
        await authenticator.authenticate(f"Bearer {forged}")
    await authenticator.authenticate(f"Bearer {token}")
    assert counting.runs == before  # a wrong secret neither reads nor evicts


async def test_unknown_tokens_count_against_the_ip_before_any_key_lookup(settings: Settings) -> None:
    app = create_app(msgspec.structs.replace(settings, rate_limit_per_ip="10/minute", export_worker=False))
    async with AsyncTestClient(app=app) as test_client:
        counting = CountingDatabase(app.state.authenticator.db)
        app.state.authenticator.db = counting
        statuses = [
            (await test_client.get("/v1/job-results", headers=bearer(_unknown_token()))).status_code for _ in range(30)
        ]
        assert statuses == [401] * 10 + [429] * 20
        assert counting.runs == 10  # the refused 20 cost no database read


async def test_a_known_keys_refresh_is_not_refused_when_its_ip_is_busy(settings: Settings, database_url: str) -> None:
    """Random tokens use up the IP's budget; a real key with its own limit keeps working past its TTL."""
    ttl = 0.3
    app = create_app(
        msgspec.structs.replace(settings, rate_limit_per_ip="10/minute", auth_cache_ttl_s=ttl, export_worker=False)
    )
    token = make_token(database_url, rate_limit="1000/second")
    async with AsyncTestClient(app=app) as test_client:
        assert (await test_client.get("/v1/job-results", headers=bearer(token))).status_code == 200
        statuses = [
            (await test_client.get("/v1/job-results", headers=bearer(_unknown_token()))).status_code for _ in range(15)
        ]
        assert statuses.count(429) >= 5
        await asyncio.sleep(ttl + 0.1)  # the key's cache entry expired; the IP is over its limit for a minute
        assert (await test_client.get("/v1/job-results", headers=bearer(_unknown_token()))).status_code == 429
        assert (await test_client.get("/v1/job-results", headers=bearer(token))).status_code == 200
