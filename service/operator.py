"""Operator commands behind ``jobresults import``, ``export``, ``keys`` and ``purge``.

They use the same validation and the same export pipeline as the API.
"""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import msgspec
from tqdm import tqdm

from config.settings import Settings
from exports.columns import ColumnSelection
from exports.pipeline import ExportService
from exports.store import open_store
from repositories.api_keys import ApiKey, ApiKeyRepository
from repositories.database import Connection, Database
from repositories.domain import JOB_ID_RULE, Compression, Format, JobStatus, is_valid_job_id, utcnow
from repositories.exports import Export, ExportParameters
from repositories.job_results import JobResultMeta, JobResultRepository
from service.auth import new_token
from service.export_purge import purge_tasks
from service.json_fidelity import MalformedJSON, UnfaithfulJSON, check_document
from service.purge import PassReport, PurgeBatch, PurgeRunner


class ImportReport(msgspec.Struct):
    """What ``import_files`` did: ``(path, job_id, "created"|"replaced")`` and ``(path, reason)``."""

    imported: list[tuple[str, str, str]]
    refused: list[tuple[str, str]]


def _files(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*.json") if p.is_file())
        else:
            yield path


def _upsert(
    job_id: str, status: JobStatus, text: str, labels: dict[str, str], default_days: int | None
) -> Callable[[Connection], Awaitable[tuple[JobResultMeta, bool]]]:
    async def unit(conn: Connection) -> tuple[JobResultMeta, bool]:
        now = utcnow()
        expires_at = None if default_days is None else now + timedelta(days=default_days)
        return await JobResultRepository(conn).upsert(job_id, status, text, labels, expires_at=expires_at, now=now)

    return unit


async def import_files(
    settings: Settings,
    paths: list[Path],
    *,
    job_id: str | None,
    status: JobStatus,
    labels: dict[str, str] | None = None,
) -> ImportReport:
    """Store each JSON file as one job's result; the job id is the file name without its last suffix.

    Files are checked exactly as ``PUT /v1/job-results/{job_id}`` checks bodies (job id rule, size cap,
    JSON fidelity); refused files are reported with the reason and nothing of them is stored. Every
    file gets ``labels`` (checked by the caller, see ``service/labels.py``), replacing any it had, as a
    PUT does. Like a PUT without
    ``retention_days``, each result expires after ``JOBRESULTS_RESULT_RETENTION_DAYS`` (if set),
    counted from its import.
    """
    report = ImportReport(imported=[], refused=[])
    files = list(_files(paths))
    if job_id is not None and len(files) != 1:
        report.refused.append(("--job-id", "--job-id names one job, so give exactly one file"))
        return report
    db = await Database.open(settings)
    seen: dict[str, Path] = {}
    try:
        for path in files:
            name = job_id or path.stem
            reason = None
            if name in seen:
                reason = f"job id {name!r} also comes from {seen[name]}; pass one of them with --job-id"
            elif not is_valid_job_id(name):
                reason = f"{name!r} is not a valid job id ({JOB_ID_RULE}); pass --job-id"
            elif not path.is_file():
                reason = "no such file"
            elif path.stat().st_size > settings.max_body_bytes:
                reason = f"larger than JOBRESULTS_MAX_BODY_BYTES ({settings.max_body_bytes} bytes)"
            if reason is None:
                try:
                    text = check_document(path.read_bytes())
                except MalformedJSON as exc:
                    reason = f"not one JSON document: {exc}"
                except UnfaithfulJSON as exc:
                    reason = f"cannot be stored faithfully: {exc.path}: {exc.reason}"
            if reason is not None:
                report.refused.append((str(path), reason))
                continue
            seen[name] = path
            _meta, created = await db.run(_upsert(name, status, text, labels or {}, settings.result_retention_days))
            report.imported.append((str(path), name, "created" if created else "replaced"))
    finally:
        await db.close()
    return report


async def export_to_file(
    settings: Settings,
    *,
    fmt: Format,
    compression: Compression,
    out: Path,
    job_id: str | None = None,
    parameters: ExportParameters | None = None,
    columns: ColumnSelection | None = None,
) -> Export:
    """Run an export through the API's pipeline (recorded in ``exports``) and copy its file to ``out``.

    ``columns`` chooses the columns of a single-job export; a range export's are in ``parameters``.

    Shows a progress bar (rows, rate, ETA) on stderr for range exports.

    Raises:
        JobResultNotFound: ``job_id`` names no job.
        StorageFull: the exports directory's disk is full.
    """
    db = await Database.open(settings)
    try:
        service = ExportService(db, settings)
        requested_by = f"cli:{_user()}"
        if job_id is not None:
            export = await service.export_job(job_id, fmt, compression, requested_by, columns=columns)
        else:
            assert parameters is not None
            total = await service.count_rows(parameters)
            with tqdm(total=total, unit="rows", unit_scale=True, file=sys.stderr, desc="export") as bar:
                export = await service.run_now(
                    parameters, fmt, compression, requested_by, progress=lambda rows: bar.update(rows - bar.n)
                )
    finally:
        await db.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as handle:  # from whichever store holds it (a local file or an S3 object)
        async for chunk in service.store.read(export.object_key or str(export.file_name), 0, export.bytes or 0):
            handle.write(chunk)
    return export


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


async def create_key(
    settings: Settings, name: str, scopes: tuple[str, ...], rate_limit: str | None = None
) -> tuple[str, ApiKey]:
    """Create an API key; returns ``(token, key)``. The token is shown once and never stored."""
    token, key_id, digest = new_token()
    db = await Database.open(settings)
    try:
        key = await db.run(lambda conn: ApiKeyRepository(conn).insert(key_id, name, digest, scopes, rate_limit))
    finally:
        await db.close()
    return token, key


async def list_keys(settings: Settings) -> list[ApiKey]:
    """Every API key (never a token)."""
    db = await Database.open(settings)
    try:
        return await db.run(lambda conn: ApiKeyRepository(conn).list(), transaction=False)
    finally:
        await db.close()


async def revoke_key(settings: Settings, key_id: str) -> ApiKey:
    """Revoke a key; running services stop accepting it within ``JOBRESULTS_AUTH_CACHE_TTL_S``.

    Raises:
        ApiKeyNotFound: no such key.
    """
    db = await Database.open(settings)
    try:
        return await db.run(lambda conn: ApiKeyRepository(conn).revoke(key_id))
    finally:
        await db.close()


async def purge_dry_run(settings: Settings, limit: int) -> dict[str, tuple[PurgeBatch, datetime | None]]:
    """What ``jobresults purge`` would delete now; deletes nothing.

    Returns, per task, its first ``limit`` due items and when the oldest of them fell due (naive UTC).
    """
    db = await Database.open(settings)
    try:
        return await PurgeRunner(db, settings, tasks=purge_tasks(open_store(settings), settings)).dry_run(limit)
    finally:
        await db.close()


async def purge_now(settings: Settings) -> PassReport:
    """Run one purge pass in this process, under the same lease as the services' purge workers.

    Raises:
        LeaseHeld: a service process is running a pass right now.
    """
    db = await Database.open(settings)
    try:
        return await PurgeRunner(db, settings, tasks=purge_tasks(open_store(settings), settings)).run_pass()
    finally:
        await db.close()
