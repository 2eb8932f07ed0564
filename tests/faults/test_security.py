"""Hostile clients on the API port, and secrets kept out of everything the relay writes.

Oversize bodies and headers, slow-loris connections and slow bodies, tokens that are wrong in
every way, and a relay process run with distinctive secrets whose logs (at DEBUG), /metrics and
error bodies are grepped for them. Everything stays on loopback. SSRF, DNS answers that change
after registration, and redirects are covered in tests/unit/test_netpolicy.py and
tests/integration/test_relay.py.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from relay import api
from relay.config import Secret
from relay.errors import PROBLEM_BASE, PROBLEM_CONTENT_TYPE
from relay.fake_upstream import Schedule, create_fake_upstream_app
from tests.conftest import RelayFactory
from tests.processes import RelayProcess, free_port, settle

MAX_BODY = 64 * 1024
HOOK = f"http://127.0.0.1:{free_port()}/hook"  # registration never dials it
WATCH = orjson.dumps({"taskId": "tk-hiapi-sec-1", "callbackUrl": HOOK})
SLOW_CLIENTS = 50
SLOW_HEAD = b"POST /watch HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
BYTE_EVERY_S = 0.05  # the slow head takes len(SLOW_HEAD) * 0.05 s = 3.6 s to trickle
NORMAL_REQUESTS = 30
# A normal request on loopback takes milliseconds; this much means the slow clients starved it.
NORMAL_LATENCY_BOUND_S = 0.5


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def problem(self) -> Any:
        assert PROBLEM_CONTENT_TYPE == self.headers.get("content-type", "").partition(";")[0]
        return orjson.loads(self.body)


async def read_response(reader: asyncio.StreamReader, timeout: float = 10.0) -> RawResponse:
    """One HTTP/1.1 response with a Content-Length body, read off a raw connection."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = await asyncio.wait_for(reader.readexactly(length), timeout)
    return RawResponse(int(status_line.split()[1]), headers, body)


async def exchange(port: int, *parts: bytes) -> RawResponse:
    """Send `parts` on a new connection (stopping if the server hangs up), read the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for part in parts:
            try:
                writer.write(part)
                await writer.drain()
            except ConnectionError:
                break  # it answered and closed before taking the rest, as a 413 may
        return await read_response(reader)
    finally:
        writer.close()


def post_head(headers: dict[str, str]) -> bytes:
    lines = [
        "POST /watch HTTP/1.1",
        "Host: 127.0.0.1",
        "Content-Type: application/json",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def padded_watch(size: int) -> bytes:
    """A valid registration padded with whitespace to exactly `size` bytes."""
    return WATCH[:-1] + b" " * (size - len(WATCH)) + b"}"


def chunked(data: bytes, size: int = 16 * 1024) -> bytes:
    pieces = [data[i : i + size] for i in range(0, len(data), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def too_large() -> dict[str, Any]:
    return {
        "type": PROBLEM_BASE + "too-large",
        "title": "Content Too Large",
        "status": 413,
        "detail": f"the body is over {MAX_BODY} bytes",
        "instance": "/watch",
    }


def relay_process(tmp_path: Path, **env: str) -> RelayProcess:
    """A `relay serve` on a SQLite file whose upstream is a closed loopback port."""
    return RelayProcess(
        env={
            "RELAY_STORE_URL": f"sqlite:///{tmp_path / 'relay.db'}",
            "RELAY_UPSTREAM_URL": f"http://127.0.0.1:{free_port()}",
            "RELAY_CALLBACK_ALLOW_NETS": "127.0.0.0/8",
            "RELAY_SHUTDOWN_TIMEOUT_S": "2",
            **env,
        },
        log_path=tmp_path / "relay.log",
    )


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[RelayProcess]:
    relay = relay_process(tmp_path)
    await relay.start()
    yield relay
    await relay.stop()


async def registered(relay: RelayProcess) -> list[str]:
    async with aiohttp.ClientSession() as session, session.get(f"{relay.url}/watches") as answer:
        return [w["watchId"] for w in (await answer.json())["watches"]]


async def healthy(relay: RelayProcess) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"{relay.url}/healthz") as answer:
        return answer.status


# --- oversize bodies and headers ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "parts",
    [
        pytest.param(
            [post_head({"Content-Length": str(MAX_BODY + 1)}), padded_watch(MAX_BODY + 1)],
            id="content-length",
        ),
        pytest.param(
            [post_head({"Transfer-Encoding": "chunked"}), chunked(padded_watch(MAX_BODY + 1))],
            id="chunked",
        ),
        pytest.param([post_head({"Content-Length": str(2**30)})], id="1-gib-announced-none-sent"),
        pytest.param(
            [
                post_head({"Transfer-Encoding": "chunked", "Content-Encoding": "gzip"}),
                chunked(gzip.compress(padded_watch(16 * 2**20))),
            ],
            id="gzip-16-mib-inflated",
        ),
    ],
)
async def test_body_over_64_kib_answers_413_problem_and_the_relay_serves_on(
    served: RelayProcess, parts: list[bytes]
) -> None:
    """Over 64 KiB, announced or chunked or inflated: 413 problem at once, nothing kept."""
    started = time.monotonic()
    response = await exchange(served.port, *parts)
    took = time.monotonic() - started

    assert (413, too_large()) == (response.status, response.problem)
    assert took < 2.0, f"413 took {took:.2f} s"
    assert (200, []) == (await healthy(served), await registered(served))


@pytest.mark.slow
@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 100 * 1024, id="100-kib-header"),
        pytest.param(b"GET /healthz?" + b"a" * 100 * 1024 + b" HTTP/1.1", id="100-kib-url"),
        pytest.param(
            b"GET /healthz HTTP/1.1" + b"".join(b"\r\nX-H%d: v" % n for n in range(200)),
            id="200-headers",
        ),
    ],
)
async def test_oversize_request_head_answers_4xx_and_the_relay_serves_on(
    served: RelayProcess, head: bytes
) -> None:
    """aiohttp's parser limits (8190-byte lines and fields, 128 headers) refuse it with a 4xx."""
    response = await exchange(served.port, head + b"\r\nHost: 127.0.0.1\r\n\r\n")

    assert 400 <= response.status < 500
    assert 200 == await healthy(served)


# --- slow clients ---------------------------------------------------------------------------------


async def trickle(
    port: int, data: bytes, every_s: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a connection and send `data` one byte at a time; leave it open."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for byte in data:
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(every_s)
    return reader, writer


@pytest.mark.slow
async def test_fifty_slow_loris_clients_do_not_slow_a_normal_client(served: RelayProcess) -> None:
    """50 connections trickling a request head byte by byte; registrations still answer at once."""
    slow = [
        asyncio.create_task(trickle(served.port, SLOW_HEAD, BYTE_EVERY_S))
        for _ in range(SLOW_CLIENTS)
    ]
    latencies: list[float] = []
    statuses: list[int] = []
    async with aiohttp.ClientSession() as session:
        await asyncio.sleep(0.5)  # every slow connection is open and part-way through its head
        for n in range(NORMAL_REQUESTS):
            started = time.monotonic()
            body = {"taskId": f"tk-hiapi-loris-{n}", "callbackUrl": HOOK}
            async with session.post(f"{served.url}/watch", json=body) as created:
                watch = await created.json()
            async with session.get(f"{served.url}/watch/{watch['watchId']}") as read:
                statuses += [created.status, read.status]
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.05)
    connections = await asyncio.gather(*slow)
    held = sum(not reader.at_eof() for reader, _ in connections)

    assert [201, 200] * NORMAL_REQUESTS == statuses
    assert max(latencies) < NORMAL_LATENCY_BOUND_S, f"max {max(latencies):.3f} s"
    # aiohttp closes a connection that has not finished its head after keepalive_timeout (75 s
    # under run_app); within these seconds all 50 are still held, and cost the relay nothing.
    assert SLOW_CLIENTS == held
    started = time.monotonic()
    assert 0 == await served.stop()
    # Under RELAY_SHUTDOWN_TIMEOUT_S (2 s): a stop closes half-sent heads, it does not wait on them.
    assert time.monotonic() - started < 1.5
    for _, writer in connections:
        writer.close()


async def test_slow_body_answers_408_problem_and_frees_the_handler(
    make_relay: RelayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body that stops part-way answers 408 after the read bound, not never; nothing is kept."""
    monkeypatch.setattr(api, "BODY_READ_TIMEOUT_S", 0.5)
    relay = await make_relay()
    port = relay.client.port
    assert port is not None

    started = time.monotonic()
    response = await exchange(port, post_head({"Content-Length": "100"}) + WATCH[:10])
    took = time.monotonic() - started

    assert (408, "body-timeout", "the body did not arrive within 0.5 s") == (
        response.status,
        response.problem["type"].removeprefix(PROBLEM_BASE),
        response.problem["detail"],
    )
    assert 0.5 <= took < 2.0
    assert [] == (await (await relay.client.get("/watches")).json())["watches"]


# --- tokens ---------------------------------------------------------------------------------------

TOKEN = "tok-sec-8c1f0e7a2b"


@pytest.mark.parametrize(
    "presented",
    [
        pytest.param("Xok-sec-8c1f0e7a2b", id="equal-length-first-byte"),
        pytest.param("tok-sec-8c1f0e7a2X", id="equal-length-last-byte"),
        pytest.param("tok-sec-8c1fXe7a2b", id="equal-length-middle-byte"),
        pytest.param("tok-sec-8c1f0e7a2", id="one-shorter"),
        pytest.param("tok-sec-8c1f0e7a2bb", id="one-longer"),
        pytest.param(TOKEN * 64, id="far-longer"),
        pytest.param("t", id="one-byte"),
        pytest.param("tök-sec-8c1f0e7a2b", id="non-ascii"),
    ],
)
async def test_wrong_tokens_of_any_length_are_refused_alike(
    make_relay: RelayFactory, presented: str
) -> None:
    """Wrong tokens of equal and of other lengths get the same 401, byte for byte; the right one
    registers."""
    relay = await make_relay(api_tokens=(Secret(TOKEN),))

    missing = await relay.client.post(
        "/watch", data=WATCH, headers={"Content-Type": "application/json"}
    )
    wrong = await relay.client.post(
        "/watch",
        data=WATCH,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {presented}"},
    )
    right = await relay.client.post(
        "/watch",
        data=WATCH,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
    )

    assert (401, await missing.read(), missing.headers["WWW-Authenticate"]) == (
        wrong.status,
        await wrong.read(),
        wrong.headers["WWW-Authenticate"],
    )
    assert 201 == right.status


# --- secrets --------------------------------------------------------------------------------------

# Each distinctive enough that finding it anywhere means it leaked.
UPSTREAM_KEY = "upkey-Zq7Wm3Vx9Rt2"
API_TOKENS = ("apitok-Hn4Jc8Pd1Ly6", "apitok-Bf5Ks2Gw7Ne3")
SIGNING_KEY = b"sigkey-Yd9Tm4Qa6Uc1Xe8Op"  # 24 bytes
SIGNING_SECRET = "whsec_" + base64.b64encode(SIGNING_KEY).decode()
DB_PASSWORD = "dbpw-Kr6Vn2Hs9Ft4"


def leaked(text: str, secrets: tuple[str, ...]) -> list[str]:
    """The secrets found in `text`."""
    return [s for s in secrets if s in text]


SECRETS = (UPSTREAM_KEY, *API_TOKENS, SIGNING_SECRET, SIGNING_SECRET[6:], DB_PASSWORD)


@pytest.fixture(params=["sqlite", "postgres"])
def store_env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """The store settings: a SQLite file, or PostgreSQL by a URL that carries a password."""
    if request.param == "sqlite":
        return {"RELAY_STORE_URL": f"sqlite:///{tmp_path / 'relay.db'}"}
    dsn, schema = request.getfixturevalue("pg_schema")  # skips without RELAY_TEST_POSTGRES_DSN
    scheme, _, rest = dsn.partition("://")
    userinfo, _, hostpart = rest.rpartition("@")
    user = userinfo.partition(":")[0] or "postgres"
    # The test cluster trusts loopback, so the password is carried (and must be kept) but unused.
    return {
        "RELAY_STORE_URL": f"{scheme}://{user}:{DB_PASSWORD}@{hostpart}",
        "RELAY_POSTGRES_SCHEMA": schema,
    }


@pytest.mark.slow
async def test_secrets_never_reach_logs_metrics_or_error_bodies(
    tmp_path: Path, store_env: dict[str, str]
) -> None:
    """Registrations, deliveries, 401s, 422s and upstream 401s at DEBUG: no secret anywhere."""
    arrived = asyncio.Event()

    async def receive(request: web.Request) -> web.Response:
        arrived.set()
        return web.Response(status=204)

    receiver_app = web.Application()
    receiver_app.router.add_post("/hook", receive)
    receiver = TestServer(receiver_app, host="127.0.0.1")
    upstream_app = create_fake_upstream_app(
        api_key=UPSTREAM_KEY, schedule=Schedule(queued_s=0, handling_s=0, archiving_s=0)
    )
    upstream = TestServer(upstream_app, host="127.0.0.1")
    await receiver.start_server()
    await upstream.start_server()
    relay = relay_process(
        tmp_path,
        **store_env,
        RELAY_UPSTREAM_URL=str(upstream.make_url("")).rstrip("/"),
        RELAY_UPSTREAM_API_KEY=UPSTREAM_KEY,
        RELAY_API_TOKENS=",".join(API_TOKENS),
        RELAY_SIGNING_SECRET=SIGNING_SECRET,
        RELAY_LOG_LEVEL="DEBUG",
        RELAY_POLL_INITIAL_S="0.2",
    )
    answers: list[str] = []
    try:
        await relay.start()
        good = {"Authorization": f"Bearer {API_TOKENS[1]}"}
        async with aiohttp.ClientSession() as session:

            async def call(method: str, path: str, **kwargs: Any) -> int:
                async with session.request(method, f"{relay.url}{path}", **kwargs) as answer:
                    answers.append(f"{answer.status} {dict(answer.headers)} {await answer.text()}")
                    return answer.status

            # An upstream that rejects the key for a while: the relay logs auth errors.
            async with session.post(
                upstream.make_url("/_fake/script/tk-hiapi-sec-1"),
                json={"responses": [{"status": 401}, {"status": 401}]},
            ):
                pass
            hook = str(receiver.make_url("/hook"))
            statuses = [
                await call("POST", "/watch", json={"taskId": "tk-hiapi-sec-1", "callbackUrl": hook}, headers=good),
                await call("POST", "/watch", json={"taskId": "tk-hiapi-sec-2", "callbackUrl": hook}),
                await call("POST", "/watch", json={"taskId": "tk-hiapi-sec-2", "callbackUrl": hook},
                           headers={"Authorization": f"Bearer {API_TOKENS[0]}x"}),
                await call("POST", "/watch", json={"taskId": "tk-hiapi-sec-2", "callbackUrl": hook},
                           headers={"Authorization": f"Bearer {UPSTREAM_KEY}"}),
                await call("POST", "/watch", json={"taskId": "tk-hiapi-sec-3",
                           "callbackUrl": f"http://u:{DB_PASSWORD}@127.0.0.1:9/h"}, headers=good),
                await call("GET", "/watches", headers=good),
            ]  # fmt: skip
            assert [201, 401, 401, 401, 422, 200] == statuses
            await asyncio.wait_for(arrived.wait(), 20)

            async def delivered() -> bool:
                await call("GET", "/watches?state=delivered", headers=good)
                return '"state":"delivered"' in answers[-1]

            assert await settle(delivered, True, timeout=10)
            metrics_status = await call("GET", "/metrics")
            assert 200 == metrics_status
    finally:
        await relay.stop()
        await receiver.close()
        await upstream.close()
    log = relay.log_path.read_text()

    assert '"event":"watch_registered"' in log  # it did log, at DEBUG
    assert '"auth_error"' in log
    assert [] == leaked(log, SECRETS)
    assert [] == leaked("\n".join(answers), SECRETS)


@pytest.mark.slow
async def test_a_bad_configuration_names_each_setting_but_never_its_value(tmp_path: Path) -> None:
    """A start with bad secrets exits 2 naming the settings; none of the values is printed."""
    bad_secret = "whsec_not-base64-Mv3Lp8Ss1Dz5!"
    bad_store = f"mysql://relay:{DB_PASSWORD}@127.0.0.1/relay"
    relay = relay_process(
        tmp_path,
        RELAY_SIGNING_SECRET=bad_secret,
        RELAY_STORE_URL=bad_store,
        RELAY_UPSTREAM_API_KEY=UPSTREAM_KEY,
        RELAY_API_TOKENS=",".join(API_TOKENS),
    )

    with pytest.raises(AssertionError, match="relay exited early"):
        await relay.start()
    assert relay.proc is not None
    exit_code = await relay.proc.wait()
    output = relay.log_path.read_text()

    assert 2 == exit_code
    assert "RELAY_SIGNING_SECRET" in output
    assert "RELAY_STORE_URL" in output
    assert [] == leaked(output, (*SECRETS, bad_secret, bad_secret[6:], bad_store))


@pytest.mark.slow
async def test_an_unreachable_database_fails_the_start_without_its_password(
    tmp_path: Path,
) -> None:
    """A PostgreSQL URL whose server is not there: the relay exits, and never prints the password."""
    relay = relay_process(
        tmp_path, RELAY_STORE_URL=f"postgresql://relay:{DB_PASSWORD}@127.0.0.1:{free_port()}/relay"
    )

    with pytest.raises(AssertionError, match="relay exited early"):
        await relay.start()
    assert relay.proc is not None
    exit_code = await relay.proc.wait()
    output = relay.log_path.read_text()

    assert 0 != exit_code
    assert [] == leaked(output, (DB_PASSWORD,))
