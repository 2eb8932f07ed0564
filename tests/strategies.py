"""Hypothesis strategies: callback URLs and the addresses they point at, and upstream answers."""

from __future__ import annotations

import ipaddress
import string
from collections.abc import Callable
from typing import Any

import orjson
from hypothesis import strategies as st

# Restated from the issue rather than imported, so the properties check the module's own table.
FORBIDDEN_V4_NETS = tuple(
    ipaddress.IPv4Network(net)
    for net in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "255.255.255.255/32",
    )
)

# Ways an IPv6 address carries an IPv4 one; each must be judged by the IPv4 inside.
EMBEDDINGS: dict[str, Callable[[ipaddress.IPv4Address], ipaddress.IPv6Address]] = {
    "mapped": lambda v4: ipaddress.IPv6Address(0xFFFF << 32 | int(v4)),
    "compatible": lambda v4: ipaddress.IPv6Address(int(v4)),
    "nat64": lambda v4: ipaddress.IPv6Address(0x64FF9B << 96 | int(v4)),
    "6to4": lambda v4: ipaddress.IPv6Address(0x2002 << 112 | int(v4) << 80),
}


def ipv4s_in(net: ipaddress.IPv4Network) -> st.SearchStrategy[ipaddress.IPv4Address]:
    """Any address of `net`."""
    low, high = int(net.network_address), int(net.broadcast_address)
    return st.integers(low, high).map(ipaddress.IPv4Address)


def forbidden_ipv4s() -> st.SearchStrategy[ipaddress.IPv4Address]:
    """An address from one of the blocklisted IPv4 networks."""
    return st.sampled_from(FORBIDDEN_V4_NETS).flatmap(ipv4s_in)


def global_ipv4s() -> st.SearchStrategy[ipaddress.IPv4Address]:
    """A globally routable IPv4 address outside every blocklisted network."""
    return (
        st.integers(0, 2**32 - 1)
        .map(ipaddress.IPv4Address)
        .filter(lambda a: a.is_global and not any(a in net for net in FORBIDDEN_V4_NETS))
    )


def legacy_ipv4_spellings() -> st.SearchStrategy[tuple[str, ipaddress.IPv4Address]]:
    """A legacy spelling (integer, hex, octal octets, short form) and the address it means."""
    spell: dict[str, Callable[[ipaddress.IPv4Address], str]] = {
        "decimal": lambda a: str(int(a)),
        "hex": lambda a: hex(int(a)),
        "octal": lambda a: ".".join(f"0{octet:o}" for octet in a.packed),
        "short": lambda a: f"{a.packed[0]}.{int(a) & 0xFFFFFF}",
    }
    return st.tuples(
        st.sampled_from(sorted(spell)), ipv4s_in(ipaddress.IPv4Network("0.0.0.0/0"))
    ).map(lambda pair: (spell[pair[0]](pair[1]), pair[1]))


_HOSTS = st.one_of(
    st.from_regex(r"[a-z0-9-]{1,12}(\.[a-z0-9-]{1,12}){0,3}\.?", fullmatch=True),
    st.from_regex(
        r"(0x[0-9a-f]{0,8}|[0-9]{1,10})(\.(0x[0-9a-f]{0,4}|[0-9]{1,4})){0,4}", fullmatch=True
    ),
    st.ip_addresses().map(lambda a: f"[{a}]" if a.version == 6 else str(a)),
    st.text(string.printable, max_size=20),
)


def url_strings() -> st.SearchStrategy[str]:
    """Arbitrary printable text, and URL-shaped text with odd schemes, userinfo, hosts and ports."""
    shaped = st.builds(
        "{}{}{}{}{}".format,
        st.sampled_from(["http://", "https://", "HTTP://", "ftp://", "http:", "//", ""]),
        st.sampled_from(["", "user@", "user:pw@", ":pw@", "@"]),
        _HOSTS,
        st.one_of(st.just(""), st.integers(-1, 70_000).map(lambda p: f":{p}")),
        st.text(string.printable, max_size=30),
    )
    return st.one_of(st.text(string.printable), shaped)


def passwords() -> st.SearchStrategy[str]:
    """A password distinctive enough that finding it in a message means it leaked."""
    return st.text(string.ascii_letters + string.digits, min_size=4, max_size=16).map(
        lambda s: f"Pw-{s}"
    )


# --- upstream answers -----------------------------------------------------------------------------

# What orjson reads back exactly: integers within 64 bits (wider ones come back as floats) and
# finite floats (it writes NaN and infinities as null).
_JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),
)


def json_values() -> st.SearchStrategy[Any]:
    """Any JSON value that survives an orjson round trip unchanged."""
    return st.recursive(
        _JSON_SCALARS,
        lambda inner: st.one_of(
            st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)
        ),
        max_leaves=20,
    )


def json_objects() -> st.SearchStrategy[dict[str, Any]]:
    """A JSON object with any keys and values."""
    return st.dictionaries(st.text(max_size=10), json_values(), max_size=6)


def http_statuses() -> st.SearchStrategy[int]:
    """Any status code a server could send, the common ones more often."""
    return st.one_of(
        st.sampled_from([200, 201, 204, 301, 400, 401, 403, 404, 408, 410, 429, 500, 502, 503]),
        st.integers(100, 599),
    )


def envelope_bodies() -> st.SearchStrategy[bytes]:
    """Bytes that are almost a task envelope: any code, any data, extra keys, or cut short."""
    envelope = st.builds(
        lambda code, data, extra: {**extra, "code": code, "data": data},
        st.one_of(st.sampled_from([200, 404, 429, 500]), json_values()),
        json_values(),
        json_objects(),
    ).map(orjson.dumps)
    return st.one_of(
        envelope,
        envelope.flatmap(lambda body: st.integers(0, len(body)).map(lambda cut: body[:cut])),
        json_values().map(orjson.dumps),
        st.binary(max_size=200),
    )
