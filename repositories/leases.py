"""Hand-written SQL for ``leases``: named leases of background work one process does for the deployment.

A lease is one row (its name is the key, created by the migration). A process takes it with a
conditional ``UPDATE`` that changes the row only if the lease is free, has run out, or is already its
own; exactly one changed row means it holds the lease. That is the export worker's claim pattern: it
relies on no ``GET_LOCK``, gap lock or ``SKIP LOCKED``, so it is correct on Galera (a conflicting claim
on another node fails certification with 1213, the unit runs again and then sees the lease taken).
"""

from __future__ import annotations

from datetime import datetime, timedelta

import msgspec

from repositories.database import Connection

SQL_TAKE = (
    "UPDATE leases SET lease_owner = %(owner)s, lease_until = %(until)s WHERE name = %(name)s "
    "AND (lease_owner IS NULL OR lease_owner = %(owner)s OR lease_until < %(now)s)"
)
SQL_RELEASE = (
    "UPDATE leases SET lease_owner = NULL, lease_until = NULL WHERE name = %(name)s AND lease_owner = %(owner)s"
)
SQL_GET = "SELECT lease_owner, lease_until FROM leases WHERE name = %(name)s"


class Lease(msgspec.Struct, frozen=True):
    """Who holds a lease (``owner``, None when free) and until when (naive UTC)."""

    owner: str | None
    until: datetime | None


class LeaseRepository:
    """Takes, renews and gives back named leases on one connection; never opens or ends transactions."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    async def take(self, name: str, owner: str, now: datetime, duration: timedelta) -> bool:
        """Take or renew the lease ``name`` for ``owner`` until ``now + duration``.

        Returns True if ``owner`` holds it now: it was free, had run out before ``now``, or was already
        ``owner``'s (then it is renewed). False while another owner holds it.
        """
        params = {"name": name, "owner": owner, "now": now, "until": now + duration}
        async with self.conn.cursor() as cur:
            changed = await cur.execute(SQL_TAKE, params)
        return bool(changed == 1)

    async def release(self, name: str, owner: str) -> bool:
        """Give the lease back if ``owner`` holds it; True if it did."""
        async with self.conn.cursor() as cur:
            changed = await cur.execute(SQL_RELEASE, {"name": name, "owner": owner})
        return bool(changed == 1)

    async def get(self, name: str) -> Lease:
        """The lease's holder and expiry as stored (a free lease has neither).

        Raises:
            KeyError: no lease of that name (the migration creates each one).
        """
        async with self.conn.cursor() as cur:
            await cur.execute(SQL_GET, {"name": name})
            row = await cur.fetchone()
        if row is None:
            raise KeyError(name)
        return Lease(owner=row[0], until=row[1])
