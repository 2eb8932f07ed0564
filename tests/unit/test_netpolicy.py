"""The callback network policy: URL syntax, address rules, and the connection-time gates.

Every connection made here goes to a receiver on 127.0.0.1; other addresses are only judged.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer
from hypothesis import example, given
from hypothesis import strategies as st
from yarl import URL

from relay.netpolicy import (
    VERDICT_CACHE_SIZE,
    CallbackPolicy,
    CallbackUrlRejected,
    IPAddress,
    PolicyResolver,
    Resolve,
    check_callback_url,
    check_callback_url_syntax,
    make_callback_connector,
    parse_ip,
)
from tests import strategies

NO_ALLOW = CallbackPolicy()
LOOPBACK_V4 = ipaddress.IPv4Network("127.0.0.0/8")
LOOPBACK_ALLOWED = CallbackPolicy(allow_nets=(LOOPBACK_V4, ipaddress.IPv6Network("::1/128")))


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def forbids(address: str, phrase: str) -> str:
    # ipaddress prints ::ffff:7f00:1 differently across Python versions, so format it the same way.
    return f"callbackUrl resolves to {ip(address)}, {phrase}, which the network policy forbids"


def forbids_name(host: str, phrase: str) -> str:
    # The address a name resolves to is not said: the answer must not map internal DNS.
    return f"callbackUrl host {host!r} resolves to {phrase}, which the network policy forbids"


def legacy(host: str, address: str) -> str:
    return (
        f"callbackUrl host {host!r} is a legacy numeric form of {address}; "
        "write IPv4 addresses as four decimal octets"
    )


def fake_dns(table: Mapping[str, list[str]]) -> Resolve:
    """A registration-time resolver answering from `table`; other names do not exist."""

    async def resolve(host: str, port: int) -> list[IPAddress]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [ip(a) for a in table[host]]

    return resolve


LOCAL_DNS = fake_dns({"localhost": ["127.0.0.1", "::1"]})


class StaticResolver(AbstractResolver):
    """An aiohttp resolver answering from a table, as a re-pointed DNS name would."""

    def __init__(self, table: Mapping[str, list[str]]) -> None:
        self.table = table
        self.lookups: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.lookups.append(host)
        return [
            ResolveResult(
                hostname=host,
                host=a,
                port=port,
                family=socket.AF_INET6 if ":" in a else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for a in self.table[host]
        ]

    async def close(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Receiver:
    port: int
    hits: list[str] = field(default_factory=list)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A real callback receiver on 127.0.0.1 that logs every request it gets."""
    hits: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    assert server.port is not None
    yield Receiver(port=server.port, hits=hits)
    await server.close()


async def post(connector: aiohttp.BaseConnector, url: str) -> int:
    timeout = aiohttp.ClientTimeout(total=5)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        session.post(url, json={"type": "task.completed"}) as response,
    ):
        return response.status


# --- registration: loopback in every spelling --------------------------------------------------

LOOPBACK = "a loopback address"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1/", forbids("127.0.0.1", LOOPBACK)),
        ("http://127.1/", legacy("127.1", "127.0.0.1")),
        ("http://2130706433/", legacy("2130706433", "127.0.0.1")),
        ("http://0x7f000001/", legacy("0x7f000001", "127.0.0.1")),
        ("http://0177.0.0.1/", legacy("0177.0.0.1", "127.0.0.1")),
        ("http://[::1]/", forbids("::1", LOOPBACK)),
        ("http://localhost/", forbids_name("localhost", LOOPBACK)),
        ("http://[::ffff:127.0.0.1]/", forbids("::ffff:127.0.0.1", LOOPBACK)),
        ("http://[::ffff:7f00:1]/", forbids("::ffff:127.0.0.1", LOOPBACK)),
    ],
)
async def test_loopback_urls_are_rejected_with_a_reason(url: str, reason: str) -> None:
    """Every spelling of loopback is refused at registration, each with its own reason."""
    with pytest.raises(CallbackUrlRejected) as caught:
        await check_callback_url(url, NO_ALLOW, LOCAL_DNS)
    assert caught.value.reason == reason


async def test_localhost_is_rejected_through_the_system_resolver() -> None:
    """The real resolver's answer for localhost is judged like any other name's."""
    with pytest.raises(CallbackUrlRejected) as caught:
        await check_callback_url("http://localhost:8080/", NO_ALLOW)
    assert caught.value.reason == forbids_name("localhost", LOOPBACK)


@pytest.mark.parametrize("url", ["http://127.0.0.1/", "http://[::1]/", "http://localhost/"])
async def test_allow_nets_admit_canonical_loopback_urls(url: str) -> None:
    """With loopback in the allow nets, its canonical spellings register."""
    assert await check_callback_url(url, LOOPBACK_ALLOWED, LOCAL_DNS) == URL(url)


@pytest.mark.parametrize(
    ("host", "address"),
    [("127.1", "127.0.0.1"), ("2130706433", "127.0.0.1"), ("0x7f000001", "127.0.0.1")],
)
async def test_allow_nets_do_not_excuse_legacy_numeric_hosts(host: str, address: str) -> None:
    """Legacy numeric hosts stay a syntax error even where their address is allowed."""
    with pytest.raises(CallbackUrlRejected) as caught:
        await check_callback_url(f"http://{host}/", LOOPBACK_ALLOWED, LOCAL_DNS)
    assert caught.value.reason == legacy(host, address)


# --- registration: syntax and resolution --------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.com/hook", "callbackUrl must be an absolute http or https URL"),
        ("/relative/hook", "callbackUrl must be an absolute http or https URL"),
        ("example.com/hook", "callbackUrl must be an absolute http or https URL"),
        ("http:///hook", "callbackUrl has no host"),
        ("http://user:hunter2@example.com/", "callbackUrl must not contain credentials"),
        ("http://user@example.com/", "callbackUrl must not contain credentials"),
        ("http://[::1/", "callbackUrl is not a valid URL"),
        ("http://example.com:99999/", "callbackUrl is not a valid URL"),
        (
            "http://1.2.3.4.5/",
            "callbackUrl host '1.2.3.4.5' looks numeric but is not a valid IPv4 address",
        ),
        (
            "http://127.0.0.1./",
            "callbackUrl host '127.0.0.1.' looks numeric but is not a valid IPv4 address",
        ),
        ("http://example.com/" + "a" * 2030, "callbackUrl is longer than 2048 characters"),
        (
            # 700 characters as sent, 4,219 once percent-encoded: what is stored and called
            "http://example.com/" + "\U0001f600" * 350,
            "callbackUrl is longer than 2048 characters once percent-encoded",
        ),
        ("http://example.com/h\r\nX-Evil: 1", "callbackUrl must not contain control characters"),
        ("http://example.com/h\tx", "callbackUrl must not contain control characters"),
        ("http://example.com/hook#part", "callbackUrl must not have a #fragment"),
        ("http://example.com/hook#", "callbackUrl must not have a #fragment"),
        ("http://example.com:0/hook", "callbackUrl port must be between 1 and 65535"),
    ],
)
def test_malformed_urls_are_rejected_with_a_reason(url: str, reason: str) -> None:
    """Each syntax problem is refused with a sentence naming it."""
    with pytest.raises(CallbackUrlRejected) as caught:
        check_callback_url_syntax(url)
    assert caught.value.reason == reason


def test_a_url_of_exactly_2048_characters_is_accepted() -> None:
    """The length limit is inclusive."""
    url = "https://example.com/" + "a" * 2028
    assert (len(url), check_callback_url_syntax(url)) == (2048, URL(url))


def test_a_url_of_exactly_2048_characters_percent_encoded_is_accepted() -> None:
    """Each emoji is 12 characters encoded: 20 + 12 * 169 = 2048."""
    url = "https://example.com/" + "\U0001f600" * 169
    checked = check_callback_url_syntax(url)
    assert 2048 == len(str(checked))
    with pytest.raises(CallbackUrlRejected, match="once percent-encoded"):
        check_callback_url_syntax(url + "a")


def test_credentials_never_appear_in_the_reason() -> None:
    """The password from the URL is in neither the reason nor the exception text."""
    with pytest.raises(CallbackUrlRejected) as caught:
        check_callback_url_syntax("https://admin:Tr0ub4dor-3@example.com:8443/hook")
    leaks = ("Tr0ub4dor" in caught.value.reason, "Tr0ub4dor" in str(caught.value))
    assert leaks == (False, False)


async def test_a_name_that_does_not_resolve_is_rejected() -> None:
    """A host the resolver does not know is refused."""
    with pytest.raises(CallbackUrlRejected) as caught:
        await check_callback_url("https://nowhere.invalid/hook", NO_ALLOW, fake_dns({}))
    assert caught.value.reason == "callbackUrl host 'nowhere.invalid' does not resolve"


async def test_one_forbidden_address_among_several_rejects_the_name() -> None:
    """A name is refused if any of its addresses is forbidden, not only if all are."""
    dns = fake_dns({"mixed.example": ["8.8.8.8", "10.0.0.1"]})
    with pytest.raises(CallbackUrlRejected) as caught:
        await check_callback_url("https://mixed.example/hook", NO_ALLOW, dns)
    assert caught.value.reason == forbids_name("mixed.example", "a private address")
    assert "10.0.0.1" not in caught.value.reason


async def test_a_name_with_only_global_addresses_registers() -> None:
    """A name resolving only to global unicast addresses passes."""
    dns = fake_dns({"hooks.example": ["8.8.8.8", "2606:4700::1111"]})
    url = "https://hooks.example/hook?x=1"
    assert await check_callback_url(url, NO_ALLOW, dns) == URL(url)


# --- the address policy, as a pure function ------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("169.254.169.254", "a link-local address"),
        ("10.0.0.1", "a private address"),
        ("172.16.5.4", "a private address"),
        ("192.168.1.1", "a private address"),
        ("100.64.0.1", "a shared (CGNAT) address"),
        ("127.0.0.1", LOOPBACK),
        ("::1", LOOPBACK),
        ("::ffff:127.0.0.1", LOOPBACK),
        ("::7f00:1", LOOPBACK),
        ("64:ff9b::7f00:1", LOOPBACK),
        ("2002:7f00:1::", LOOPBACK),
        ("64:ff9b::a00:1", "a private address"),
        ("fe80::1", "a link-local address"),
        ("fc00::1", "a private address"),
        ("224.0.0.1", "a multicast address"),
        ("ff02::1", "a multicast address"),
        ("0.0.0.0", "an unspecified address"),
        ("::", "an unspecified address"),
        ("255.255.255.255", "a broadcast address"),
        ("240.0.0.1", "a reserved address"),
        ("192.0.2.10", "a documentation address"),
        ("2001:db8::1", "a documentation address"),
        ("2001::1", "a reserved address"),
        ("64:ff9b:1::1", "a reserved address"),
        ("::ffff:100.64.0.1", "a shared (CGNAT) address"),
    ],
)
def test_forbidden_addresses_name_their_kind(address: str, reason: str) -> None:
    """Each forbidden address is refused with the phrase for its kind."""
    verdict = (NO_ALLOW.forbidden_reason(ip(address)), NO_ALLOW.address_allowed(ip(address)))
    assert verdict == (reason, False)


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::"],
)
def test_global_addresses_are_allowed(address: str) -> None:
    """Global unicast addresses, and mapped, NAT64 and 6to4 forms of them, are allowed."""
    assert (
        NO_ALLOW.forbidden_reason(ip(address)),
        NO_ALLOW.address_allowed(ip(address)),
    ) == (None, True)


@pytest.mark.parametrize("address", ["127.0.0.53", "::ffff:127.0.0.1", "2002:7f00:1::"])
def test_allow_nets_match_raw_and_embedded_addresses(address: str) -> None:
    """An allow net for 127.0.0.0/8 also admits IPv6 forms that carry a loopback address."""
    assert CallbackPolicy(allow_nets=(LOOPBACK_V4,)).address_allowed(ip(address))


@given(strategies.forbidden_ipv4s())
def test_every_blocklisted_ipv4_is_forbidden(address: ipaddress.IPv4Address) -> None:
    """No address in a blocklisted IPv4 network is allowed."""
    assert not NO_ALLOW.address_allowed(address)


@given(st.sampled_from(sorted(strategies.EMBEDDINGS)), strategies.forbidden_ipv4s())
def test_ipv6_forms_of_a_forbidden_ipv4_are_forbidden(
    embedding: str, address: ipaddress.IPv4Address
) -> None:
    """Mapped, compatible, NAT64 and 6to4 forms of a forbidden IPv4 address are forbidden."""
    assert not NO_ALLOW.address_allowed(strategies.EMBEDDINGS[embedding](address))


@given(strategies.global_ipv4s())
def test_every_global_ipv4_outside_the_blocklist_is_allowed(address: ipaddress.IPv4Address) -> None:
    """The policy refuses only what it must."""
    assert NO_ALLOW.address_allowed(address)


@given(strategies.legacy_ipv4_spellings())
def test_legacy_ipv4_spellings_are_refused_naming_the_address(
    spelling: tuple[str, ipaddress.IPv4Address],
) -> None:
    """Integer, hex, octal and short IPv4 spellings are refused and decoded in the reason."""
    host, address = spelling
    with pytest.raises(CallbackUrlRejected) as caught:
        check_callback_url_syntax(f"http://{host}/")
    assert caught.value.reason == legacy(host, str(address))


@example("http://[]@/")  # yarl 1.25 raises IndexError for it
@given(strategies.url_strings())
def test_syntax_check_raises_only_callback_url_rejected(url: str) -> None:
    """Any text is either accepted as an http(s) URL with a host or rejected, never crashing."""
    try:
        parsed = check_callback_url_syntax(url)
    except CallbackUrlRejected:
        return
    accepted = (parsed.scheme in {"http", "https"}, bool(parsed.raw_host), parsed.raw_user)
    assert accepted == (True, True, None)


@given(strategies.passwords(), strategies.url_strings())
def test_no_reason_ever_carries_the_password(password: str, rest: str) -> None:
    """Whatever else is wrong with a URL, its password never reaches the reason."""
    with pytest.raises(CallbackUrlRejected) as caught:
        check_callback_url_syntax(f"https://user:{password}@{rest}")
    assert password not in caught.value.reason


# --- connection time: the resolver hook and the socket factory -----------------------------------


async def test_policy_resolver_drops_forbidden_addresses() -> None:
    """Allowed addresses pass through the resolver; forbidden ones are dropped."""
    inner = StaticResolver({"mixed.example": ["8.8.8.8", "127.0.0.1", "::1"]})
    results = await PolicyResolver(NO_ALLOW, inner).resolve("mixed.example", 443)
    assert [result["host"] for result in results] == ["8.8.8.8"]


async def test_policy_resolver_fails_when_nothing_is_allowed() -> None:
    """A name with only forbidden addresses fails to resolve, naming them."""
    inner = StaticResolver({"inside.example": ["10.0.0.1", "fd00::1"]})
    with pytest.raises(OSError, match="forbids") as caught:
        await PolicyResolver(NO_ALLOW, inner).resolve("inside.example", 443)
    assert (
        caught.value.strerror
        == "inside.example resolves only to addresses the network policy forbids: 10.0.0.1, fd00::1"
    )


def test_socket_factory_refuses_a_forbidden_address() -> None:
    """The socket factory raises instead of creating a socket for a forbidden address."""
    addr_info = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("10.0.0.1", 80))
    with pytest.raises(OSError, match="forbidden") as caught:
        NO_ALLOW.socket_factory(addr_info)
    assert caught.value.strerror == "connecting to 10.0.0.1 is forbidden: it is a private address"


async def test_a_name_repointed_to_loopback_after_registration_is_not_contacted(
    receiver: Receiver,
) -> None:
    """DNS rebinding: a name that was global at registration and loopback at delivery is refused."""
    url = f"http://callback.example:{receiver.port}/"
    await check_callback_url(url, NO_ALLOW, fake_dns({"callback.example": ["8.8.8.8"]}))
    inner = StaticResolver({"callback.example": ["127.0.0.1"]})
    connector = make_callback_connector(NO_ALLOW, limit=1, inner_resolver=inner)
    with pytest.raises(aiohttp.ClientConnectorError) as caught:
        await post(connector, url)
    assert (inner.lookups, caught.value.os_error.strerror, receiver.hits) == (
        ["callback.example"],
        "callback.example resolves only to addresses the network policy forbids: 127.0.0.1",
        [],
    )


async def test_a_name_resolving_to_an_allowed_loopback_is_delivered(receiver: Receiver) -> None:
    """With loopback allowed, the same re-pointed name is delivered to."""
    inner = StaticResolver({"callback.example": ["127.0.0.1"]})
    connector = make_callback_connector(LOOPBACK_ALLOWED, limit=1, inner_resolver=inner)
    status = await post(connector, f"http://callback.example:{receiver.port}/")
    assert (status, receiver.hits) == (204, ["/"])


async def test_socket_factory_blocks_an_ip_literal(receiver: Receiver) -> None:
    """An IP-literal URL skips the resolver, so the socket factory refuses it."""
    connector = make_callback_connector(NO_ALLOW, limit=1)
    with pytest.raises(aiohttp.ClientConnectorError) as caught:
        await post(connector, f"http://127.0.0.1:{receiver.port}/")
    assert (caught.value.os_error.strerror, receiver.hits) == (
        "connecting to 127.0.0.1 is forbidden: it is a loopback address",
        [],
    )


async def test_socket_factory_blocks_a_name_even_without_the_policy_resolver(
    receiver: Receiver,
) -> None:
    """The socket factory alone stops a name resolving to a forbidden address."""
    resolver = StaticResolver({"callback.example": ["127.0.0.1"]})
    connector = aiohttp.TCPConnector(resolver=resolver, socket_factory=NO_ALLOW.socket_factory)
    with pytest.raises(aiohttp.ClientConnectorError) as caught:
        await post(connector, f"http://callback.example:{receiver.port}/")
    assert (caught.value.os_error.strerror, receiver.hits) == (
        "connecting to 127.0.0.1 is forbidden: it is a loopback address",
        [],
    )


async def test_an_allowed_ip_literal_is_delivered(receiver: Receiver) -> None:
    """With 127.0.0.0/8 allowed, a POST to the IP literal reaches the receiver once."""
    connector = make_callback_connector(CallbackPolicy(allow_nets=(LOOPBACK_V4,)), limit=1)
    status = await post(connector, f"http://127.0.0.1:{receiver.port}/")
    assert (status, receiver.hits) == (204, ["/"])


def test_remembered_verdicts_stay_per_policy_and_bounded() -> None:
    """The memo is the policy's own: a loopback allowed by one policy stays refused by another."""
    loopback = ipaddress.ip_address("127.0.0.1")
    allowing = CallbackPolicy(allow_nets=(ipaddress.ip_network("127.0.0.0/8"),))
    strict = CallbackPolicy()
    for _ in range(2):  # the second round answers from memory
        assert allowing.forbidden_reason(loopback) is None
        assert "a loopback address" == strict.forbidden_reason(loopback)

    # A spread of addresses with different verdicts: 0.x, 10.x, 127.x, 169.254.x, public, ...
    addresses = [ipaddress.IPv4Address(i * 1_000_003) for i in range(VERDICT_CACHE_SIZE + 100)]
    judged = [strict._judge(a) for a in addresses]  # afresh, no memo
    assert len(set(judged)) > 3

    first = [strict.forbidden_reason(a) for a in addresses]
    again = [strict.forbidden_reason(a) for a in addresses[-100:]]  # answered from the memo

    assert len(strict._verdicts) <= VERDICT_CACHE_SIZE
    assert judged == first
    assert judged[-100:] == again


def test_remembered_host_checks_answer_as_the_first_time_and_skip_long_hosts() -> None:
    """A refused legacy host is refused every time (a refusal is never remembered as a pass)."""
    for _ in range(2):
        with pytest.raises(CallbackUrlRejected, match="legacy numeric form"):
            check_callback_url_syntax("http://127.1/hook")
        assert ipaddress.ip_address("127.0.0.1") == parse_ip("127.0.0.1")
        assert parse_ip("receiver.example") is None
    kept = parse_ip.cache.cache_info().currsize
    assert parse_ip("a" * 300 + ".example") is None
    assert kept == parse_ip.cache.cache_info().currsize  # longer than any DNS name: not kept
    assert parse_ip(f"{kept}.receiver.example") is None
    assert kept + 1 == parse_ip.cache.cache_info().currsize


async def test_a_refused_callback_says_why_without_the_addresses(receiver: Receiver) -> None:
    """A name re-pointed at loopback after registration: the attempt is refused, and its
    lastError (the API's) does not say what the name resolves to; the operator's log does."""
    from relay.delivery import CallbackSender
    from relay.models import DeliveryJob, DeliveryOutcome, EventType

    inner = StaticResolver({"callback.example": ["127.0.0.1"]})
    connector = make_callback_connector(NO_ALLOW, limit=1, inner_resolver=inner)
    job = DeliveryJob(
        watch_id="wt_x",
        task_id="tk-hiapi-x",
        callback_url=f"http://callback.example:{receiver.port}/",
        metadata=None,
        event_type=EventType.SUCCESS,
        task_data=None,
        event_at=1_700_000_000.0,
        attempts=0,
        due_at=1_700_000_000.0,
        lease_until=1_700_000_060.0,
    )
    async with aiohttp.ClientSession(connector=connector) as session:
        result = await CallbackSender(session, keys=[], timeout_s=5).send(job, now=job.event_at)
    assert (DeliveryOutcome.RETRY, [], False) == (
        result.outcome,
        receiver.hits,
        "127.0.0.1" in (result.detail or ""),
    )
    assert "network policy" in (result.detail or "")
