"""Where export files live: one small interface, two backends (``local`` disk, ``s3`` object store).

An export is written through an :class:`ExportWriter` (``write`` chunks, then ``commit`` or ``discard``)
and read back by key. Keys are chosen by the backend from the server-generated export id, the attempt
and the format; callers never build paths or keys themselves.

* ``local`` (:class:`exports.files.LocalStore`): one file ``<export_id>.<ext>`` per export in
  ``JOBRESULTS_EXPORTS_DIR``, written to a per-owner temporary name and renamed into place.
* ``s3`` (:class:`exports.s3.S3ExportStore`): one object ``<prefix><export_id>/<attempt>.<ext>`` per
  attempt, uploaded as a stream (multipart), so a worker that lost its lease never overwrites the
  winner's object.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from config.settings import Settings


class StoreError(Exception):
    """The export store failed or refused; ``str()`` is safe to show clients (no keys, hosts, secrets)."""

    transient = False


class StoreUnavailable(StoreError):
    """The store did not answer or answered 5xx or timed out: worth trying again later."""

    transient = True


class StoreRefused(StoreError):
    """The store refused the request (credentials, permissions, missing bucket, quota): an operator must act."""


class ObjectMissing(Exception):
    """The export's file or object is no longer in the store."""


@dataclass(frozen=True)
class StoredObject:
    """An attempt's object in the store: its key, export id, attempt number and last change (aware UTC)."""

    key: str
    export_id: str
    attempt: int
    modified: datetime


class ExportWriter(Protocol):
    """One export file being written. ``key`` is where it will be once committed."""

    key: str

    @property
    def size(self) -> int:
        """Bytes stored so far (compressed, when gzip); final once committed."""
        ...

    async def write(self, data: bytes) -> None:
        """Append ``data`` (uncompressed bytes of the format; the writer compresses and hashes).

        Raises:
            exports.files.StorageFull: the local disk is full (the partial file was removed).
            StoreError: the object store failed (the partial upload was aborted).
        """
        ...

    async def commit(self) -> tuple[int, str]:
        """Make the object complete under ``key``; returns ``(bytes, sha256 hex)`` of what was stored.

        Raises:
            exports.files.StorageFull: the local disk is full; nothing was left behind.
            StoreError: the object store failed; nothing was left behind.
        """
        ...

    async def discard(self) -> None:
        """Abandon an uncommitted write and remove what it left (idempotent)."""
        ...

    async def remove(self) -> None:
        """Remove the committed object (its recording in the database failed)."""
        ...


class ExportStore(Protocol):
    """The storage backend of export files."""

    kind: str
    """``local`` or ``s3``."""

    async def open_writer(
        self, export_id: str, attempt: int, extension: str, compression: str, owner: str
    ) -> ExportWriter:
        """A writer for one attempt of one export (``extension`` e.g. ``ndjson``; ``compression`` none/gzip)."""
        ...

    async def size(self, key: str) -> int:
        """The stored object's size in bytes.

        Raises:
            ObjectMissing: no such object.
            StoreError: the store failed.
        """
        ...

    def read(self, key: str, start: int, stop: int) -> AsyncIterator[bytes]:
        """The bytes ``[start, stop)`` of the object, in chunks (``ObjectMissing``/``StoreError`` on failure)."""
        ...

    async def presigned_url(self, key: str, ttl_s: int, method: Literal["GET", "HEAD"] = "GET") -> str:
        """A URL that downloads the object without credentials for ``ttl_s`` seconds (a bearer secret).

        ``method`` is the one the URL is signed for (a GET URL refuses HEAD, and the reverse).

        Raises:
            NotImplementedError: the backend has no URLs (``local``).
            StoreError: signing needed credentials that could not be fetched.
        """
        ...

    async def remove(self, key: str) -> None:
        """Delete the object (missing is fine)."""
        ...

    async def list_attempts(self) -> list[StoredObject]:
        """Every attempt's object in the store (``local``: none, its leftovers are temporary files)."""
        ...

    async def check(self) -> None:
        """Raise :class:`StoreError` unless the store answers (``/readyz``)."""
        ...


def download_name(export_id: str, extension: str, compression: str) -> str:
    """``<export_id>.<extension>`` plus ``.gz`` when gzip-compressed: the file name clients see."""
    return f"{export_id}.{extension}" + (".gz" if compression == "gzip" else "")


def open_store(settings: Settings) -> ExportStore:
    """The backend named by ``JOBRESULTS_EXPORTS_STORE`` (settings are already validated)."""
    if settings.exports_store == "s3":
        from exports.s3 import S3ExportStore

        return S3ExportStore.from_settings(settings)
    from exports.files import LocalStore

    return LocalStore(settings.exports_path)
