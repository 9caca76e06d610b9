"""structlog set-up: JSON lines on stdout (console format on a terminal), stdlib logs in the same stream.

Follows structlog's production recipe: a bytes logger, msgspec for JSON, cached bound loggers.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import msgspec
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _msgspec_dumps(obj: object, default: object = None) -> bytes:
    return msgspec.json.encode(obj, enc_hook=str)


def _stdlib_renderer(use_json: bool) -> structlog.typing.Processor:
    """Renderer of stdlib records (Granian, Litestar, aiomysql): compact JSON like the service's own lines."""
    return structlog.processors.JSONRenderer(separators=(",", ":")) if use_json else structlog.dev.ConsoleRenderer()


def configure_logging(level: str = "info", *, json: bool | None = None) -> None:
    """Configure structlog and route stdlib loggers (granian, litestar, aiomysql) through it.

    Args:
        level: debug, info, warning or error.
        json: force JSON (True) or console (False) output; default: console only on a terminal.
    """
    numeric = _LEVELS.get(level.lower(), logging.INFO)
    # The process's real stdout: sys.stdout may be a temporary stand-in (pytest's capture) that is
    # closed later, while loggers are cached for the life of the process.
    stdout = sys.__stdout__ or sys.stdout
    use_json = (not stdout.isatty()) if json is None else json
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if use_json:
        renderer: structlog.typing.Processor = structlog.processors.JSONRenderer(serializer=_msgspec_dumps)
        # Tracebacks as data, without local variables (they may hold settings or payloads).
        tracebacks = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
        processors: list[structlog.typing.Processor] = [*shared, tracebacks, renderer]
        logger_factory: Any = structlog.BytesLoggerFactory(stdout.buffer)
    else:
        processors = [*shared, structlog.dev.ConsoleRenderer()]
        logger_factory = structlog.PrintLoggerFactory(stdout)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=logger_factory,
        cache_logger_on_first_use=True,
    )
    # stdlib records (granian, litestar, aiomysql) are rendered by the same processors.
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _stdlib_renderer(use_json),
        ],
    )
    handler = logging.StreamHandler(stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)


def granian_log_config(level: str = "info", *, json: bool | None = None) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for Granian's own loggers (``_granian``, ``granian.access``).

    Passed to Granian as ``log_dictconfig`` so the server's lines join the same JSON stream.
    """
    use_json = (not sys.stdout.isatty()) if json is None else json
    shared: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.add_logger_name,
    ]
    renderer = _stdlib_renderer(use_json)
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "structlog": {
                "()": structlog.stdlib.ProcessorFormatter,
                "foreign_pre_chain": shared,
                "processors": [structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            }
        },
        "handlers": {
            "console": {"class": "logging.StreamHandler", "formatter": "structlog", "stream": "ext://sys.stdout"},
            "access": {"class": "logging.StreamHandler", "formatter": "structlog", "stream": "ext://sys.stdout"},
        },
        "loggers": {
            "_granian": {"handlers": ["console"], "level": level.upper(), "propagate": False},
            "granian.access": {"handlers": ["access"], "level": level.upper(), "propagate": False},
        },
    }
