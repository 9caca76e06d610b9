"""Hand-written SQL for the ``api_keys`` aggregate. Tokens are never stored, only their SHA-256."""

from __future__ import annotations

from datetime import datetime

import msgspec

from repositories.database import Connection
from repositories.domain import utcnow


class ApiKeyNotFound(Exception):
    """No API key has this key id."""


class ApiKey(msgspec.Struct, frozen=True):
    """A stored API key (without any secret). ``scopes`` is a tuple of scope names."""

    key_id: str
    name: str
    scopes: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None
    secret_sha256: bytes = b""
    rate_limit: str | None = None
    """Own rate limit in the ``limits`` notation (``"1000/second"``), or None for the per-IP limit."""


_COLUMNS = "key_id, name, scopes, created_at, revoked_at, secret_sha256, rate_limit"


def _key(row: tuple[object, ...]) -> ApiKey:
    return ApiKey(
        key_id=str(row[0]),
        name=str(row[1]),
        scopes=tuple(str(row[2]).split()),
        created_at=row[3],  # type: ignore[arg-type]
        revoked_at=row[4],  # type: ignore[arg-type]
        secret_sha256=row[5] if isinstance(row[5], bytes) else bytes(str(row[5]), "latin-1"),
        rate_limit=str(row[6]) if row[6] else None,
    )


class ApiKeyRepository:
    """Reads and writes ``api_keys`` rows on one connection."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    async def insert(
        self, key_id: str, name: str, secret_sha256: bytes, scopes: tuple[str, ...], rate_limit: str | None = None
    ) -> ApiKey:
        """Store a new key."""
        async with self.conn.cursor() as cur:
            await cur.execute(
                "INSERT INTO api_keys (key_id, name, secret_sha256, scopes, rate_limit, created_at) "
                "VALUES (%(key_id)s, %(name)s, UNHEX(%(secret)s), %(scopes)s, %(rate_limit)s, %(now)s)",
                # as hex: aiomysql 0.3.2 with PyMySQL 1.2 fails to escape bytes parameters
                {
                    "key_id": key_id,
                    "name": name,
                    "secret": secret_sha256.hex(),
                    "scopes": " ".join(scopes),
                    "rate_limit": rate_limit,
                    "now": utcnow(),
                },
            )
        return await self.get(key_id)

    async def get(self, key_id: str) -> ApiKey:
        """The key with this id, revoked or not.

        Raises:
            ApiKeyNotFound: no such key.
        """
        async with self.conn.cursor() as cur:
            await cur.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = %(key_id)s", {"key_id": key_id})  # noqa: S608
            row = await cur.fetchone()
        if row is None:
            raise ApiKeyNotFound(key_id)
        return _key(row)

    async def list(self) -> list[ApiKey]:
        """Every key, oldest first."""
        async with self.conn.cursor() as cur:
            await cur.execute(f"SELECT {_COLUMNS} FROM api_keys ORDER BY id")  # noqa: S608
            rows = await cur.fetchall()
        return [_key(row) for row in rows]

    async def revoke(self, key_id: str) -> ApiKey:
        """Mark the key revoked (idempotent).

        Raises:
            ApiKeyNotFound: no such key.
        """
        async with self.conn.cursor() as cur:
            await cur.execute(
                "UPDATE api_keys SET revoked_at = %(now)s WHERE key_id = %(key_id)s AND revoked_at IS NULL",
                {"key_id": key_id, "now": utcnow()},
            )
        return await self.get(key_id)
