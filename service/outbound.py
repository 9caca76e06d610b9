"""Outbound safety for webhook deliveries (SSRF): which URLs and addresses the service may call.

A webhook URL must be ``https`` and its host must resolve only to globally routable unicast
addresses. Loopback, private (RFC 1918, unique-local), shared (100.64.0.0/10), link-local (so the
cloud metadata address 169.254.169.254), multicast, reserved and unspecified addresses are refused,
with IPv4-mapped and 6to4 IPv6 addresses judged as the IPv4 address they carry. The check runs when a webhook
is registered or changed, and again at every connection: :class:`GuardedBackend` resolves the host
itself, checks every address, and connects to a checked address (TLS still verifies the host name),
so a DNS answer that changes after registration (DNS rebinding) cannot reach an internal service.
Redirects are never followed.

``JOBRESULTS_WEBHOOKS_ALLOW_PRIVATE=true`` allows ``http`` and loopback, private and shared
addresses (tests, closed networks); link-local, multicast, reserved and unspecified stay refused.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import typing
from urllib.parse import urlsplit

import httpcore

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_URL_LENGTH = 2048
RESOLVE_TIMEOUT_S = 3.0


class RefusedDestination(Exception):
    """The URL or an address its host resolves to may not be called; the message says why (safe to show)."""


def refusal(address: IPAddress, *, allow_private: bool) -> str | None:
    """Why ``address`` may not be called, or None if it may.

    Uses the stdlib ``ipaddress`` properties; ``allow_private`` admits loopback, private and shared
    (not globally routable) unicast addresses.
    """
    if isinstance(address, ipaddress.IPv6Address):
        # IPv4-mapped and 6to4 (2002::/16) addresses reach the IPv4 address they carry
        address = address.ipv4_mapped or address.sixtofour or address
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_link_local:
        return "a link-local address (this includes cloud metadata services)"
    if address.is_multicast:
        return "a multicast address"
    if address.is_loopback:
        return None if allow_private else "a loopback address"
    if address.is_reserved:
        return "a reserved address"
    if address.is_private or (isinstance(address, ipaddress.IPv6Address) and address.is_site_local):
        return None if allow_private else "a private address"  # site-local fec0::/10: private, deprecated
    if not address.is_global:
        return None if allow_private else "an address that is not globally routable"
    return None


def check_url_syntax(url: str, *, allow_private: bool) -> tuple[str, int]:
    """Check a webhook URL's form; returns ``(host, port)``.

    Raises:
        RefusedDestination: not ``https`` (or ``http`` with ``allow_private``), no host, user info in
            the URL, a fragment, a bad port, or longer than :data:`MAX_URL_LENGTH`.
    """
    schemes = ("https", "http") if allow_private else ("https",)
    if len(url) > MAX_URL_LENGTH:
        raise RefusedDestination(f"url must be at most {MAX_URL_LENGTH} characters")
    if not url.isascii() or any(ch.isspace() for ch in url):
        raise RefusedDestination("url must be ASCII without spaces (percent-encode the path, punycode the host)")
    parts = urlsplit(url)
    if parts.scheme not in schemes:
        raise RefusedDestination(f"url must start with {' or '.join(s + '://' for s in schemes)}")
    if not parts.hostname:
        raise RefusedDestination("url must name a host")
    if parts.username is not None or parts.password is not None:
        raise RefusedDestination("url must not contain user name or password; authenticate with the signature")
    if parts.fragment:
        raise RefusedDestination("url must not contain a fragment (#...)")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise RefusedDestination("url port must be a number from 1 to 65535") from None
    if port == 0:
        raise RefusedDestination("url port must be a number from 1 to 65535")
    return parts.hostname, port


async def resolve_checked(host: str, port: int, *, allow_private: bool) -> list[str]:
    """Resolve ``host`` and return its addresses, all of them allowed.

    Raises:
        RefusedDestination: the host does not resolve (within :data:`RESOLVE_TIMEOUT_S`), or one of
            its addresses is refused (see :func:`refusal`).
    """
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_S):
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError, UnicodeError):
        raise RefusedDestination(f"the host {host!r} does not resolve") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise RefusedDestination(f"the host {host!r} does not resolve")
    for text in addresses:
        reason = refusal(ipaddress.ip_address(text.split("%", 1)[0]), allow_private=allow_private)
        if reason is not None:
            raise RefusedDestination(f"the host {host!r} resolves to {reason}, which webhooks may not call")
    return addresses


async def check_url(url: str, *, allow_private: bool) -> None:
    """Check a webhook URL at registration: its form, and every address its host resolves to now.

    Raises:
        RefusedDestination: the message says why (safe to show to the client).
    """
    host, port = check_url_syntax(url, allow_private=allow_private)
    await resolve_checked(host, port, allow_private=allow_private)


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """An httpcore network backend that connects only to checked addresses.

    It resolves the host itself, refuses the connection if any address is refused, and connects to
    the checked addresses in turn (the TLS layer above still verifies the certificate for the host).

    Raises (from ``connect_tcp``):
        RefusedDestination: an address is refused or the host does not resolve.
        httpcore.ConnectError, httpcore.ConnectTimeout: no checked address accepted the connection.
    """

    def __init__(self, *, allow_private: bool) -> None:
        self.allow_private = allow_private
        self._backend = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Resolve and check ``host``, then connect to the first checked address that answers."""
        addresses = await resolve_checked(host.strip("[]"), port, allow_private=self.allow_private)
        error: Exception | None = None
        for address in addresses:
            try:
                return await self._backend.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None
        raise error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Unix sockets are never a webhook destination."""
        raise RefusedDestination("unix sockets are not a webhook destination")

    async def sleep(self, seconds: float) -> None:
        """Sleep (httpcore's retry pauses)."""
        await self._backend.sleep(seconds)
