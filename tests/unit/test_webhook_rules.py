"""Webhook rules without a database: settings, the retry schedule, address refusals, signature headers."""

from __future__ import annotations

import ipaddress
import time
from datetime import timedelta

import pytest
from standardwebhooks import Webhook as Verifier
from standardwebhooks import WebhookVerificationError

from config.settings import Settings, SettingsError
from repositories.domain import utcnow
from repositories.webhooks import Webhook
from service.controllers.webhooks import new_secret
from service.outbound import RefusedDestination, check_url_syntax, refusal
from service.webhook_delivery import retry_delay, signature_headers

URL = "mysql://u@h/d"


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        ({"webhooks_allow_private": "maybe"}, "JOBRESULTS_WEBHOOKS_ALLOW_PRIVATE"),
        ({"webhooks_timeout_s": "0"}, "JOBRESULTS_WEBHOOKS_TIMEOUT_S"),
        ({"webhooks_timeout_s": "120"}, "JOBRESULTS_WEBHOOKS_TIMEOUT_S"),
        ({"webhooks_max_attempts": "0"}, "JOBRESULTS_WEBHOOKS_MAX_ATTEMPTS"),
        ({"webhooks_retry_base_s": "100", "webhooks_retry_max_s": "10"}, "JOBRESULTS_WEBHOOKS_RETRY_BASE_S"),
    ],
)
def test_invalid_webhook_settings_name_the_variable(overrides: dict[str, str], variable: str) -> None:
    env = {"JOBRESULTS_DATABASE_URL": URL} | {f"JOBRESULTS_{k.upper()}": v for k, v in overrides.items()}
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env(env)


def test_the_default_retry_schedule_spans_about_a_day() -> None:
    settings = Settings.from_env({}, database_url=URL)
    attempts = settings.webhooks_max_attempts
    pauses = [retry_delay(n, settings) for n in range(1, attempts)]
    assert 4 <= pauses[0] <= 6
    assert all(p <= settings.webhooks_retry_max_s * 1.2 for p in pauses)
    assert 18 * 3600 <= sum(pauses) <= 32 * 3600


@pytest.mark.parametrize(
    ("address", "allowed_strict", "allowed_private"),
    [
        ("1.1.1.1", True, True),
        ("2606:4700:4700::1111", True, True),
        ("127.0.0.1", False, True),
        ("::1", False, True),
        ("::ffff:127.0.0.1", False, True),
        ("10.0.0.1", False, True),
        ("172.16.5.4", False, True),
        ("192.168.1.1", False, True),
        ("fd00:ec2::254", False, True),  # AWS metadata over IPv6: unique-local
        ("fec0::1", False, True),  # deprecated IPv6 site-local: still private where it is used
        ("100.100.100.200", False, True),  # Alibaba metadata: shared address space
        ("169.254.169.254", False, False),
        ("fe80::1", False, False),
        ("224.0.0.1", False, False),
        ("0.0.0.0", False, False),
        ("240.0.0.1", False, False),
        # 6to4 (2002::/16) carries an IPv4 address; judged as that address, like IPv4-mapped ones
        ("2002:a9fe:a9fe::", False, False),  # 169.254.169.254
        ("2002:7f00:1::", False, True),  # 127.0.0.1
        ("2002:a00:1::1", False, True),  # 10.0.0.1
        ("2002:101:101::", True, True),  # 1.1.1.1
    ],
)
def test_address_rules(address: str, allowed_strict: bool, allowed_private: bool) -> None:
    ip = ipaddress.ip_address(address)
    assert (refusal(ip, allow_private=False) is None) is allowed_strict
    assert (refusal(ip, allow_private=True) is None) is allowed_private


def test_http_only_when_private_is_allowed() -> None:
    with pytest.raises(RefusedDestination, match="https://"):
        check_url_syntax("http://example.com/", allow_private=False)
    assert check_url_syntax("http://example.com/", allow_private=True) == ("example.com", 80)
    assert check_url_syntax("https://example.com:8443/x?y=1", allow_private=False) == ("example.com", 8443)


def _endpoint(secret: str, previous: str | None = None, previous_valid_s: float = 0) -> Webhook:
    now = utcnow()
    return Webhook(
        id=1,
        webhook_id="0" * 32,
        url="https://example.com/",
        description=None,
        events=("job_result.created",),
        secret=secret,
        previous_secret=previous,
        previous_secret_until=now + timedelta(seconds=previous_valid_s) if previous else None,
        enabled=True,
        disabled_reason=None,
        disabled_at=None,
        failure_streak=0,
        created_by=None,
        created_at=now,
        updated_at=now,
    )


def test_signatures_verify_with_the_reference_library_and_both_secrets_after_rotation() -> None:
    old, new = new_secret(), new_secret()
    body = '{"type":"job_result.created","timestamp":"2026-12-01T00:00:00.000000Z","data":{"job_id":"é"}}'
    headers = signature_headers(_endpoint(new, old, 3600), "msg_1", body, time.time())
    assert headers["webhook-signature"].count("v1,") == 2
    assert Verifier(new).verify(body.encode(), headers)["data"]["job_id"] == "é"
    assert Verifier(old).verify(body.encode(), headers)["type"] == "job_result.created"
    with pytest.raises(WebhookVerificationError):
        Verifier(new).verify(body.replace("é", "e").encode(), headers)
    expired = signature_headers(_endpoint(new, old, -1), "msg_1", body, time.time())
    assert expired["webhook-signature"].count("v1,") == 1
    with pytest.raises(WebhookVerificationError):
        Verifier(old).verify(body.encode(), expired)
