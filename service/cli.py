"""``jobresults``: the operator's command line (migrate, serve, import, export, keys, purge, openapi)."""

from __future__ import annotations

import argparse
import json
import sys

from config.settings import Settings, SettingsError
from repositories.domain import (
    COMPRESSIONS,
    FORMATS,
    SCOPES,
    STATUSES,
    InvalidParameter,
    JobResultNotFound,
    format_timestamp,
    is_valid_job_id,
    parse_timestamp,
)


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        print(f"jobresults: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError("must be a whole number of at least 1")
    return int(value)


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


GRANIAN_BACKLOG = 1024
"""Granian's default listen backlog; its default per-worker backpressure is this divided by the workers."""


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the API with Granian (``JOBRESULTS_HOST``, ``_PORT``, ``_WORKERS``)."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from granian import Granian
    from granian.constants import Interfaces, Loops

    settings = _settings()
    in_use = address_in_use(settings.host, settings.port)
    if in_use is not None:
        print(
            f"jobresults: cannot serve on {settings.host}:{settings.port} (JOBRESULTS_HOST, JOBRESULTS_PORT): "
            f"{in_use}; stop the other server or choose another JOBRESULTS_PORT",
            file=sys.stderr,
        )
        return 1
    # Metrics of every worker go to one directory that /metrics adds up; start it empty. This must
    # happen before prometheus_client is imported here: workers forked from this process inherit
    # the value class it chose at import time.
    multiproc_env = "PROMETHEUS_MULTIPROC_DIR"
    own_dir = not os.environ.get(multiproc_env)
    metrics_dir = os.environ.get(multiproc_env) or str(
        Path(tempfile.gettempdir()) / f"jobresults-metrics-{os.getpid()}"
    )
    shutil.rmtree(metrics_dir, ignore_errors=True)
    Path(metrics_dir).mkdir(parents=True, mode=0o700)
    os.environ[multiproc_env] = metrics_dir

    from observability.logging import granian_log_config

    server = Granian(
        target="service.app:create_app",
        factory=True,
        interface=Interfaces.ASGI,
        address=settings.host,
        port=settings.port,
        workers=settings.workers,
        # Granian's default limit of concurrent requests per worker (backlog / workers), plus room for
        # the long-polling requests a worker may hold (JOBRESULTS_EXPORT_WAIT_MAX): waiters never use up
        # the slots other requests need.
        backpressure=max(1, GRANIAN_BACKLOG // settings.workers) + settings.export_wait_max,
        loop=Loops.auto,
        log_access=False,
        log_level=settings.log_level,  # type: ignore[arg-type]
        log_dictconfig=granian_log_config(settings.log_level),
    )
    try:
        server.serve()
    finally:
        if own_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def address_in_use(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be served (e.g. another process listens there), or None if it can.

    Granian's workers listen with ``SO_REUSEPORT``, so the kernel would let a second server share the
    port of a running one and split the connections between the two. A probe socket bound *without*
    ``SO_REUSEPORT`` (``SO_REUSEADDR`` only, so connections left in TIME_WAIT do not count) fails
    while any process listens on the address. Port 0 (any free port) is never in use.
    """
    import errno
    import socket

    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"the address does not resolve ({exc.strerror})"
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return "another process is already listening on it"
                return exc.strerror or str(exc)
    return None


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


def cmd_import(args: argparse.Namespace) -> int:
    """Import JSON files as job results; exit 1 if any file was refused."""
    import asyncio
    from pathlib import Path

    from observability.logging import configure_logging
    from service.labels import check_labels
    from service.operator import import_files

    labels: dict[str, str] = {}
    for label in args.label or ():
        key, equals, value = label.partition("=")
        if not equals:
            print(f"jobresults: --label {label!r}: expected key=value", file=sys.stderr)
            return 2
        labels[key] = value
    try:
        check_labels(labels)
    except InvalidParameter as exc:
        print(f"jobresults: --label: {exc}", file=sys.stderr)
        return 2
    settings = _settings()
    configure_logging("warning")
    report = asyncio.run(
        import_files(settings, [Path(p) for p in args.paths], job_id=args.job_id, status=args.status, labels=labels)
    )
    for path, job_id, outcome in report.imported:
        print(f"{outcome}: {job_id} <- {path}")
    for path, reason in report.refused:
        print(f"refused: {path}: {reason}", file=sys.stderr)
    print(f"{len(report.imported)} imported, {len(report.refused)} refused")
    return 1 if report.refused else 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export one job or a time range to ``--out`` through the API's export pipeline."""
    import asyncio
    from pathlib import Path

    from exports.columns import InvalidColumn, parse_columns, split_cli_list
    from exports.files import StorageFull
    from exports.formats import CsvTooWide
    from exports.pipeline import ExportCancelled, ExportTooLarge
    from exports.store import StoreError
    from observability.logging import configure_logging
    from repositories.exports import ExportParameters, label_terms
    from service.labels import build_filter
    from service.operator import export_to_file

    settings = _settings()
    configure_logging("warning")
    columns = None
    if args.columns is not None:
        try:
            columns = parse_columns([entry for text in args.columns for entry in split_cli_list(text)])
        except InvalidColumn as exc:
            print(f"jobresults: --columns: {exc}", file=sys.stderr)
            return 2
    parameters = None
    if args.job is not None:
        if not is_valid_job_id(args.job):
            print(f"jobresults: --job {args.job!r} is not a valid job id", file=sys.stderr)
            return 2
        if args.label or args.status or args.job_id_prefix:
            print("jobresults: --label, --status and --job-id-prefix filter range exports, not --job", file=sys.stderr)
            return 2
    else:
        try:
            filters = build_filter(args.label, args.status, args.job_id_prefix, name="--label")
            statuses = list(filters.statuses)
            parameters = ExportParameters(
                created_from=parse_timestamp(args.created_from, "--from"),
                created_to=parse_timestamp(args.created_to, "--to"),
                status=statuses[0] if len(statuses) == 1 else statuses or None,
                label=label_terms(filters) or None,
                job_id_prefix=filters.job_id_prefix,
                columns=columns.columns if columns is not None else None,
            )
        except InvalidParameter as exc:
            print(f"jobresults: {exc}", file=sys.stderr)
            return 2
    try:
        export = asyncio.run(
            export_to_file(
                settings,
                fmt=args.format,
                compression=args.compression,
                out=Path(args.out),
                job_id=args.job,
                parameters=parameters,
                columns=columns,
            )
        )
    except JobResultNotFound:
        print(f"jobresults: no job result with job_id {args.job!r}", file=sys.stderr)
        return 1
    except StorageFull:
        print("jobresults: not enough storage for the export file", file=sys.stderr)
        return 1
    except ExportCancelled:
        print("jobresults: the export was cancelled (DELETE /v1/exports/{id}); no file was written", file=sys.stderr)
        return 1
    except (StoreError, ExportTooLarge, CsvTooWide) as exc:
        print(f"jobresults: {exc}", file=sys.stderr)
        return 1
    print(
        f"export {export.export_id}: {export.rows_written} rows, {export.bytes} bytes, "
        f"sha256 {export.sha256} -> {args.out}"
    )
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """``keys create|list|revoke``: manage API keys."""
    import asyncio

    from observability.logging import configure_logging
    from repositories.api_keys import ApiKeyNotFound
    from service.operator import create_key, list_keys, revoke_key

    settings = _settings()
    configure_logging("warning")
    if args.keys_command == "create":
        scopes = tuple(dict.fromkeys(s.strip() for s in args.scopes.split(",") if s.strip()))
        unknown = [s for s in scopes if s not in SCOPES]
        if unknown or not scopes:
            print(f"jobresults: --scopes takes a comma-separated list of {', '.join(SCOPES)}", file=sys.stderr)
            return 2
        from limits import parse

        if args.rate_limit is not None:
            try:
                parse(args.rate_limit)
            except ValueError:
                print("jobresults: --rate-limit takes e.g. 1000/second or 600/minute", file=sys.stderr)
                return 2
        token, key = asyncio.run(create_key(settings, args.name, scopes, args.rate_limit))
        limit = key.rate_limit or f"the per-IP limit ({settings.rate_limit_per_ip})"
        print(f"created key {key.key_id} ({key.name}) with scopes {' '.join(key.scopes)}, rate limit {limit}")
        print("token (shown once, store it now):")
        print(token)
        return 0
    if args.keys_command == "list":
        for key in asyncio.run(list_keys(settings)):
            state = f"revoked {key.revoked_at:%Y-%m-%dT%H:%M:%SZ}" if key.revoked_at else "active"
            created = f"{key.created_at:%Y-%m-%dT%H:%M:%SZ}"
            limit = key.rate_limit or "per-IP limit"
            print(f"{key.key_id}  {key.name}  {','.join(key.scopes)}  {limit}  created {created}  {state}")
        return 0
    try:
        key = asyncio.run(revoke_key(settings, args.key_id))
    except ApiKeyNotFound:
        print(f"jobresults: no API key {args.key_id!r}", file=sys.stderr)
        return 1
    print(f"revoked {key.key_id}; services stop accepting it within {settings.auth_cache_ttl_s:g} s")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    """Run one purge pass now, or with ``--dry-run`` list what it would delete (deleting nothing)."""
    import asyncio

    from observability.logging import configure_logging
    from service.operator import purge_dry_run, purge_now
    from service.purge import LeaseHeld

    settings = _settings()
    configure_logging("warning")
    if args.dry_run:
        for name, (batch, oldest) in asyncio.run(purge_dry_run(settings, args.limit)).items():
            for item in batch.items:
                print(f"{name}: {item}")
            more = " or more (raise --limit to list them)" if batch.rows >= args.limit else ""
            since = f", the oldest due since {format_timestamp(oldest)}" if oldest is not None else ""
            print(f"{name}: {batch.rows}{more} would be purged, {batch.bytes} bytes{since}")
        print("dry run: nothing was deleted")
        return 0
    try:
        report = asyncio.run(purge_now(settings))
    except LeaseHeld:
        print(
            "jobresults: a purge pass is running in a service process right now (it holds the purge lease); "
            "try again when it is done",
            file=sys.stderr,
        )
        return 1
    for name, (rows, size) in report.purged.items():
        print(f"{name}: purged {rows}, {size} bytes")
    if report.lease_lost:
        print("jobresults: the purge lease was taken over before the pass finished", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jobresults`` command."""
    parser = argparse.ArgumentParser(prog="jobresults", description="Job Result Service operator commands.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply pending schema migrations").set_defaults(func=cmd_migrate)
    sub.add_parser("serve", help="serve the API with Granian").set_defaults(func=cmd_serve)
    importer = sub.add_parser("import", help="store JSON files as job results (one file, one job)")
    importer.add_argument("paths", nargs="+", help="JSON files, or directories searched for *.json")
    importer.add_argument("--job-id", help="job id for a single file (default: the file name without suffix)")
    importer.add_argument("--status", choices=STATUSES, default="succeeded")
    importer.add_argument(
        "--label", action="append", metavar="KEY=VALUE", help="a label for every imported file (repeatable)"
    )
    importer.set_defaults(func=cmd_import)
    exporter = sub.add_parser("export", help="export one job or a time range to a file, with a progress bar")
    exporter.add_argument("--format", required=True, choices=FORMATS)
    exporter.add_argument("--compression", choices=COMPRESSIONS, default="none")
    which = exporter.add_mutually_exclusive_group(required=True)
    which.add_argument("--job", help="export this job's result")
    which.add_argument("--from", dest="created_from", help="range start, RFC 3339 (inclusive)")
    exporter.add_argument("--to", dest="created_to", help="range end, RFC 3339 (exclusive)")
    exporter.add_argument("--status", action="append", choices=STATUSES, help="only these (repeatable)")
    exporter.add_argument(
        "--label",
        action="append",
        metavar="KEY:VALUE|KEY",
        help="only jobs with this label (repeatable: values of one key ORed, keys ANDed), as the API's label=",
    )
    exporter.add_argument("--job-id-prefix", help="only job ids starting with this")
    exporter.add_argument(
        "--columns",
        action="append",
        metavar="PATH,PATH,...",
        help=(
            "only these columns, in this order, as in the API's columns (e.g. summary.failed,metrics.duration_ms "
            "or \\labels.branch); comma-separated, write a comma inside a key as \\, ; may be repeated"
        ),
    )
    exporter.add_argument("--out", required=True, help="file to write")
    exporter.set_defaults(func=cmd_export)
    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key and print its token once")
    create.add_argument("--name", required=True)
    create.add_argument(
        "--scopes",
        required=True,
        help=(
            "comma-separated, from: results:read, results:write, exports:read, exports:write, metrics:read, "
            "webhooks:read, webhooks:write"
        ),
    )
    create.add_argument("--rate-limit", help="the key's own limit, e.g. 1000/second (default: the per-IP limit)")
    keys_sub.add_parser("list", help="list keys (never their tokens)")
    revoke = keys_sub.add_parser("revoke", help="revoke a key")
    revoke.add_argument("key_id")
    keys.set_defaults(func=cmd_keys)
    purge = sub.add_parser("purge", help="delete what has expired now (one pass), or list it with --dry-run")
    purge.add_argument("--dry-run", action="store_true", help="list what would be purged; delete nothing")
    purge.add_argument(
        "--limit", type=_positive, default=1000, help="with --dry-run: most items listed per kind (default 1000)"
    )
    purge.set_defaults(func=cmd_purge)
    openapi = sub.add_parser("openapi", help="print the OpenAPI document")
    openapi.add_argument("--out", help="write to this file instead of stdout")
    openapi.set_defaults(func=cmd_openapi)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
