"""Settings come from JOBRESULTS_* variables; a bad one stops start-up naming the variable."""

from __future__ import annotations

import os
import subprocess

import pytest

from config.settings import Settings, SettingsError
from tests.support.servers import JOBRESULTS, service_env

URL = "mysql://user:p%40ss@db.example:3307/jobs"


def test_reads_prefixed_variables() -> None:
    settings = Settings.from_env(
        {
            "JOBRESULTS_DATABASE_URL": URL,
            "JOBRESULTS_WORKERS": "4",
            "JOBRESULTS_REDIS_URL": "redis://127.0.0.1:6379/0",
            "JOBRESULTS_POOL_MAX_SIZE": "3",
            "JOBRESULTS_DOCS_ENABLED": "false",
            "OTHER": "ignored",
        }
    )
    assert settings.workers == 4
    assert settings.pool_max_size == 3
    assert settings.docs_enabled is False
    url = settings.database
    assert (url.host, url.port, url.user, url.password, url.database) == ("db.example", 3307, "user", "p@ss", "jobs")
    assert "p@ss" not in url.redacted()


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({}, "JOBRESULTS_DATABASE_URL"),
        ({"JOBRESULTS_DATABASE_URL": "postgres://x/y"}, "JOBRESULTS_DATABASE_URL"),
        ({"JOBRESULTS_DATABASE_URL": "mysql://host"}, "JOBRESULTS_DATABASE_URL"),
        ({"JOBRESULTS_DATABASE_URL": URL, "JOBRESULTS_PORT": "http"}, "JOBRESULTS_PORT"),
        ({"JOBRESULTS_DATABASE_URL": URL, "JOBRESULTS_PORT": "70000"}, "JOBRESULTS_PORT"),
        ({"JOBRESULTS_DATABASE_URL": URL, "JOBRESULTS_WORKERS": "0"}, "JOBRESULTS_WORKERS"),
        ({"JOBRESULTS_DATABASE_URL": URL, "JOBRESULTS_POOL_MIN_SIZE": "9"}, "JOBRESULTS_POOL_MIN_SIZE"),
        ({"JOBRESULTS_DATABASE_URL": URL, "JOBRESULTS_LOG_LEVEL": "loud"}, "JOBRESULTS_LOG_LEVEL"),
        ({"JOBRESULTS_DATABASE_URL": URL, "JOBRESULTS_MAX_BODY_BYTES": "-1"}, "JOBRESULTS_MAX_BODY_BYTES"),
        ({"JOBRESULTS_DATABASE_URL": URL, "JOBRESULTS_WORKERS": "2"}, "JOBRESULTS_REDIS_URL"),
        ({"JOBRESULTS_DATABASE_URL": URL, "JOBRESULTS_RATE_LIMIT_PER_IP": "lots"}, "JOBRESULTS_RATE_LIMIT_PER_IP"),
        ({"JOBRESULTS_DATABASE_URL": URL, "JOBRESULTS_TRUSTED_PROXIES": "10.0.0.0/33"}, "JOBRESULTS_TRUSTED_PROXIES"),
        ({"JOBRESULTS_DATABASE_URL": URL, "JOBRESULTS_REDIS_URL": ""}, "JOBRESULTS_REDIS_URL"),
        ({"JOBRESULTS_DATABASE_URL": URL, "JOBRESULTS_REDIS_URL": "localhost:6379"}, "JOBRESULTS_REDIS_URL"),
        ({"JOBRESULTS_DATABASE_URL": URL, "JOBRESULTS_REDIS_URL": "redis://h:port/0"}, "JOBRESULTS_REDIS_URL"),
        ({"JOBRESULTS_DATABASE_URL": URL, "JOBRESULTS_REDIS_URL": "redis://h:6379/x"}, "JOBRESULTS_REDIS_URL"),
        *(
            ({"JOBRESULTS_DATABASE_URL": URL, "JOBRESULTS_RESULT_RETENTION_DAYS": days}, "RESULT_RETENTION_DAYS")
            for days in ("0", "3651", "30d", "", "-1")
        ),
        ({"JOBRESULTS_DATABASE_URL": URL, "JOBRESULTS_PURGE_BATCH_ROWS": "0"}, "JOBRESULTS_PURGE_BATCH_ROWS"),
        ({"JOBRESULTS_DATABASE_URL": URL, "JOBRESULTS_PURGE_INTERVAL_S": "0"}, "JOBRESULTS_PURGE_INTERVAL_S"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env(env)


@pytest.mark.slow
def test_cli_exits_non_zero_naming_the_variable() -> None:
    env = service_env({"database_url": URL, "pool_max_size": "many"})
    done = subprocess.run([JOBRESULTS, "migrate"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "JOBRESULTS_POOL_MAX_SIZE" in done.stderr
    assert "Traceback" not in done.stderr


def test_result_retention_defaults_to_forever_and_takes_days() -> None:
    assert Settings.from_env({"JOBRESULTS_DATABASE_URL": URL}).result_retention_days is None
    env = {"JOBRESULTS_DATABASE_URL": URL, "JOBRESULTS_RESULT_RETENTION_DAYS": "90"}
    assert Settings.from_env(env).result_retention_days == 90


def test_serve_with_a_bad_retention_exits_2_naming_it() -> None:
    env = service_env({"database_url": URL, "result_retention_days": "0", "port": "0"})
    done = subprocess.run([JOBRESULTS, "serve"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "JOBRESULTS_RESULT_RETENTION_DAYS" in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_with_an_empty_redis_url_exits_2_naming_it() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBRESULTS_")}
    env.update({"JOBRESULTS_DATABASE_URL": URL, "JOBRESULTS_REDIS_URL": "", "JOBRESULTS_PORT": "0"})
    done = subprocess.run([JOBRESULTS, "serve"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "JOBRESULTS_REDIS_URL" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://cache.example:6380", "unix:///run/redis.sock"])
def test_redis_urls_that_work_are_accepted(url: str) -> None:
    assert Settings.from_env({"JOBRESULTS_DATABASE_URL": URL, "JOBRESULTS_REDIS_URL": url}).redis_url == url
