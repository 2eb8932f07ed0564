"""Callback URL checks, and the resolver and socket factory that refuse forbidden addresses.

The relay POSTs to URLs that other services hand it, so it must not become an SSRF vector.
Registration checks the URL's syntax and every address its host resolves to; because a name
can be re-pointed afterwards, delivery checks again on the addresses actually connected to.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import aiohttp
from aiohttp import AddrInfoType
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from relay.config import IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolve = Callable[[str, int], Awaitable[list[IPAddress]]]

MAX_URL_LENGTH = 2048
# Hosts and addresses whose verdict is remembered. Registrations and connections name the same
# few receivers again and again; judging one afresh costs ~8 us, a third of it in ipaddress.
VERDICT_CACHE_SIZE = 4096
# Only hosts up to a DNS name's length are remembered: a cache of 2 KiB junk hosts would be
# 8 MiB a client could fill.
MAX_REMEMBERED_HOST = 253

R = TypeVar("R")


class _Remembered(Generic[R]):
    """`judge`, with its answers for short hosts kept in `cache` (an exception is never kept)."""

    def __init__(self, judge: Callable[[str], R]) -> None:
        self._judge = judge
        self.cache = functools.lru_cache(maxsize=VERDICT_CACHE_SIZE)(judge)
        functools.update_wrapper(self, judge)

    def __call__(self, host: str) -> R:
        return self.cache(host) if len(host) <= MAX_REMEMBERED_HOST else self._judge(host)


_UNSPECIFIED = "an unspecified address"
_LOOPBACK = "a loopback address"
_PRIVATE = "a private address"
_SHARED = "a shared (CGNAT) address"
_LINK_LOCAL = "a link-local address"
_DOCUMENTATION = "a documentation address"
_MULTICAST = "a multicast address"
_BROADCAST = "a broadcast address"
_RESERVED = "a reserved address"
_NOT_GLOBAL = "not a globally routable address"

# First match wins, so the narrow entries come before the ranges that contain them.
# `is_global` alone is not enough on Python 3.11 (it calls 64:ff9b::/96 and 2002::/16 global).
_BLOCKED: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(network), phrase)
    for network, phrase in (
        ("0.0.0.0/32", _UNSPECIFIED),
        ("0.0.0.0/8", _RESERVED),  # "this network"
        ("10.0.0.0/8", _PRIVATE),
        ("100.64.0.0/10", _SHARED),
        ("127.0.0.0/8", _LOOPBACK),
        ("169.254.0.0/16", _LINK_LOCAL),  # cloud metadata lives at 169.254.169.254
        ("172.16.0.0/12", _PRIVATE),
        ("192.0.0.0/24", _RESERVED),  # IETF protocol assignments
        ("192.0.2.0/24", _DOCUMENTATION),
        ("192.88.99.0/24", _RESERVED),  # retired 6to4 relay anycast
        ("192.168.0.0/16", _PRIVATE),
        ("198.18.0.0/15", _RESERVED),  # benchmarking
        ("198.51.100.0/24", _DOCUMENTATION),
        ("203.0.113.0/24", _DOCUMENTATION),
        ("224.0.0.0/4", _MULTICAST),
        ("255.255.255.255/32", _BROADCAST),
        ("240.0.0.0/4", _RESERVED),
        ("::/128", _UNSPECIFIED),
        ("::1/128", _LOOPBACK),
        ("fc00::/7", _PRIVATE),  # unique local addresses
        ("fe80::/10", _LINK_LOCAL),
        ("ff00::/8", _MULTICAST),
        ("2001:db8::/32", _DOCUMENTATION),
        ("64:ff9b:1::/48", _RESERVED),  # local-use NAT64
        ("100::/64", _RESERVED),  # discard-only
        ("2001::/23", _RESERVED),  # IETF protocol assignments, Teredo included
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")

# Hosts made only of decimal or 0x-hex dotted parts are IPv4 attempts, never names.
_NUMERIC_HOST = re.compile(
    r"(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+))*\.?", re.IGNORECASE | re.ASCII
)


# The name is the API's word for the outcome (a 422), not an "Error" in the relay.
class AddressForbidden(OSError):
    """A callback connection refused by the network policy. Its message names the addresses:
    for the operator's log, never for the API (a receiver's lastError must not map internal
    DNS)."""


class CallbackUrlRejected(Exception):
    """A callback URL the relay refuses; `reason` is one sentence, safe to show the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@_Remembered
def parse_ip(host: str) -> IPAddress | None:
    """The address an IP-literal host names (an IPv6 zone is dropped), or None for a name."""
    try:
        return ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, NAT64 or 6to4), if any."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    value = int(address)
    # ::a.b.c.d (IPv4-compatible) but not :: or ::1, which have their own meaning.
    if address in _NAT64 or (value >> 32 == 0 and value > 1):
        return ipaddress.IPv4Address(value & 0xFFFF_FFFF)
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class CallbackPolicy:
    """Which addresses callbacks may reach: global unicast, plus the configured allow networks."""

    allow_nets: tuple[IPNetwork, ...] = ()
    _verdicts: dict[IPAddress, str | None] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def forbidden_reason(self, address: IPAddress) -> str | None:
        """Why `address` is refused, as a noun phrase ("a loopback address"), or None if allowed."""
        try:
            return self._verdicts[address]
        except KeyError:
            pass
        reason = self._judge(address)
        if len(self._verdicts) >= VERDICT_CACHE_SIZE:
            self._verdicts.clear()
        self._verdicts[address] = reason
        return reason

    def _judge(self, address: IPAddress) -> str | None:
        inner = embedded_ipv4(address)
        candidates = (address,) if inner is None else (address, inner)
        if any(candidate in net for candidate in candidates for net in self.allow_nets):
            return None
        for candidate in candidates:
            for network, phrase in _BLOCKED:
                if candidate in network:
                    return phrase
        # ::ffff:a.b.c.d reaches a.b.c.d itself, and Python versions disagree on whether
        # the mapped wrapper counts as global, so only the embedded address is judged.
        mapped = isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None
        reached = candidates[1:] if mapped else candidates
        if not all(candidate.is_global for candidate in reached):
            return _NOT_GLOBAL
        return None

    def address_allowed(self, address: IPAddress) -> bool:
        """Whether a callback may connect to `address`."""
        return self.forbidden_reason(address) is None

    def socket_factory(self, addr_info: AddrInfoType) -> socket.socket:
        """Create the socket for one connection attempt, unless its address is forbidden.

        The last gate: it also sees IP-literal URLs, which never reach the resolver.
        """
        family, type_, proto, _, sockaddr = addr_info
        host = str(sockaddr[0])
        address = parse_ip(host)
        reason = _NOT_GLOBAL if address is None else self.forbidden_reason(address)
        if reason is not None:
            raise AddressForbidden(
                errno.EACCES, f"connecting to {host} is forbidden: it is {reason}"
            )
        return socket.socket(family, type_, proto)


class PolicyResolver(AbstractResolver):
    """Wraps a resolver and drops the addresses the policy forbids; fails if none remain."""

    def __init__(self, policy: CallbackPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve `host` with the inner resolver and keep only the allowed addresses."""
        if self._inner is None:
            # Created here, not in __init__: aiohttp's resolvers want a running loop.
            self._inner = DefaultResolver()
        results = await self._inner.resolve(host, port, family)
        allowed = [result for result in results if self._allowed(result["host"])]
        if not allowed:
            # An OSError makes aiohttp report a ClientConnectorError for the request.
            refused = ", ".join(result["host"] for result in results)
            raise AddressForbidden(
                errno.EACCES,
                f"{host} resolves only to addresses the network policy forbids: {refused}",
            )
        return allowed

    def _allowed(self, host: str) -> bool:
        address = parse_ip(host)
        return address is not None and self._policy.address_allowed(address)

    async def close(self) -> None:
        """Close the inner resolver."""
        if self._inner is not None:
            await self._inner.close()


def make_callback_connector(
    policy: CallbackPolicy, *, limit: int, inner_resolver: AbstractResolver | None = None
) -> aiohttp.TCPConnector:
    """A connector for callback deliveries that checks every address it resolves and connects to."""
    return aiohttp.TCPConnector(
        limit=limit,
        resolver=PolicyResolver(policy, inner_resolver),
        socket_factory=policy.socket_factory,
    )


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_callback_url_syntax(url: str) -> URL:
    """Parse `url` as a callback URL, or raise CallbackUrlRejected saying what is wrong."""
    if len(url) > MAX_URL_LENGTH:
        raise CallbackUrlRejected(f"callbackUrl is longer than {MAX_URL_LENGTH} characters")
    if _CONTROL.search(url):
        # URL parsers drop tabs and line breaks silently: what would be called is not what
        # was sent.
        raise CallbackUrlRejected("callbackUrl must not contain control characters")
    try:
        parsed = URL(url)
    # yarl's message may quote the URL, credentials and all. IndexError: yarl 1.25 raises it for
    # some bracketed hosts (`http://[]@/`) where it means ValueError; found by the property test.
    except (ValueError, IndexError):
        raise CallbackUrlRejected("callbackUrl is not a valid URL") from None
    if parsed.scheme not in ("http", "https"):
        raise CallbackUrlRejected("callbackUrl must be an absolute http or https URL")
    if not parsed.raw_host:
        raise CallbackUrlRejected("callbackUrl has no host")
    if parsed.raw_user is not None or parsed.raw_password is not None:
        raise CallbackUrlRejected("callbackUrl must not contain credentials")
    if "#" in url:
        # Never sent in a request: two URLs that differ only there are one receiver, and would
        # be two watches with two callbacks.
        raise CallbackUrlRejected("callbackUrl must not have a #fragment")
    if parsed.explicit_port == 0:
        raise CallbackUrlRejected("callbackUrl port must be between 1 and 65535")
    if len(str(parsed)) > MAX_URL_LENGTH:
        # What is stored and sent is the percent-encoded form: `%F0%9F%98%80` for one emoji. Its
        # length is what bounds a watch, a page of them and the frames that carry a page.
        raise CallbackUrlRejected(
            f"callbackUrl is longer than {MAX_URL_LENGTH} characters once percent-encoded"
        )
    _check_numeric_host(parsed.raw_host)
    return parsed


@_Remembered  # a refusal raises, so only passes are kept
def _check_numeric_host(host: str) -> None:
    """Refuse legacy IPv4 spellings (`127.1`, `2130706433`, `0x7f000001`, `0177.0.0.1`)."""
    if ":" in host:
        return  # an IPv6 literal, which yarl has already checked
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        pass
    else:
        return
    try:
        packed = socket.inet_aton(host)
    except (OSError, ValueError):
        packed = None
    if packed is not None:
        raise CallbackUrlRejected(
            f"callbackUrl host {host!r} is a legacy numeric form of "
            f"{ipaddress.IPv4Address(packed)}; write IPv4 addresses as four decimal octets"
        )
    if _NUMERIC_HOST.fullmatch(host):
        raise CallbackUrlRejected(
            f"callbackUrl host {host!r} looks numeric but is not a valid IPv4 address"
        )


async def resolve_host(host: str, port: int) -> list[IPAddress]:
    """Every address the system resolver gives for `host`, in its order, without repeats."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = (parse_ip(str(sockaddr[0])) for *_, sockaddr in infos)
    return list(dict.fromkeys(address for address in addresses if address is not None))


async def check_callback_url(
    url: str, policy: CallbackPolicy, resolve: Resolve = resolve_host
) -> URL:
    """Check `url` at registration: valid syntax, and every address of its host allowed."""
    parsed = check_callback_url_syntax(url)
    host = parsed.raw_host or ""  # never empty: the syntax check requires a host
    literal = parse_ip(host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            addresses = await resolve(host, parsed.port or 0)
        except OSError:  # socket.gaierror included
            addresses = []
        if not addresses:
            raise CallbackUrlRejected(f"callbackUrl host {host!r} does not resolve")
    for address in addresses:
        reason = policy.forbidden_reason(address)
        if reason is None:
            continue
        if literal is not None:  # the caller's own input: naming it reveals nothing
            raise CallbackUrlRejected(
                f"callbackUrl resolves to {address}, {reason}, which the network policy forbids"
            )
        # A name's forbidden address stays unsaid: the answer must not map internal DNS.
        raise CallbackUrlRejected(
            f"callbackUrl host {host!r} resolves to {reason}, which the network policy forbids"
        )
    return parsed
