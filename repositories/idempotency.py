"""Hand-written SQL for ``idempotency_keys``: claims of Idempotency-Key values and the stored responses.

A row is keyed by ``(owner, idempotency_key)``. A request claims a key with a plain ``INSERT`` in a
unit of its own: the primary key makes a second claim fail with a duplicate-key error on every engine
and every Galera node (there, a concurrent claim on another node fails certification with 1213, is
retried, and then sees the duplicate). Every later change names the claim token it read, so a request
whose claim was taken over (stale, or expired) can change nothing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
import pymysql

from repositories.database import ER_DUP_ENTRY, Connection, error_code

_COLUMNS = (
    "owner, idempotency_key, request_sha256, claim, state, export_id, status_code, response_headers, "
    "response_body, created_at, claimed_at"
)
SQL_CLAIM = (
    f"INSERT INTO idempotency_keys ({_COLUMNS}) VALUES (%(owner)s, %(key)s, %(sha256)s, %(claim)s, "  # noqa: S608
    "'started', NULL, NULL, NULL, NULL, %(now)s, %(now)s)"
)
SQL_GET = f"SELECT {_COLUMNS} FROM idempotency_keys WHERE owner = %(owner)s AND idempotency_key = %(key)s"  # noqa: S608
SQL_TAKE_OVER = (
    "UPDATE idempotency_keys SET request_sha256 = %(sha256)s, claim = %(claim)s, state = 'started', "
    "export_id = NULL, status_code = NULL, response_headers = NULL, response_body = NULL, "
    "created_at = %(created_at)s, claimed_at = %(now)s "
    "WHERE owner = %(owner)s AND idempotency_key = %(key)s AND claim = %(seen)s"
)
SQL_COMPLETE = (
    "UPDATE idempotency_keys SET state = 'done', export_id = %(export_id)s, status_code = %(status)s, "
    "response_headers = %(headers)s, response_body = %(body)s "
    "WHERE owner = %(owner)s AND idempotency_key = %(key)s AND claim = %(claim)s AND state = 'started'"
)
SQL_RELEASE = (
    "DELETE FROM idempotency_keys "
    "WHERE owner = %(owner)s AND idempotency_key = %(key)s AND claim = %(claim)s AND state = 'started'"
)
SQL_PURGE = "DELETE FROM idempotency_keys WHERE created_at < %(before)s ORDER BY created_at LIMIT %(limit)s"
_HEADERS = msgspec.json.Decoder(dict[str, str])


class StoredKey(msgspec.Struct, frozen=True):
    """A row of ``idempotency_keys``. ``state`` is ``started`` (claimed) or ``done`` (response stored)."""

    owner: str
    idempotency_key: str
    request_sha256: str
    claim: str
    state: str
    export_id: str | None
    status_code: int | None
    response_headers: dict[str, str]
    response_body: bytes | None
    created_at: datetime
    claimed_at: datetime


def _stored(row: tuple[Any, ...]) -> StoredKey:
    body = row[8]
    return StoredKey(
        owner=row[0],
        idempotency_key=row[1],
        request_sha256=row[2],
        claim=row[3],
        state=row[4],
        export_id=row[5],
        status_code=row[6],
        response_headers=_HEADERS.decode(row[7]) if row[7] else {},
        response_body=(body.encode() if isinstance(body, str) else bytes(body)) if body is not None else None,
        created_at=row[9],
        claimed_at=row[10],
    )


class IdempotencyRepository:
    """Reads and writes ``idempotency_keys`` rows on one connection; never opens or ends transactions."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    async def claim(self, *, owner: str, key: str, request_sha256: str, claim: str, now: datetime) -> bool:
        """Insert a ``started`` claim; False if the key exists already (duplicate key, MySQL error 1062)."""
        params = {"owner": owner, "key": key, "sha256": request_sha256, "claim": claim, "now": now}
        try:
            async with self.conn.cursor() as cur:
                await cur.execute(SQL_CLAIM, params)
        except pymysql.err.IntegrityError as exc:
            if error_code(exc) == ER_DUP_ENTRY:
                return False
            raise
        return True

    async def get(self, owner: str, key: str) -> StoredKey | None:
        """The row of ``(owner, key)``, or None."""
        async with self.conn.cursor() as cur:
            await cur.execute(SQL_GET, {"owner": owner, "key": key})
            row = await cur.fetchone()
        return None if row is None else _stored(row)

    async def take_over(
        self,
        seen: StoredKey,
        *,
        request_sha256: str,
        claim: str,
        now: datetime,
        created_at: datetime,
    ) -> bool:
        """Replace the claim ``seen`` (expired, or stale) by a new ``started`` one; False if it changed meanwhile."""
        params = {
            "owner": seen.owner,
            "key": seen.idempotency_key,
            "seen": seen.claim,
            "sha256": request_sha256,
            "claim": claim,
            "now": now,
            "created_at": created_at,
        }
        async with self.conn.cursor() as cur:
            return bool(await cur.execute(SQL_TAKE_OVER, params))

    async def complete(
        self,
        *,
        owner: str,
        key: str,
        claim: str,
        export_id: str | None,
        status_code: int,
        headers: dict[str, str],
        body: bytes,
    ) -> bool:
        """Store the response of claim ``claim`` (state ``done``); False if the claim is no longer ours.

        ``body`` is UTF-8 (JSON or problem+json).
        """
        params = {
            "owner": owner,
            "key": key,
            "claim": claim,
            "export_id": export_id,
            "status": status_code,
            "headers": msgspec.json.encode(headers).decode(),
            "body": body.decode(),  # JSON text: aiomysql cannot send bytes parameters with PyMySQL 1.1
        }
        async with self.conn.cursor() as cur:
            return bool(await cur.execute(SQL_COMPLETE, params))

    async def release(self, *, owner: str, key: str, claim: str) -> bool:
        """Delete claim ``claim`` while it is still ``started`` (its request failed); False otherwise."""
        async with self.conn.cursor() as cur:
            return bool(await cur.execute(SQL_RELEASE, {"owner": owner, "key": key, "claim": claim}))

    async def purge(self, before: datetime, limit: int) -> int:
        """Delete at most ``limit`` rows created before ``before``; returns how many."""
        async with self.conn.cursor() as cur:
            return int(await cur.execute(SQL_PURGE, {"before": before, "limit": limit}))
