"""``jobresults``: the operator's command line (``migrate``, ``serve``)."""

from __future__ import annotations

import argparse
import json
import sys

from config.settings import Settings, SettingsError


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        print(f"jobresults: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_migrate(args: argparse.Namespace) -> int:
    """Apply pending schema migrations (yoyo, ``sql/migrations``)."""
    import pymysql

    from repositories.migrations import apply_migrations

    settings = _settings()
    try:
        applied = apply_migrations(settings)
    except pymysql.err.OperationalError as exc:
        print(f"jobresults: cannot reach {settings.database.redacted()}: {exc.args[-1]}", file=sys.stderr)
        return 1
    print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else "; schema is current"))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the API with Granian (``JOBRESULTS_HOST``, ``_PORT``, ``_WORKERS``)."""
    from granian import Granian
    from granian.constants import Interfaces, Loops

    settings = _settings()
    Granian(
        target="service.app:create_app",
        factory=True,
        interface=Interfaces.ASGI,
        address=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop=Loops.auto,
        log_access=False,
    ).serve()
    return 0


def cmd_openapi(args: argparse.Namespace) -> int:
    """Print the OpenAPI document (or write it to ``--out``); needs no database."""
    from pathlib import Path

    from litestar.serialization import encode_json

    from service.app import create_app

    settings = Settings.from_env({}, database_url="mysql://unused@localhost/unused", log_level="error")
    schema = create_app(settings).openapi_schema.to_schema()
    text = json.dumps(json.loads(encode_json(schema)), indent=2, sort_keys=True) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jobresults`` command."""
    parser = argparse.ArgumentParser(prog="jobresults", description="Job Result Service operator commands.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply pending schema migrations").set_defaults(func=cmd_migrate)
    sub.add_parser("serve", help="serve the API with Granian").set_defaults(func=cmd_serve)
    openapi = sub.add_parser("openapi", help="print the OpenAPI document")
    openapi.add_argument("--out", help="write to this file instead of stdout")
    openapi.set_defaults(func=cmd_openapi)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
