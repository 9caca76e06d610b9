"""The ``s3`` export store against a real S3 server (SeaweedFS ``weed mini``, started once per session).

Two in-process apps play two replicas: each has its own local directory, both share the database and
the bucket. Replica ``a`` runs the export worker, replica ``b`` does not, so a range export requested
through ``b`` is run by ``a`` and downloaded through ``b``. The module has a database of its own, so
the session app's worker (local store) never claims these exports.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import msgspec
import obstore
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from obstore.store import S3Store

from config.settings import Settings, SettingsError
from exports.pipeline import ExportService, ExportTooLarge, LeaseLost, new_export_id
from exports.s3 import PART_SIZE, S3ExportStore
from exports.store import StoreRefused, StoreUnavailable
from repositories.database import Database
from repositories.exports import ExportParameters, ExportRepository
from service.app import create_app
from tests.conftest import connect, fresh_database, make_token
from tests.seaweedfs import ACCESS_KEY, BUCKET, SECRET_KEY, SeaweedFS, free_ports
from tests.support.exports import wait_done

Client = AsyncTestClient[Litestar]
PREFIX = "exports/"


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A real S3 server on loopback for the session; the process's AWS credentials are set to its own."""
    saved = {name: os.environ.get(name) for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ["AWS_ACCESS_KEY_ID"] = ACCESS_KEY
    os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET_KEY
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def s3_database_url(server_url: str) -> Iterator[str]:
    with fresh_database(server_url, "jr_s3") as url:
        yield url


def s3_settings(database_url: str, directory: Path, endpoint: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "exports_dir": str(directory),
        "exports_store": "s3",
        "s3_bucket": BUCKET,
        "s3_endpoint": endpoint,
        "s3_region": "us-east-1",
        "pool_min_size": 1,
        "pool_max_size": 4,
        "log_level": "warning",
        "export_poll_s": 0.1,
        "rate_limit_per_ip": "100000/second",
    }
    values.update(overrides)
    return Settings.from_env({}, **values)


async def started(app: Litestar, token: str) -> AsyncIterator[Client]:
    async with AsyncTestClient(app=app) as client:
        client.headers.update({"Authorization": f"Bearer {token}"})
        yield client


@pytest.fixture(scope="module")
def token(s3_database_url: str) -> str:
    return make_token(s3_database_url)


@pytest.fixture(scope="module")
async def replica_a(
    seaweedfs: SeaweedFS, s3_database_url: str, token: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Client]:
    settings = s3_settings(s3_database_url, tmp_path_factory.mktemp("replica-a"), seaweedfs.endpoint)
    async for client in started(create_app(settings), token):
        yield client


@pytest.fixture(scope="module")
async def replica_b(
    seaweedfs: SeaweedFS, s3_database_url: str, token: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Client]:
    settings = s3_settings(
        s3_database_url, tmp_path_factory.mktemp("replica-b"), seaweedfs.endpoint, export_worker=False
    )
    async for client in started(create_app(settings), token):
        yield client


@pytest.fixture(scope="module")
def raw_store(seaweedfs: SeaweedFS) -> S3Store:
    """The bucket, reached directly (to look at objects behind the service's back)."""
    return S3Store(
        BUCKET,
        endpoint=seaweedfs.endpoint,
        region="us-east-1",
        virtual_hosted_style_request=False,
        client_options={"allow_http": True},
    )


async def keys_of(store: S3Store, export_id: str) -> list[str]:
    found = await obstore.list(store, prefix=f"{PREFIX}{export_id}/").collect_async()
    return sorted(meta["path"] for meta in found)


async def put_job(client: Client, result: object, status: str = "succeeded") -> dict[str, Any]:
    job_id = f"s3-{uuid.uuid4().hex}"
    response = await client.put(f"/v1/job-results/{job_id}", json={"status": status, "result": result})
    assert response.status_code in (200, 201), response.text
    body: dict[str, Any] = response.json()
    return body


async def content(client: Client, record: dict[str, Any]) -> bytes:
    response = await client.get(record["content_url"])
    assert response.status_code == 200, response.text
    assert response.headers["etag"] == f'"{record["sha256"]}"'
    assert response.headers["content-disposition"].startswith("attachment;")
    assert hashlib.sha256(response.content).hexdigest() == record["sha256"]
    assert len(response.content) == record["bytes"]
    return response.content


# --- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"exports_url_ttl_s": "604801"}, "JOBRESULTS_EXPORTS_URL_TTL_S"),
        ({"exports_url_ttl_s": "0"}, "JOBRESULTS_EXPORTS_URL_TTL_S"),
        ({"exports_store": "s3"}, "JOBRESULTS_S3_BUCKET"),
        ({"exports_store": "gcs"}, "JOBRESULTS_EXPORTS_STORE"),
        ({"exports_download": "redirect"}, "JOBRESULTS_EXPORTS_DOWNLOAD"),
        ({"exports_download": "link"}, "JOBRESULTS_EXPORTS_DOWNLOAD"),
        ({"s3_endpoint": "localhost:8333"}, "JOBRESULTS_S3_ENDPOINT"),
        ({"s3_public_endpoint": "ftp://x"}, "JOBRESULTS_S3_PUBLIC_ENDPOINT"),
        ({"s3_prefix": "/exports/"}, "JOBRESULTS_S3_PREFIX"),
    ],
)
def test_bad_store_settings_name_the_variable(overrides: dict[str, str], named: str) -> None:
    env = {"JOBRESULTS_DATABASE_URL": "mysql://root:@127.0.0.1:3306/x"}
    env.update({f"JOBRESULTS_{name.upper()}": value for name, value in overrides.items()})
    with pytest.raises(SettingsError, match=named):
        Settings.from_env(env)


def test_seven_day_urls_are_allowed() -> None:
    env = {
        "JOBRESULTS_DATABASE_URL": "mysql://root:@127.0.0.1:3306/x",
        "JOBRESULTS_EXPORTS_STORE": "s3",
        "JOBRESULTS_S3_BUCKET": "b",
        "JOBRESULTS_EXPORTS_DOWNLOAD": "redirect",
        "JOBRESULTS_EXPORTS_URL_TTL_S": "604800",
    }
    assert Settings.from_env(env).exports_url_ttl_s == 604800


# --- writing and reading --------------------------------------------------------------------------


async def test_single_job_export_round_trip(replica_a: Client, raw_store: S3Store, tmp_path: Path) -> None:
    stored = await put_job(replica_a, {"metrics": {"ms": 12}, "note": "ü" * 1000})
    response = await replica_a.post(
        f"/v1/job-results/{stored['job_id']}/exports", json={"format": "ndjson", "compression": "gzip"}
    )
    assert response.status_code == 201, response.text
    record = response.json()
    body = await content(replica_a, record)
    assert json.loads(gzip.decompress(body))["result"]["note"] == "ü" * 1000
    assert await keys_of(raw_store, record["export_id"]) == [f"{PREFIX}{record['export_id']}/1.ndjson.gz"]
    meta = await obstore.head_async(raw_store, f"{PREFIX}{record['export_id']}/1.ndjson.gz")
    assert meta["size"] == record["bytes"]


async def test_range_export_through_one_replica_downloads_through_the_other(
    replica_a: Client, replica_b: Client, raw_store: S3Store
) -> None:
    made = [await put_job(replica_a, {"i": i, "pad": "x" * 3000}) for i in range(40)]
    start, end = made[0]["created_at"], made[-1]["created_at"]
    # Requested through b (no worker), run by a's worker, downloaded through b.
    response = await replica_b.post("/v1/exports", json={"format": "json", "created_from": start, "created_to": end})
    assert response.status_code == 202, response.text
    record = await wait_done(replica_b, response.json()["export_id"])
    assert record["state"] == "succeeded", record
    assert record["rows_written"] == 39
    body_b = await content(replica_b, record)
    assert body_b == await content(replica_a, record)
    assert [item["job_id"] for item in json.loads(body_b)] == [m["job_id"] for m in made[:-1]]
    assert await keys_of(raw_store, record["export_id"]) == [f"{PREFIX}{record['export_id']}/1.json"]

    # Ranges, validators and conditional requests keep their meaning when served from the store.
    url, size, etag = record["content_url"], record["bytes"], f'"{record["sha256"]}"'
    part = await replica_b.get(url, headers={"Range": "bytes=100-1099"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 100-1099/{size}"
    assert part.content == body_b[100:1100]
    tail = await replica_b.get(url, headers={"Range": "bytes=-10"})
    assert tail.content == body_b[-10:]
    outside = await replica_b.get(url, headers={"Range": f"bytes={size}-"})
    assert outside.status_code == 416
    assert outside.headers["content-range"] == f"bytes */{size}"
    stale = await replica_b.get(url, headers={"Range": "bytes=0-9", "If-Range": '"other"'})
    assert stale.status_code == 200
    assert stale.content == body_b
    assert (await replica_b.get(url, headers={"If-None-Match": etag})).status_code == 304


async def test_single_job_export_through_one_replica_downloads_through_the_other(
    replica_a: Client, replica_b: Client
) -> None:
    stored = await put_job(replica_b, {"k": "v"})
    record = (await replica_b.post(f"/v1/job-results/{stored['job_id']}/exports", json={"format": "csv"})).json()
    assert await content(replica_a, record) == await content(replica_b, record)


async def test_redirect_mode_answers_a_presigned_url_for_the_public_endpoint(
    seaweedfs: SeaweedFS,
    s3_database_url: str,
    token: str,
    tmp_path: Path,
    replica_a: Client,
    capfd: pytest.CaptureFixture[str],
) -> None:
    stored = await put_job(replica_a, {"redirect": True, "pad": "y" * 5000})
    record = (await replica_a.post(f"/v1/job-results/{stored['job_id']}/exports", json={"format": "json"})).json()
    public = seaweedfs.endpoint.replace("127.0.0.1", "localhost")
    settings = s3_settings(
        s3_database_url,
        tmp_path,
        seaweedfs.endpoint,
        export_worker=False,
        exports_download="redirect",
        exports_url_ttl_s=90,
        s3_public_endpoint=public,
        log_level="info",  # the request log line must be written, and must not hold the URL
    )
    async for client in started(create_app(settings), token):
        response = await client.get(record["content_url"], follow_redirects=False)
        assert response.status_code == 302, response.text
        assert not response.content
        assert response.headers["content-type"].startswith("text/plain")  # an empty body, not JSON
        location = response.headers["location"]
        assert location.startswith(f"{public}/{BUCKET}/{PREFIX}{record['export_id']}/1.json?")
        assert "X-Amz-Expires=90" in location
        assert "X-Amz-Signature=" in location
        logged = capfd.readouterr().out  # before this test follows the URL (httpx logs what it requests)
        assert record["export_id"] in logged  # the service's request line was written...
        assert "X-Amz-Signature" not in logged  # ...without the presigned URL, a bearer secret
        async with httpx.AsyncClient() as plain:  # no API key: the URL alone grants the download
            followed = await plain.get(location)
            ranged = await plain.get(location, headers={"Range": "bytes=0-4"})
        assert followed.status_code == 200
        assert hashlib.sha256(followed.content).hexdigest() == record["sha256"]
        assert followed.content == await content(replica_a, record)
        assert followed.headers["content-disposition"] == f'attachment; filename="{record["export_id"]}.json"'
        assert ranged.status_code == 206
        assert ranged.content == followed.content[:5]
        not_modified = await client.get(
            record["content_url"], headers={"If-None-Match": f'"{record["sha256"]}"'}, follow_redirects=False
        )
        assert not_modified.status_code == 304


async def test_a_head_in_redirect_mode_is_redirected_to_a_url_that_answers_head(
    seaweedfs: SeaweedFS, s3_database_url: str, token: str, tmp_path: Path, replica_a: Client
) -> None:
    stored = await put_job(replica_a, {"head": True})
    record = (await replica_a.post(f"/v1/job-results/{stored['job_id']}/exports", json={"format": "json"})).json()
    settings = s3_settings(
        s3_database_url, tmp_path, seaweedfs.endpoint, export_worker=False, exports_download="redirect"
    )
    async for client in started(create_app(settings), token):
        response = await client.head(record["content_url"], follow_redirects=False)
        assert response.status_code == 302, response.text
        async with httpx.AsyncClient() as plain:
            followed = await plain.head(response.headers["location"])  # as curl -I -L does
        assert followed.status_code == 200  # a URL signed for GET answered 403 to HEAD
        assert int(followed.headers["content-length"]) == record["bytes"]


async def test_a_large_export_streams_as_a_multipart_upload(replica_a: Client, raw_store: S3Store) -> None:
    # ~27 MB: several parts, so the multipart path (and its sha256) is exercised.
    made = [await put_job(replica_a, {"i": i, "blob": os.urandom(1_500_000).hex()}) for i in range(10)]
    response = await replica_a.post(
        "/v1/exports",
        json={"format": "ndjson", "created_from": made[0]["created_at"], "created_to": made[-1]["created_at"]},
    )
    record = await wait_done(replica_a, response.json()["export_id"])
    assert record["state"] == "succeeded", record
    parts = -(-record["bytes"] // PART_SIZE)
    assert parts > 1
    meta = await obstore.head_async(raw_store, f"{PREFIX}{record['export_id']}/1.ndjson")
    assert str(meta["e_tag"]).rstrip('"').endswith(f"-{parts}")  # S3 multipart ETag: <md5 of md5s>-<parts>
    body = await content(replica_a, record)
    assert [json.loads(line)["result"]["i"] for line in body.splitlines()] == list(range(9))


# --- leases and lost attempts --------------------------------------------------------------------


async def _running_export(db: Database, owner: str, attempts: int, *, created_to: datetime) -> Any:
    now = datetime.now(UTC).replace(tzinfo=None)
    return await db.run(
        lambda conn: ExportRepository(conn).insert(
            export_id=new_export_id(),
            kind="range",
            format="ndjson",
            compression="none",
            parameters=ExportParameters(created_from=created_to - timedelta(seconds=1), created_to=created_to),
            state="running",
            requested_by="test",
            started_at=now,
            attempts=attempts,
            lease_owner=owner,
            lease_until=now + timedelta(minutes=5),
        )
    )


@pytest.fixture
async def s3_service(seaweedfs: SeaweedFS, s3_database_url: str, tmp_path: Path) -> AsyncIterator[ExportService]:
    settings = s3_settings(s3_database_url, tmp_path, seaweedfs.endpoint, export_worker=False)
    db = await Database.open(settings)
    try:
        yield ExportService(db, settings)
    finally:
        await db.close()


async def test_an_attempt_that_lost_its_lease_is_neither_recorded_nor_kept(
    s3_service: ExportService, raw_store: S3Store
) -> None:
    service = s3_service
    export = await _running_export(service.db, service.owner, 2, created_to=datetime(2001, 1, 1))
    stale_view = msgspec.structs.replace(export, attempts=1)  # this worker still believes it runs attempt 1
    with pytest.raises(LeaseLost):
        await service.write_range(stale_view)
    assert await keys_of(raw_store, export.export_id) == []
    row = await service.db.run(lambda conn: ExportRepository(conn).get(export.export_id), transaction=False)
    assert (row.state, row.object_key, row.sha256) == ("running", None, None)


async def test_sweep_removes_objects_of_lost_attempts_and_keeps_the_recorded_one(
    s3_service: ExportService, raw_store: S3Store
) -> None:
    service = s3_service
    running = await _running_export(service.db, "elsewhere", 3, created_to=datetime(2001, 1, 2))
    done = await _running_export(service.db, service.owner, 2, created_to=datetime(2001, 1, 3))
    rows, _size = await service.write_range(done)
    assert rows == 0
    recorded = f"{PREFIX}{done.export_id}/2.ndjson"
    orphan_id = new_export_id()
    planted = {
        f"{PREFIX}{running.export_id}/1.ndjson": False,  # an older attempt of a running export
        f"{PREFIX}{running.export_id}/3.ndjson": True,  # the attempt running now
        f"{PREFIX}{done.export_id}/1.ndjson": False,  # lost to attempt 2, which was recorded
        f"{PREFIX}{orphan_id}/1.json": True,  # a single-job export not committed yet (young)
    }
    for key in planted:
        await obstore.put_async(raw_store, key, b"partial")
    removed = await service.remove_crash_leftovers()
    assert removed == 2
    left = set(await keys_of(raw_store, running.export_id)) | set(await keys_of(raw_store, done.export_id))
    left |= set(await keys_of(raw_store, orphan_id))
    assert left == {key for key, kept in planted.items() if kept} | {recorded}


# --- a failing store --------------------------------------------------------------------------------


async def test_wrong_credentials_fail_the_export_with_a_safe_message(
    seaweedfs: SeaweedFS, s3_service: ExportService
) -> None:
    wrong = S3Store(
        BUCKET,
        endpoint=seaweedfs.endpoint,
        region="us-east-1",
        access_key_id=ACCESS_KEY,
        secret_access_key="not-the-secret",
        virtual_hosted_style_request=False,
        client_options={"allow_http": True},
        retry_config={"max_retries": 0},
    )
    service = ExportService(s3_service.db, s3_service.settings, store=S3ExportStore(wrong, wrong, PREFIX))
    params = ExportParameters(created_from=datetime(2001, 2, 1), created_to=datetime(2001, 2, 2))
    with pytest.raises(StoreRefused):
        await service.run_now(params, "ndjson", "none", "test")
    rows = await service.db.run(
        lambda conn: ExportRepository(conn).list(state="failed", before_id=None, limit=1), transaction=False
    )
    assert rows[0].error == "the export store refused the credentials or permissions; check its settings"


async def test_a_stopped_store_fails_requests_with_503_and_readyz_says_so(
    s3_database_url: str, token: str, tmp_path: Path, replica_a: Client
) -> None:
    (dead_port,) = free_ports(1)
    stored = await put_job(replica_a, {"x": 1})
    settings = s3_settings(s3_database_url, tmp_path, f"http://127.0.0.1:{dead_port}", export_worker=False)
    async for client in started(create_app(settings), token):
        response = await client.post(f"/v1/job-results/{stored['job_id']}/exports", json={"format": "json"})
        assert response.status_code == 503, response.text
        problem = response.json()
        assert problem["detail"] == "the export store is unavailable; try again later"
        assert str(dead_port) not in response.text
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert "export store" in ready.json()["detail"]
    # Nothing was recorded for the failed export.
    with connect(s3_database_url) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT COUNT(*) FROM exports WHERE JSON_UNQUOTE(JSON_EXTRACT(parameters, '$.job_id')) = %s",
            (stored["job_id"],),
        )
        assert cur.fetchone() == (0,)


async def test_a_transient_store_error_requeues_a_range_export(s3_service: ExportService) -> None:
    (dead_port,) = free_ports(1)
    dead = S3Store(
        BUCKET,
        endpoint=f"http://127.0.0.1:{dead_port}",
        region="us-east-1",
        virtual_hosted_style_request=False,
        client_options={"allow_http": True},
        retry_config={"max_retries": 0},
    )
    service = ExportService(s3_service.db, s3_service.settings, store=S3ExportStore(dead, dead, PREFIX))
    export = await _running_export(service.db, service.owner, 1, created_to=datetime(2001, 3, 1))
    with pytest.raises(StoreUnavailable):
        await service.write_range(export)
    await service._run_claimed(export)  # what the worker does with that error: hand it back
    row = await service.db.run(lambda conn: ExportRepository(conn).get(export.export_id), transaction=False)
    assert (row.state, row.lease_owner, row.error) == ("queued", None, None)


async def test_cli_export_copies_the_object_to_a_file(
    s3_service: ExportService, replica_a: Client, tmp_path: Path
) -> None:
    from service.operator import export_to_file

    stored = await put_job(replica_a, {"cli": True})
    out = tmp_path / "out" / "export.json"
    export = await export_to_file(s3_service.settings, fmt="json", compression="none", out=out, job_id=stored["job_id"])
    assert export.object_key == f"{PREFIX}{export.export_id}/1.json"
    assert hashlib.sha256(out.read_bytes()).hexdigest() == export.sha256
    # Nothing on the local disk (the exports directory is tmp_path, which holds only the copy's directory).
    assert [path.name for path in Path(s3_service.settings.exports_dir).iterdir()] == ["out"]


async def test_an_export_over_the_size_cap_leaves_no_object(s3_service: ExportService, raw_store: S3Store) -> None:
    capped = msgspec.structs.replace(s3_service.settings, export_max_bytes=100_000)
    service = ExportService(s3_service.db, capped)
    export = await _running_export(service.db, service.owner, 1, created_to=datetime(2001, 4, 1))
    # Rows for the export's one-second window, ~6 MB in all: past the cap and past one multipart part.
    with connect(capped.database_url) as conn, conn.cursor() as cur:
        for i in range(3):
            at = datetime(2001, 3, 31, 23, 59, 59, i)
            cur.execute(
                "INSERT INTO job_results (job_id, status, result_data, version, created_at, updated_at) "
                "VALUES (%s, 'succeeded', %s, 1, %s, %s)",
                (f"cap-{uuid.uuid4().hex}", json.dumps({"blob": "q" * 2_000_000}), at, at),
            )
    with pytest.raises(ExportTooLarge):
        await service.write_range(export)
    assert await keys_of(raw_store, export.export_id) == []
