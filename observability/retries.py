"""One log line per scheduled retry of a database unit of work: which unit, which attempt, which error.

It replaces stamina's own structlog hook, which logs the reprs of the retried callable's arguments
(``<repositories.database.Database object at 0x...>``) and of the exception.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import pymysql
import structlog
from stamina.instrumentation import RetryDetails

log = structlog.get_logger("jobresults.retry")

RETRYING_UNIT: ContextVar[Callable[..., Any] | None] = ContextVar("jobresults_retrying_unit", default=None)
"""The unit of work a ``stamina.retry_context`` block is retrying (set by ``Database.run``): a
context block has no arguments of its own for the hook to name."""


def _callable_name(arg: Callable[..., Any]) -> str:
    module = getattr(arg, "__module__", None) or ""
    name = getattr(arg, "__qualname__", None) or type(arg).__qualname__
    return f"{module}.{name}" if module else name


def unit_name(details: RetryDetails) -> str:
    """The retried unit of work's name.

    That is the qualified name of the unit in :data:`RETRYING_UNIT` (the ``work`` passed to
    ``Database.run``, e.g. ``JobResultController.put_job_result.<locals>.unit``), else of the first
    callable argument of a retried function, else the name stamina gives the retried block.
    """
    unit = RETRYING_UNIT.get()
    if unit is not None:
        return _callable_name(unit)
    for arg in details.args:
        if callable(arg):
            return _callable_name(arg)
    return details.name


def log_retry(details: RetryDetails) -> None:
    """Log a scheduled retry (a stamina retry hook).

    The line is ``db.retry_scheduled`` with ``unit``, ``attempt`` (the one that failed, from 1),
    ``error_code`` (the MySQL error number, else the exception's class name) and ``wait_s``.
    """
    caused_by = details.caused_by
    code = caused_by.args[0] if isinstance(caused_by, pymysql.MySQLError) and caused_by.args else None
    log.warning(
        "db.retry_scheduled",
        unit=unit_name(details),
        attempt=details.retry_num,
        error_code=code if isinstance(code, int) else type(caused_by).__name__,
        wait_s=round(details.wait_for, 3),
    )
