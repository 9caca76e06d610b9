"""Which MySQL error codes the unit of work retries from BEGIN (``repositories.database.is_transient``)."""

from __future__ import annotations

import pymysql
import pytest

from repositories.database import is_transient


@pytest.mark.parametrize(
    ("code", "why"),
    [
        (1213, "deadlock, and Galera's certification failure at COMMIT"),
        (1205, "lock wait timeout"),
        (3101, "MySQL Group Replication rolled the transaction back at COMMIT"),
        (2006, "server gone away"),
        (2013, "lost connection during a query"),
    ],
)
def test_transient_codes_are_retried(code: int, why: str) -> None:
    assert is_transient(pymysql.err.OperationalError(code, why))


@pytest.mark.parametrize("code", [1062, 1146, 1153, 1064, 3100])
def test_other_codes_are_not_retried(code: int) -> None:
    assert not is_transient(pymysql.err.OperationalError(code, "not transient"))


def test_non_database_errors_are_not_retried() -> None:
    assert not is_transient(ValueError(1213))
