"""Export files that are complete under their final name, or absent.

A file is written to a temporary name in the exports directory, flushed and fsynced, renamed
atomically (``os.replace``, POSIX ``rename(2)``), and the directory is fsynced so the rename itself
survives a crash. Names come only from the server-generated export id and the format, and the resolved
path is checked to lie inside the exports directory. :class:`AtomicExportFile` blocks: call it from a
worker thread. :class:`LocalStore` is the ``local`` backend of :mod:`exports.store` built on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gzip
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO, Literal

from exports.store import ObjectMissing, StoredObject, StoreRefused

TEMP_SUFFIX = ".tmp"
FILE_MODE = 0o600
DIR_MODE = 0o700
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class StorageFull(Exception):
    """The disk (or quota) is full; nothing partial was left behind. Maps to 507."""


class UnsafeExportPath(Exception):
    """A file name would resolve outside the exports directory (never expected: names are generated)."""


def final_name(export_id: str, extension: str, compression: str) -> str:
    """``<export_id>.<extension>`` plus ``.gz`` when gzip-compressed; ``export_id`` is hex."""
    if not export_id.isalnum() or not extension.isalnum():
        raise UnsafeExportPath(export_id)
    return f"{export_id}.{extension}" + (".gz" if compression == "gzip" else "")


def resolve_inside(directory: Path, name: str) -> Path:
    """``directory / name``, resolved.

    Raises:
        UnsafeExportPath: the result is not directly inside ``directory``.
    """
    root = directory.resolve()
    path = (root / name).resolve()
    if path.parent != root:
        raise UnsafeExportPath(name)
    return path


def ensure_directory(directory: Path) -> Path:
    """Create the exports directory (mode 0700) if needed; return it resolved."""
    directory.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    return directory.resolve()


class _HashingWriter:
    """File-like sink that counts and hashes the bytes that reach the disk."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.raw.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self.raw.flush()


class AtomicExportFile:
    """One export file being written: ``write`` chunks, then ``commit`` or ``discard``.

    Attributes:
        path: the final path (exists only after :meth:`commit`).
        temp_path: ``.<export_id>.<owner>.tmp`` beside it while writing.
    """

    def __init__(self, directory: Path, export_id: str, extension: str, compression: str, owner: str) -> None:
        root = ensure_directory(directory)
        self.path = resolve_inside(root, final_name(export_id, extension, compression))
        self.temp_path = resolve_inside(root, f".{export_id}.{_safe(owner)}{TEMP_SUFFIX}")
        self.directory = root
        try:
            fd = os.open(self.temp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        except OSError as exc:
            _raise_if_full(exc)
            raise
        self._raw: BinaryIO = os.fdopen(fd, "wb")
        self._sink = _HashingWriter(self._raw)
        self._gzip = gzip.GzipFile(fileobj=self._sink, mode="wb", mtime=0) if compression == "gzip" else None

    @property
    def size(self) -> int:
        """Bytes that reached the file so far (compressed, when gzip)."""
        return self._sink.size

    def write(self, data: bytes) -> None:
        """Append ``data`` (uncompressed bytes of the format).

        Raises:
            StorageFull: no space left; the temporary file was removed.
        """
        try:
            if self._gzip is not None:
                self._gzip.write(data)
            else:
                self._sink.write(data)
        except OSError as exc:
            self.discard()
            _raise_if_full(exc)
            raise

    def commit(self) -> tuple[int, str]:
        """Flush, fsync, rename into place and fsync the directory; returns ``(bytes, sha256 hex)``.

        Raises:
            StorageFull: no space left; nothing was left behind.
        """
        try:
            if self._gzip is not None:
                self._gzip.close()
            self._raw.flush()
            os.fsync(self._raw.fileno())
            self._raw.close()
            os.replace(self.temp_path, self.path)
            _fsync_directory(self.directory)
        except OSError as exc:
            self.discard()
            _raise_if_full(exc)
            raise
        return self._sink.size, self._sink.sha256.hexdigest()

    def discard(self) -> None:
        """Close and remove the temporary file (idempotent)."""
        with contextlib.suppress(OSError):
            self._raw.close()
        self.temp_path.unlink(missing_ok=True)

    def remove_final(self) -> None:
        """Remove the committed file, e.g. when the database commit that records it failed."""
        self.path.unlink(missing_ok=True)
        _fsync_directory(self.directory)


def _safe(owner: str) -> str:
    return "".join(ch if ch.isalnum() or ch == "-" else "-" for ch in owner)[:64]


def _raise_if_full(exc: OSError) -> None:
    if exc.errno in _NO_SPACE:
        raise StorageFull("not enough storage for the export file") from exc


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_files(directory: Path) -> list[tuple[Path, str, str, float]]:
    """Temporary export files in ``directory``: ``(path, export_id, owner, age in seconds)``."""
    found: list[tuple[Path, str, str, float]] = []
    if not directory.is_dir():
        return found
    now = time.time()
    for path in directory.glob(f".*{TEMP_SUFFIX}"):
        parts = path.name[1 : -len(TEMP_SUFFIX)].split(".", 1)
        if len(parts) != 2:
            continue
        try:
            age = now - path.stat().st_mtime
        except FileNotFoundError:
            continue
        found.append((path, parts[0], parts[1], age))
    return found


READ_CHUNK = 256 * 1024


class LocalWriter:
    """:class:`exports.store.ExportWriter` over an :class:`AtomicExportFile` (blocking work in threads)."""

    def __init__(self, file: AtomicExportFile) -> None:
        self.file = file
        self.key = file.path.name

    @property
    def size(self) -> int:
        """Bytes written so far (compressed, when gzip)."""
        return self.file.size

    async def write(self, data: bytes) -> None:
        """Append ``data`` (``StorageFull`` when the disk is full)."""
        await asyncio.to_thread(self.file.write, data)

    async def commit(self) -> tuple[int, str]:
        """Flush, fsync and rename into place; ``(bytes, sha256 hex)``."""
        return await asyncio.to_thread(self.file.commit)

    async def discard(self) -> None:
        """Remove the temporary file."""
        await asyncio.to_thread(self.file.discard)

    async def remove(self) -> None:
        """Remove the committed file."""
        await asyncio.to_thread(self.file.remove_final)


class LocalStore:
    """Export files in one directory of this machine (``JOBRESULTS_EXPORTS_STORE=local``).

    Keys are file names, ``<export_id>.<ext>``: every attempt of an export writes its own temporary
    file and renames it to that one name while it holds the export's row lock.
    """

    kind = "local"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def open_writer(
        self, export_id: str, attempt: int, extension: str, compression: str, owner: str
    ) -> LocalWriter:
        """A writer to a temporary file named after ``export_id`` and ``owner`` (``attempt`` is unused)."""
        file = await asyncio.to_thread(AtomicExportFile, self.directory, export_id, extension, compression, owner)
        return LocalWriter(file)

    async def size(self, key: str) -> int:
        """The file's size (``ObjectMissing`` if it is gone or the key is not a plain file name)."""
        try:
            path = resolve_inside(self.directory, key)
            return (await asyncio.to_thread(path.stat)).st_size
        except (UnsafeExportPath, FileNotFoundError):
            raise ObjectMissing(key) from None

    async def read(self, key: str, start: int, stop: int) -> AsyncIterator[bytes]:
        """Bytes ``[start, stop)`` of the file in chunks of at most 256 KiB."""
        try:
            path = resolve_inside(self.directory, key)
            handle = await asyncio.to_thread(path.open, "rb")
        except (UnsafeExportPath, FileNotFoundError):
            raise ObjectMissing(key) from None
        try:
            await asyncio.to_thread(handle.seek, start)
            remaining = stop - start
            while remaining > 0:
                data = await asyncio.to_thread(handle.read, min(READ_CHUNK, remaining))
                if not data:
                    break
                remaining -= len(data)
                yield data
        finally:
            await asyncio.to_thread(handle.close)

    async def presigned_url(self, key: str, ttl_s: int, method: Literal["GET", "HEAD"] = "GET") -> str:
        """Local files have no URL."""
        raise NotImplementedError("local export files cannot be downloaded by URL")

    async def remove(self, key: str) -> None:
        """Delete the file (missing is fine)."""
        with contextlib.suppress(UnsafeExportPath):
            path = resolve_inside(self.directory, key)
            await asyncio.to_thread(path.unlink, True)

    async def list_attempts(self) -> list[StoredObject]:
        """None: a local export's leftovers are temporary files (see :func:`temp_files`)."""
        return []

    async def check(self) -> None:
        """``StoreRefused`` unless the directory exists and this process may write in it."""
        ok = await asyncio.to_thread(lambda: self.directory.is_dir() and os.access(self.directory, os.W_OK | os.X_OK))
        if not ok:
            raise StoreRefused("the exports directory is missing or not writable")
