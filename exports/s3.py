"""The ``s3`` export store: export files as objects in an S3-compatible bucket, through obstore.

obstore (Python bindings of the Rust ``object_store`` crate) streams a multipart upload from an async
iterator, aborts the upload when that iterator raises, reads byte ranges, and signs URLs offline.
Credentials come only from the standard AWS environment and chain (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, web identity, ECS and EC2 instance roles), which
``object_store`` reads itself; they never pass through our settings or logs.

Every attempt of an export writes its own key, ``<prefix><export_id>/<attempt>.<ext>``, so a worker
that lost its lease never overwrites the object the winner recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import os
import re
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

import obstore
import structlog
from obstore.exceptions import BaseError, NotFoundError, PermissionDeniedError, UnauthenticatedError
from obstore.store import S3Store

from exports.store import ObjectMissing, StoredObject, StoreError, StoreRefused, StoreUnavailable, download_name

if TYPE_CHECKING:
    from config.settings import Settings

log = structlog.get_logger("jobresults.exports.s3")

PART_SIZE = 5 * 1024 * 1024
"""Bytes per multipart part (S3's minimum); smaller exports are stored with one PUT."""
SEND_SIZE = 1024 * 1024
"""Once an upload runs, bytes are handed to it in pieces of about this size."""
UPLOAD_CONCURRENCY = 2
"""Parts in flight at once; with :data:`PART_SIZE` this bounds the memory an upload holds."""
READ_CHUNK = 256 * 1024
_STATUS = re.compile(r"status code: (\d{3})")
_MEDIA_TYPES = {"json": "application/json", "ndjson": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}
_END: Any = object()
_ABORT: Any = object()


class _Aborted(Exception):
    """Raised inside the upload's chunk iterator so that obstore aborts the multipart upload."""


def store_error(exc: BaseException, action: str) -> StoreError:
    """A safe :class:`StoreError` for an obstore (or connection) error; logs its kind, never its text."""
    status = _STATUS.search(str(exc))
    code = int(status.group(1)) if status else None
    log.warning("export_store.error", action=action, error=type(exc).__name__, status=code)
    if isinstance(exc, PermissionDeniedError | UnauthenticatedError) or code in (401, 403):
        return StoreRefused("the export store refused the credentials or permissions; check its settings")
    if code is not None and 400 <= code < 500:
        return StoreRefused(f"the export store refused the file (HTTP {code}); check its bucket and quota")
    if isinstance(exc, NotFoundError):
        return StoreRefused("the export store's bucket does not exist")
    return StoreUnavailable("the export store is unavailable; try again later")


class _Sink:
    """File-like target of the gzip stream (or of raw bytes): counts, hashes and collects them."""

    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.pending = bytearray()

    def write(self, data: bytes) -> int:
        self.pending += data
        self.sha256.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        """Nothing to flush: bytes leave through :meth:`take`."""

    def take(self) -> bytes:
        out = bytes(self.pending)
        self.pending.clear()
        return out


class S3Writer:
    """One attempt's object being uploaded (an :class:`exports.store.ExportWriter`).

    Bytes collect in memory up to :data:`PART_SIZE`; a small export is then stored with one PUT, a larger
    one streams as a multipart upload fed through a queue of at most two pieces of :data:`SEND_SIZE`.
    Compressing, hashing and collecting run in a worker thread. The bytes are identical to the ``local``
    backend's (gzip with mtime 0), so is their sha256.
    """

    def __init__(self, store: S3ExportStore, key: str, attributes: dict[str, str], compression: str) -> None:
        self.key = key
        self._store = store
        self._attributes = attributes
        self._sink = _Sink()
        self._gzip = gzip.GzipFile(fileobj=self._sink, mode="wb", mtime=0) if compression == "gzip" else None
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=2)
        self._upload: asyncio.Task[None] | None = None
        self._committed = False

    @property
    def size(self) -> int:
        """Bytes stored so far (compressed, when gzip)."""
        return self._sink.size

    async def write(self, data: bytes) -> None:
        """Compress and hash ``data`` (in a thread) and send it on; ``StoreError`` if the upload failed."""
        ready = await asyncio.to_thread(self._absorb, data, self._upload is not None)
        if ready:
            await self._send(ready)

    def _absorb(self, data: bytes, uploading: bool) -> bytes:
        if self._gzip is not None:
            self._gzip.write(data)
        else:
            self._sink.write(data)
        pending = len(self._sink.pending)
        if pending >= PART_SIZE or (uploading and pending >= SEND_SIZE):
            return self._sink.take()
        return b""

    async def commit(self) -> tuple[int, str]:
        """Finish the upload; ``(bytes, sha256 hex)``. Raises :class:`StoreError` (nothing is left)."""
        if self._gzip is not None:
            await asyncio.to_thread(self._gzip.close)
        rest = self._sink.take()
        try:
            if self._upload is None:
                await obstore.put_async(
                    self._store.store, self.key, rest, attributes=self._attributes, use_multipart=False
                )
            else:
                if rest:
                    await self._send(rest)
                await self._send(_END)
                await self._upload
        except StoreError:
            await self.discard()
            raise
        except (BaseError, OSError) as exc:
            await self.discard()
            raise store_error(exc, "put") from None
        self._committed = True
        return self._sink.size, self._sink.sha256.hexdigest()

    async def discard(self) -> None:
        """Abort the multipart upload, if one was started and is still running (idempotent)."""
        upload = self._upload
        if upload is None or self._committed:
            return
        if not upload.done():
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(_ABORT)
        with contextlib.suppress(Exception):
            await upload

    async def remove(self) -> None:
        """Delete the committed object."""
        await self._store.remove(self.key)

    async def _send(self, item: Any) -> None:
        if self._upload is None:
            self._upload = asyncio.create_task(self._run_upload())
        put = asyncio.ensure_future(self._queue.put(item))
        await asyncio.wait({put, self._upload}, return_when=asyncio.FIRST_COMPLETED)
        if put.done():
            return
        put.cancel()
        try:
            self._upload.result()
        except (BaseError, OSError) as exc:
            raise store_error(exc, "put") from None
        raise StoreUnavailable("the export store is unavailable; try again later")  # ended without error

    async def _chunks(self) -> AsyncIterator[bytes]:
        while True:
            item = await self._queue.get()
            if item is _END:
                return
            if item is _ABORT:
                raise _Aborted
            yield item

    async def _run_upload(self) -> None:
        try:
            await obstore.put_async(
                self._store.store,
                self.key,
                self._chunks(),
                attributes=self._attributes,
                chunk_size=PART_SIZE,
                max_concurrency=UPLOAD_CONCURRENCY,
            )
        except _Aborted:
            return


class S3ExportStore:
    """Export objects in one bucket under one prefix (``JOBRESULTS_EXPORTS_STORE=s3``)."""

    kind = "s3"

    def __init__(self, store: S3Store, signer: S3Store, prefix: str) -> None:
        self.store = store
        self.signer = signer
        self.prefix = prefix
        self._key_pattern = re.compile(re.escape(prefix) + r"([0-9a-f]{32})/(\d+)\.[a-z.]+")

    @classmethod
    def from_settings(cls, settings: Settings) -> S3ExportStore:
        """Build the store and its URL signer (which names ``JOBRESULTS_S3_PUBLIC_ENDPOINT``)."""
        bucket = settings.s3_bucket or ""
        region = settings.s3_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or ""
        store = _s3(bucket, settings.s3_endpoint, region or "us-east-1")
        signer = _s3(bucket, settings.s3_public_endpoint or settings.s3_endpoint, region or "us-east-1")
        return cls(store, signer, settings.s3_prefix)

    def key(self, export_id: str, attempt: int, extension: str, compression: str) -> str:
        """``<prefix><export_id>/<attempt>.<ext>`` (``.gz`` added when compressed)."""
        return f"{self.prefix}{export_id}/{attempt}.{extension}" + (".gz" if compression == "gzip" else "")

    async def open_writer(self, export_id: str, attempt: int, extension: str, compression: str, owner: str) -> S3Writer:
        """A writer for this attempt's own key (``owner`` is not needed: the key is unique per attempt)."""
        media = "application/gzip" if compression == "gzip" else _MEDIA_TYPES.get(extension, "application/octet-stream")
        attributes = {
            "Content-Type": media,
            "Content-Disposition": f'attachment; filename="{download_name(export_id, extension, compression)}"',
        }
        return S3Writer(self, self.key(export_id, attempt, extension, compression), attributes, compression)

    async def size(self, key: str) -> int:
        """The object's size (HEAD)."""
        try:
            meta = await obstore.head_async(self.store, key)
        except NotFoundError:
            raise ObjectMissing(key) from None
        except (BaseError, OSError) as exc:
            raise store_error(exc, "head") from None
        return int(meta["size"])

    async def read(self, key: str, start: int, stop: int) -> AsyncIterator[bytes]:
        """Bytes ``[start, stop)`` with one ranged GET, streamed in chunks of about 256 KiB."""
        if stop <= start:
            return
        try:
            result = await obstore.get_async(self.store, key, options={"range": (start, stop)})
        except NotFoundError:
            raise ObjectMissing(key) from None
        except (BaseError, OSError) as exc:
            raise store_error(exc, "get") from None
        try:
            async for chunk in result.stream(min_chunk_size=READ_CHUNK):
                yield bytes(chunk)
        except (BaseError, OSError) as exc:
            raise store_error(exc, "get") from None

    async def presigned_url(self, key: str, ttl_s: int, method: Literal["GET", "HEAD"] = "GET") -> str:
        """A SigV4 presigned ``method`` URL for the public endpoint, valid ``ttl_s`` seconds. Never log it."""
        try:
            return await obstore.sign_async(self.signer, method, key, timedelta(seconds=ttl_s))
        except (BaseError, OSError) as exc:
            raise store_error(exc, "sign") from None

    async def remove(self, key: str) -> None:
        """Delete the object (missing is fine)."""
        try:
            await obstore.delete_async(self.store, key)
        except NotFoundError:
            return
        except (BaseError, OSError) as exc:
            raise store_error(exc, "delete") from None

    async def list_attempts(self) -> list[StoredObject]:
        """Every ``<prefix><export_id>/<attempt>.<ext>`` object in the bucket (other keys are ignored)."""
        found: list[StoredObject] = []
        try:
            async for batch in obstore.list(self.store, prefix=self.prefix, chunk_size=1000):
                for meta in batch:
                    match = self._key_pattern.fullmatch(meta["path"])
                    if match:
                        found.append(StoredObject(meta["path"], match[1], int(match[2]), meta["last_modified"]))
        except (BaseError, OSError) as exc:
            raise store_error(exc, "list") from None
        return found

    async def check(self) -> None:
        """List a prefix that holds no objects: proves the endpoint, the credentials and the bucket cheaply."""
        try:
            async for _batch in obstore.list(self.store, prefix=f"{self.prefix}.readyz/", chunk_size=1):
                break
        except (BaseError, OSError) as exc:
            raise store_error(exc, "check") from None


def _s3(bucket: str, endpoint: str, region: str) -> S3Store:
    options: dict[str, Any] = {}
    if endpoint:
        options = {"endpoint": endpoint, "virtual_hosted_style_request": False}
    return S3Store(
        bucket,
        region=region,
        client_options={"allow_http": endpoint.startswith("http://"), "connect_timeout": "5s", "timeout": "60s"},
        retry_config={
            "max_retries": 3,
            "retry_timeout": timedelta(seconds=15),
            "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2), "base": 2},
        },
        **options,
    )
