"""Which address a request counts against: the peer, unless a trusted proxy forwarded it."""

from __future__ import annotations

import pytest

from service.rate_limit import bucket_of, client_ip, parse_networks

TRUSTED = parse_networks("10.0.0.0/8, ::1")


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        ("203.0.113.7", {}, "203.0.113.7"),
        ("203.0.113.7", {"x-forwarded-for": "1.2.3.4"}, "203.0.113.7"),  # untrusted peer: header ignored
        ("10.0.0.5", {"x-forwarded-for": "1.2.3.4"}, "1.2.3.4"),
        ("10.0.0.5", {"x-forwarded-for": "6.6.6.6, 1.2.3.4, 10.0.0.9"}, "1.2.3.4"),  # right-most untrusted
        ("10.0.0.5", {"forwarded": 'for=192.0.2.60;proto=http, for="[2001:db8::1]:443"'}, "2001:db8::1"),
        ("10.0.0.5", {"x-forwarded-for": "not-an-ip"}, "10.0.0.5"),
        ("10.0.0.5", {}, "10.0.0.5"),
        ("::1", {"x-forwarded-for": "2001:db8::7"}, "2001:db8::7"),
        ("2001:db8::1", {"x-forwarded-for": "1.2.3.4"}, "2001:db8::1"),
    ],
)
def test_client_ip(peer: str, headers: dict[str, str], expected: str) -> None:
    assert client_ip(peer, headers, TRUSTED) == expected


def test_ipv6_clients_count_per_64() -> None:
    assert bucket_of("2001:db8:1:2:aaaa::1") == bucket_of("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert bucket_of("2001:db8:1:3::1") != bucket_of("2001:db8:1:2::1")
    assert bucket_of("192.0.2.1") == "192.0.2.1"


@pytest.mark.parametrize(
    ("peer", "headers", "trusted", "expected"),
    [
        ("::ffff:8.8.8.8", {}, "", "8.8.8.8"),
        ("::ffff:127.0.0.1", {"x-forwarded-for": "1.2.3.4"}, "127.0.0.1", "1.2.3.4"),  # mapped peer, IPv4 proxy
        ("127.0.0.1", {"x-forwarded-for": "1.2.3.4"}, "::ffff:127.0.0.1", "1.2.3.4"),  # IPv4 peer, mapped proxy
        ("::ffff:10.1.2.3", {"x-forwarded-for": "1.2.3.4"}, "10.0.0.0/8", "1.2.3.4"),
        ("10.0.0.5", {"x-forwarded-for": "::ffff:1.2.3.4"}, "10.0.0.0/8", "1.2.3.4"),
        ("10.0.0.5", {"forwarded": 'for="[::ffff:1.2.3.4]:443"'}, "10.0.0.0/8", "1.2.3.4"),
        ("10.0.0.5", {"x-forwarded-for": "1.2.3.4, ::ffff:10.0.0.9"}, "10.0.0.0/8", "1.2.3.4"),
    ],
)
def test_ipv4_mapped_addresses_are_ipv4_everywhere(
    peer: str, headers: dict[str, str], trusted: str, expected: str
) -> None:
    assert client_ip(peer, headers, parse_networks(trusted)) == expected


def test_ipv4_mapped_clients_get_their_own_bucket() -> None:
    assert bucket_of("::ffff:8.8.8.8") == "8.8.8.8"
    assert bucket_of("::ffff:192.168.1.1") == "192.168.1.1"
    assert parse_networks("::ffff:10.0.0.0/104") == parse_networks("10.0.0.0/8")
