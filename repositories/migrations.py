"""Schema migrations: the plain-SQL files in ``sql/migrations``, applied by yoyo-migrations."""

from __future__ import annotations

from urllib.parse import quote

from yoyo import get_backend, read_migrations

from config.settings import Settings
from repositories.database import MIGRATIONS_DIR


def _yoyo_url(settings: Settings) -> str:
    url = settings.database
    return (
        f"mysql://{quote(url.user, safe='')}:{quote(url.password, safe='')}"
        f"@{url.host}:{url.port}/{quote(url.database, safe='')}"
    )


def apply_migrations(settings: Settings) -> list[str]:
    """Apply every pending migration under yoyo's lock; return the ids applied (may be empty).

    Raises:
        pymysql.err.OperationalError: the database cannot be reached.
    """
    backend = get_backend(_yoyo_url(settings))
    migrations = read_migrations(str(MIGRATIONS_DIR))
    with backend.lock():
        pending = backend.to_apply(migrations)
        backend.apply_migrations(pending)
    return [migration.id for migration in pending]
