"""Service settings, read from ``JOBRESULTS_*`` environment variables and validated at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import unquote, urlsplit

import msgspec

PREFIX = "JOBRESULTS_"


class SettingsError(ValueError):
    """A ``JOBRESULTS_*`` variable is missing or invalid; the message names the variable."""


class DatabaseURL(msgspec.Struct, frozen=True):
    """Parts of a ``mysql://user:password@host:port/database`` URL."""

    host: str
    port: int
    user: str
    password: str
    database: str

    @classmethod
    def parse(cls, url: str) -> DatabaseURL:
        """Parse ``mysql://user:password@host:port/database`` (port defaults to 3306).

        Raises:
            ValueError: the scheme is not ``mysql`` or the host or database is missing.
        """
        parts = urlsplit(url)
        if parts.scheme not in {"mysql", "mariadb"}:
            raise ValueError("must look like mysql://user:password@host:port/database")
        database = parts.path.lstrip("/")
        if not parts.hostname or not database or "/" in database:
            raise ValueError("must look like mysql://user:password@host:port/database")
        try:
            port = parts.port or 3306
        except ValueError as exc:
            raise ValueError("port must be a number from 1 to 65535") from exc
        return cls(
            host=parts.hostname,
            port=port,
            user=unquote(parts.username or "root"),
            password=unquote(parts.password or ""),
            database=unquote(database),
        )

    def redacted(self) -> str:
        """The URL with the password replaced by ``***``, safe to log."""
        return f"mysql://{self.user}:***@{self.host}:{self.port}/{self.database}"


Positive = Annotated[int, msgspec.Meta(ge=1)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]


class Settings(msgspec.Struct, kw_only=True, frozen=True):
    """Typed settings. Each field ``name`` is read from ``JOBRESULTS_<NAME>``."""

    database_url: str
    """``JOBRESULTS_DATABASE_URL``: ``mysql://user:password@host:port/database`` (required)."""
    pool_min_size: Annotated[int, msgspec.Meta(ge=0)] = 1
    """``JOBRESULTS_POOL_MIN_SIZE``: connections each worker opens at start-up."""
    pool_max_size: Positive = 8
    """``JOBRESULTS_POOL_MAX_SIZE``: most connections one worker holds at once."""
    pool_recycle_s: Positive = 3600
    """``JOBRESULTS_POOL_RECYCLE_S``: seconds after which an idle pooled connection is reopened.
    Keep it below the server's ``wait_timeout`` (28800 s by default)."""
    connect_timeout_s: Seconds = 5.0
    """``JOBRESULTS_CONNECT_TIMEOUT_S``: seconds to wait for a new MySQL connection."""
    query_timeout_s: Seconds = 30.0
    """``JOBRESULTS_QUERY_TIMEOUT_S``: seconds one unit of work may take before it is cancelled
    and its connection closed."""
    lock_wait_timeout_s: Annotated[int, msgspec.Meta(ge=1, le=60)] = 1
    """``JOBRESULTS_LOCK_WAIT_TIMEOUT_S``: whole seconds a statement waits for a row lock held by another
    session (the session's ``innodb_lock_wait_timeout``) before failing with 1205; the unit of work
    is then retried within its retry budget and answered 503 with ``Retry-After``."""
    exports_dir: str = "./data/exports"
    """``JOBRESULTS_EXPORTS_DIR``: directory that holds export files (created if missing, mode 0700)."""
    host: str = "127.0.0.1"
    """``JOBRESULTS_HOST``: address Granian binds."""
    port: Port = 8000
    """``JOBRESULTS_PORT``: TCP port Granian binds."""
    workers: Positive = 1
    """``JOBRESULTS_WORKERS``: Granian worker processes."""
    max_body_bytes: Positive = 16 * 1024 * 1024
    """``JOBRESULTS_MAX_BODY_BYTES``: largest accepted request body; larger bodies get 413."""
    list_max_bytes: Positive = 8 * 1024 * 1024
    """``JOBRESULTS_LIST_MAX_BYTES``: a page of ``GET /v1/job-results?include=result`` ends before its
    documents would pass this many bytes of JSON in total (it always holds at least one item; its
    ``next_cursor`` continues after the last one)."""
    export_lease_s: Seconds = 30.0
    """``JOBRESULTS_EXPORT_LEASE_S``: a running range export whose worker stopped renewing its lease for
    this long is claimed again by another worker (renewed every third of it)."""
    export_poll_s: Seconds = 1.0
    """``JOBRESULTS_EXPORT_POLL_S``: how often an idle export worker looks for queued range exports."""
    export_chunk_rows: Positive = 500
    """``JOBRESULTS_EXPORT_CHUNK_ROWS``: rows fetched and written per step of a range export (at most)."""
    export_chunk_bytes: Positive = 8 * 1024**2
    """``JOBRESULTS_EXPORT_CHUNK_BYTES``: a step of a range export also ends once its stored documents
    reach this many bytes (8 MiB), so its memory is bounded in bytes, not rows; a step holds at least
    one row."""
    csv_max_columns: Positive = 10_000
    """``JOBRESULTS_CSV_MAX_COLUMNS``: the most result columns a CSV export may have; a wider one fails
    with a clear error and leaves no file (use json or ndjson for such documents)."""
    export_max_attempts: Positive = 3
    """``JOBRESULTS_EXPORT_MAX_ATTEMPTS``: a range export failing this often on database errors is failed."""
    export_max_bytes: Positive = 10 * 1024**3
    """``JOBRESULTS_EXPORT_MAX_BYTES``: the largest export file (bytes as stored, after compression); an
    export that would pass it fails and leaves no file (10 GiB)."""
    exports_max_pending_per_key: Positive = 10
    """``JOBRESULTS_EXPORTS_MAX_PENDING_PER_KEY``: range exports one API key (or, without auth, one client
    address) may have queued or running at once; one more is refused with 429 and ``Retry-After``."""
    export_retention_days: Annotated[int, msgspec.Meta(ge=1, le=3650)] = 30
    """``JOBRESULTS_EXPORT_RETENTION_DAYS``: days a finished export is kept, counted from when it finished
    (succeeded, failed or cancelled); afterwards its content is 410 Gone and the purge removes its file and
    record (1..3650)."""
    export_worker: bool = True
    export_wait_max: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1000
    """``JOBRESULTS_EXPORT_WAIT_MAX``: long-polling requests (``GET /v1/exports/{id}?wait=N``) one process
    holds at once; one more is refused with 503 ``too-many-waiters`` and ``Retry-After``. Granian's
    per-worker request limit (backpressure) is raised by this much, so waiters never crowd out other requests."""
    export_wait_poll_s: Annotated[float, msgspec.Meta(ge=0.1, le=60)] = 1.0
    """``JOBRESULTS_EXPORT_WAIT_POLL_S``: how often one task per process reads the state of every export
    its long-polling requests wait for (one query per 1,000 exports), the fallback for a lost Redis
    message or a Redis outage."""
    """``JOBRESULTS_EXPORT_WORKER``: run range exports in this process's background worker."""
    auth_enabled: bool = True
    """``JOBRESULTS_AUTH_ENABLED``: require an API key on every ``/v1`` call and on ``/metrics``.
    Switch off only for benchmarks of the bare service."""
    auth_cache_ttl_s: Seconds = 5.0
    """``JOBRESULTS_AUTH_CACHE_TTL_S``: how long a checked API key is cached per worker; a revoked key
    stops working within this time."""
    exports_visibility: Literal["any", "own"] = "any"
    """``JOBRESULTS_EXPORTS_VISIBILITY``: ``any`` lets every key with ``exports:read`` see and download
    every export; ``own`` limits a key to the exports it requested."""
    redis_url: str | None = None
    """``JOBRESULTS_REDIS_URL``: e.g. ``redis://127.0.0.1:6379/0``. Rate-limit counters live there, shared
    by every worker and instance. Required with more than one worker."""
    rate_limit_enabled: bool = True
    """``JOBRESULTS_RATE_LIMIT_ENABLED``: apply rate limits to the API (``/v1``, ``/metrics``)."""
    rate_limit_per_ip: str = "10/second"
    """``JOBRESULTS_RATE_LIMIT_PER_IP``: requests per client IP (``limits`` notation: ``10/second``,
    ``600/minute``); applies to requests without a key of their own limit."""
    rate_limit_per_key: str | None = None
    """``JOBRESULTS_RATE_LIMIT_PER_KEY``: an extra limit per API key for keys without their own limit
    (none by default). A key's own limit (``jobresults keys create --rate-limit``) replaces both."""
    trusted_proxies: str = ""
    """``JOBRESULTS_TRUSTED_PROXIES``: comma-separated addresses or networks of reverse proxies whose
    ``X-Forwarded-For`` / ``Forwarded`` headers name the client; empty trusts none."""
    hsts_max_age_s: Annotated[int, msgspec.Meta(ge=0)] = 63072000
    """``JOBRESULTS_HSTS_MAX_AGE_S``: ``Strict-Transport-Security`` max-age in seconds (2 years); 0 turns
    the header off (e.g. when a proxy in front sets it)."""
    log_level: str = "info"
    """``JOBRESULTS_LOG_LEVEL``: debug, info, warning or error."""
    docs_enabled: bool = True
    """``JOBRESULTS_DOCS_ENABLED``: serve ``/schema`` and the Swagger UI."""
    exports_store: Literal["local", "s3"] = "local"
    """``JOBRESULTS_EXPORTS_STORE``: where export files live: ``local`` (``JOBRESULTS_EXPORTS_DIR`` on this
    machine, for one machine) or ``s3`` (an S3-compatible bucket shared by every replica)."""
    s3_bucket: str | None = None
    """``JOBRESULTS_S3_BUCKET``: the bucket that holds export objects (required with ``s3``). Credentials
    come only from the standard AWS variables and chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
    web identity, ECS and EC2 instance roles)."""
    s3_prefix: str = "exports/"
    """``JOBRESULTS_S3_PREFIX``: key prefix of export objects, ``<prefix><export_id>/<attempt>.<ext>``."""
    s3_endpoint: str = ""
    """``JOBRESULTS_S3_ENDPOINT``: ``http(s)://host:port`` of an S3-compatible server; empty for AWS S3."""
    s3_region: str = ""
    """``JOBRESULTS_S3_REGION``: the bucket's region; empty reads ``AWS_REGION``, else ``us-east-1``."""
    s3_public_endpoint: str = ""
    """``JOBRESULTS_S3_PUBLIC_ENDPOINT``: the store's address as clients reach it, used to sign download
    URLs in ``redirect`` mode; empty means ``JOBRESULTS_S3_ENDPOINT``."""
    exports_download: Literal["stream", "redirect"] = "stream"
    """``JOBRESULTS_EXPORTS_DOWNLOAD``: ``stream`` serves export content through the API; ``redirect``
    (``s3`` only) answers 302 to a presigned URL of the object."""
    exports_url_ttl_s: Positive = 60
    """``JOBRESULTS_EXPORTS_URL_TTL_S``: seconds a presigned download URL stays valid (at most 604800,
    7 days: SigV4's limit)."""
    webhooks_worker: bool = True
    """``JOBRESULTS_WEBHOOKS_WORKER``: deliver webhook events from this process's background worker."""
    webhooks_allow_private: bool = False
    """``JOBRESULTS_WEBHOOKS_ALLOW_PRIVATE``: allow ``http`` webhook URLs and loopback or private addresses
    (tests, closed networks). Link-local (cloud metadata), multicast and reserved addresses stay refused."""
    webhooks_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 10.0
    """``JOBRESULTS_WEBHOOKS_TIMEOUT_S``: longest time one delivery attempt may take (connect, send, answer)."""
    webhooks_poll_s: Seconds = 1.0
    """``JOBRESULTS_WEBHOOKS_POLL_S``: how often an idle delivery worker looks for due events."""
    webhooks_retry_base_s: Seconds = 5.0
    """``JOBRESULTS_WEBHOOKS_RETRY_BASE_S``: pause after the first failed attempt; each further pause is
    4 times longer (with +-20 % jitter) up to ``JOBRESULTS_WEBHOOKS_RETRY_MAX_S``."""
    webhooks_retry_max_s: Seconds = 21600.0
    """``JOBRESULTS_WEBHOOKS_RETRY_MAX_S``: longest pause between two attempts (6 h)."""
    webhooks_max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 11
    """``JOBRESULTS_WEBHOOKS_MAX_ATTEMPTS``: attempts per event before it is given up (11: the last one about
    26 h after the first with the default pauses). An endpoint whose attempts failed this many times in a row
    is disabled."""
    webhooks_cache_ttl_s: Seconds = 5.0
    """``JOBRESULTS_WEBHOOKS_CACHE_TTL_S``: how long a process caches which event types have subscribers;
    a webhook created or changed through another process receives events after at most this long."""
    result_retention_days: Annotated[int, msgspec.Meta(ge=1, le=3650)] | None = None
    """``JOBRESULTS_RESULT_RETENTION_DAYS``: days a result is kept after its last write when its PUT named
    neither ``retention_days`` nor ``pinned`` (1..3650); unset keeps such results forever. The value in
    force at a write sets that result's ``expires_at``; changing it later moves no stored expiry."""
    purge_worker: bool = True
    """``JOBRESULTS_PURGE_WORKER``: run the purge of expired results in this process's background worker
    (one process of the deployment purges at a time, under a lease)."""
    purge_interval_s: Seconds = 60.0
    """``JOBRESULTS_PURGE_INTERVAL_S``: pause between two purge passes once nothing more is due."""
    purge_batch_rows: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 500
    """``JOBRESULTS_PURGE_BATCH_ROWS``: rows deleted per purge transaction (1..10000)."""
    purge_pause_s: Annotated[float, msgspec.Meta(ge=0)] = 0.05
    """``JOBRESULTS_PURGE_PAUSE_S``: pause between two batches while catching up, on top of one as long as
    the batch itself took, so the purge uses at most half of one connection's time."""
    webhooks_retention_days: Positive = 7
    """``JOBRESULTS_WEBHOOKS_RETENTION_DAYS``: days settled events and delivery attempts are kept."""

    @property
    def exports_path(self) -> Path:
        """``exports_dir`` as an absolute path."""
        return Path(self.exports_dir).resolve()

    @property
    def database(self) -> DatabaseURL:
        """The parsed ``database_url``."""
        return DatabaseURL.parse(self.database_url)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Build settings from ``environ`` (default ``os.environ``) plus keyword overrides.

        Raises:
            SettingsError: a variable is missing or invalid; the message names it and says what
                is allowed.
        """
        env = os.environ if environ is None else environ
        raw: dict[str, object] = {}
        for name in cls.__struct_fields__:
            key = PREFIX + name.upper()
            if key in env:
                raw[name] = env[key]
        raw.update(overrides)
        if "database_url" not in raw:
            raise SettingsError(f"{PREFIX}DATABASE_URL is required, e.g. mysql://root:@127.0.0.1:3306/test")
        for name, value in raw.items():
            try:
                msgspec.convert({name: value}, type=_single_field(name), strict=False)
            except msgspec.ValidationError as exc:
                raise SettingsError(f"{PREFIX}{name.upper()}={value!r} is invalid: {_why(exc)}") from None
        settings = msgspec.convert(raw, type=cls, strict=False)
        try:
            DatabaseURL.parse(settings.database_url)
        except ValueError as exc:
            raise SettingsError(f"{PREFIX}DATABASE_URL is invalid: {exc}") from None
        if settings.pool_min_size > settings.pool_max_size:
            raise SettingsError(
                f"{PREFIX}POOL_MIN_SIZE ({settings.pool_min_size}) must not exceed "
                f"{PREFIX}POOL_MAX_SIZE ({settings.pool_max_size})"
            )
        for name in ("rate_limit_per_ip", "rate_limit_per_key"):
            value = getattr(settings, name)
            if value is not None and not _is_rate(value):
                raise SettingsError(f"{PREFIX}{name.upper()}={value!r} is invalid: use e.g. 10/second or 600/minute")
        try:
            _networks(settings.trusted_proxies)
        except ValueError:
            raise SettingsError(
                f"{PREFIX}TRUSTED_PROXIES={settings.trusted_proxies!r} is invalid: comma-separated IPs or networks"
            ) from None
        if settings.redis_url is not None and not _is_redis_url(settings.redis_url):
            raise SettingsError(
                f"{PREFIX}REDIS_URL={settings.redis_url!r} is invalid: use e.g. redis://127.0.0.1:6379/0 "
                f"(or rediss://, unix://), or leave the variable unset for no Redis"
            )
        if settings.workers > 1 and settings.rate_limit_enabled and not settings.redis_url:
            raise SettingsError(
                f"{PREFIX}WORKERS={settings.workers} needs {PREFIX}REDIS_URL: without a shared store each worker "
                f"would count rate limits on its own and multiply them (or set {PREFIX}RATE_LIMIT_ENABLED=false)"
            )
        if settings.webhooks_retry_base_s > settings.webhooks_retry_max_s:
            raise SettingsError(
                f"{PREFIX}WEBHOOKS_RETRY_BASE_S ({settings.webhooks_retry_base_s}) must not exceed "
                f"{PREFIX}WEBHOOKS_RETRY_MAX_S ({settings.webhooks_retry_max_s})"
            )
        if settings.log_level.lower() not in {"debug", "info", "warning", "error"}:
            raise SettingsError(f"{PREFIX}LOG_LEVEL must be one of debug, info, warning, error")
        _check_store(settings)
        return settings


MAX_URL_TTL_S = 7 * 24 * 3600
"""SigV4 presigned URLs cannot be valid for longer than 7 days (seconds)."""


def _check_store(settings: Settings) -> None:
    """The object-store settings fit together (``SettingsError`` naming the variable otherwise)."""
    if settings.exports_url_ttl_s > MAX_URL_TTL_S:
        raise SettingsError(
            f"{PREFIX}EXPORTS_URL_TTL_S={settings.exports_url_ttl_s} is invalid: at most {MAX_URL_TTL_S} "
            "(7 days, the longest a SigV4 presigned URL can be valid)"
        )
    for name in ("s3_endpoint", "s3_public_endpoint"):
        value = getattr(settings, name)
        parts = urlsplit(value)
        if value and (parts.scheme not in {"http", "https"} or not parts.hostname or parts.path not in {"", "/"}):
            raise SettingsError(f"{PREFIX}{name.upper()}={value!r} is invalid: use http(s)://host[:port]")
    if settings.s3_prefix.startswith("/") or "//" in settings.s3_prefix:
        raise SettingsError(
            f"{PREFIX}S3_PREFIX={settings.s3_prefix!r} is invalid: a key prefix such as exports/ "
            "(no leading or doubled slash)"
        )
    if settings.exports_store == "s3" and not settings.s3_bucket:
        raise SettingsError(f"{PREFIX}S3_BUCKET is required with {PREFIX}EXPORTS_STORE=s3")
    if settings.exports_download == "redirect" and settings.exports_store != "s3":
        raise SettingsError(
            f"{PREFIX}EXPORTS_DOWNLOAD=redirect needs {PREFIX}EXPORTS_STORE=s3 (a local file has no URL to "
            "redirect to); use stream"
        )


def _is_rate(value: str) -> bool:
    from limits import parse

    try:
        parse(value)
    except ValueError:
        return False
    return True


def _is_redis_url(url: str) -> bool:
    """True for ``redis://host[:port][/db]``, ``rediss://...`` or ``unix:///path``."""
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - raises ValueError when the port is not a number
    except ValueError:
        return False
    if parts.scheme == "unix":
        return bool(parts.path)
    db = parts.path.lstrip("/")
    return parts.scheme in {"redis", "rediss"} and bool(parts.hostname) and (not db or db.isdigit())


def _networks(spec: str) -> list[object]:
    import ipaddress

    return [ipaddress.ip_network(part.strip(), strict=False) for part in spec.split(",") if part.strip()]


def _why(exc: msgspec.ValidationError) -> str:
    message = str(exc)
    return message.split(" - at ")[0]


_SINGLE: dict[str, type] = {}


def _single_field(name: str) -> type:
    """A one-field Struct with the same type and constraints as ``Settings.<name>``."""
    if name not in _SINGLE:
        annotation = Settings.__annotations__[name]
        _SINGLE[name] = msgspec.defstruct(f"_{name}", [(name, annotation)])
    return _SINGLE[name]
