"""Shared fixtures: a fake clock, the fake task API and a receiver as real loopback servers, and a
relay app on a real SQLite file whose loops the test drives with `tick(now)`."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from relay.apiprocs import (
    CALL,
    EVENTS,
    ApiConfig,
    CallServer,
    RemoteService,
    create_api_process_app,
)
from relay.app import create_app
from relay.config import Secret, Settings
from relay.fake_upstream import FAKE_UPSTREAM_KEY, FakeUpstream, create_fake_upstream_app
from relay.frames import HEADER
from relay.service import LocalService
from relay.state import DELIVERER, POLLER, SERVICE, STORE
from relay.store.sqlite import SQLiteStore

T0 = 1_700_000_000.0
SIGNING_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
LOOPBACK_NETS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


class FakeClock:
    """Epoch seconds that move only when the test says so."""

    def __init__(self, start: float = T0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def upstream(clock: FakeClock) -> AsyncIterator[Upstream]:
    app = create_fake_upstream_app(api_key="test-key", clock=clock)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield Upstream(url=str(server.make_url("")).rstrip("/"), fake=app[FAKE_UPSTREAM_KEY])
    await server.close()


@dataclass
class Upstream:
    url: str
    fake: FakeUpstream

    async def control(self, method: str, path: str, body: Any = None) -> Any:
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, f"{self.url}/_fake{path}", json=body) as response,
        ):
            assert response.status < 300, await response.text()
            return await response.json()

    async def flip(self, task_id: str, status: str, **extra: Any) -> Any:
        return await self.control("PUT", f"/tasks/{task_id}", {"status": status, **extra})

    async def script(self, task_id: str, *responses: dict[str, Any]) -> Any:
        return await self.control("POST", f"/script/{task_id}", {"responses": list(responses)})

    def polls(self, task_id: str) -> int:
        return int(self.fake.stats()["perTask"].get(task_id, 0))


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Receiver:
    """A real callback receiver on loopback; answers each path from a script, else 204."""

    url: str = ""
    requests: list[Received] = field(default_factory=list)
    scripts: dict[str, list[int]] = field(default_factory=dict)
    delays: dict[str, float] = field(default_factory=dict)
    # A path with a gate answers only once the test opens it; `arrived` is set on its request.
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def at(self, path: str) -> str:
        return f"{self.url}{path}"

    def script(self, path: str, *statuses: int) -> None:
        self.scripts[path] = list(statuses)

    def bodies(self, path: str | None = None) -> list[Any]:
        return [r.json for r in self.requests if path is None or r.path == path]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(Received(request.path, dict(request.headers), body))
        self.arrived.set()
        gate = self.gates.get(request.path)
        if gate is not None:
            await gate.wait()
        delay = self.delays.get(request.path)
        if delay:
            await asyncio.sleep(delay)
        script = self.scripts.get(request.path)
        status = script.pop(0) if script else 204
        if 300 <= status < 400:
            raise web.HTTPFound(location=self.at("/elsewhere"))
        headers = {"Retry-After": "120"} if status == 429 else None
        return web.Response(status=status, headers=headers)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    recv = Receiver()
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", recv.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    recv.url = str(server.make_url("")).rstrip("/")
    yield recv
    await server.close()


def make_settings(tmp_path: Path, upstream_url: str, **overrides: Any) -> Settings:
    base = Settings(
        store_url=f"sqlite:///{tmp_path / 'relay.db'}",
        upstream_url=upstream_url,
        upstream_api_key=Secret("test-key"),
        callback_allow_nets=LOOPBACK_NETS,
        signing_keys=(Secret(SIGNING_SECRET),),
        poll_initial_s=2.0,
        poll_max_s=60.0,
        poll_factor=2.0,
        upstream_rps=1000.0,
        upstream_timeout_s=2.0,
        delivery_timeout_s=2.0,
        shutdown_timeout_s=2.0,
    )
    return dataclasses.replace(base, **overrides)


@dataclass
class Relay:
    """A relay app under test: an HTTP client for its API and its loops to tick by hand."""

    app: web.Application
    client: TestClient[web.Request, web.Application]
    clock: FakeClock
    registry: CollectorRegistry
    # Set when the client talks to an API process's app (RELAY_API_PROCESSES), not the relay's.
    front: RemoteService | None = None

    async def register(self, task_id: str, callback_url: str, **extra: Any) -> Any:
        response = await self.client.post(
            "/watch", json={"taskId": task_id, "callbackUrl": callback_url, **extra}
        )
        assert response.status in (200, 201), await response.text()
        return await response.json()

    async def watch(self, watch_id: str) -> Any:
        response = await self.client.get(f"/watch/{watch_id}")
        assert response.status == 200, await response.text()
        return await response.json()

    async def poll(self, advance: float = 0.0) -> int:
        """Move the clock, then run one poll tick at that instant."""
        return await self.app[POLLER].tick(self.clock.advance(advance))

    async def deliver(self, advance: float = 0.0) -> int:
        return await self.app[DELIVERER].tick(self.clock.advance(advance))

    async def step(self, advance: float = 0.0) -> tuple[int, int]:
        polled = await self.poll(advance)
        return polled, await self.deliver()

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        if self.front is not None:
            self.front.flush()  # the API process's counts reach the relay's registry now
        return self.registry.get_sample_value(name, labels or {})

    @property
    def store(self) -> SQLiteStore:
        store = self.app[STORE]
        assert isinstance(store, SQLiteStore)
        return store


RelayFactory = Callable[..., Awaitable[Relay]]


class LoopbackPipe:
    """An API process's pipe to the relay, in one event loop: each CALL frame is answered by the
    relay's CallServer, each EVENTS frame applied at once. The frames are the real ones."""

    def __init__(self, calls: CallServer) -> None:
        self._calls = calls
        self._answering: set[asyncio.Task[None]] = set()
        self.remote = RemoteService(self)

    def send(self, frame: bytes) -> None:
        kind, request_id, _, length = HEADER.unpack_from(frame)
        payload = frame[HEADER.size :]
        assert len(payload) == length
        if kind == EVENTS:
            self._calls.apply_events(payload)
        elif kind == CALL:
            task = asyncio.create_task(self._answer(request_id, payload))
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)

    async def _answer(self, request_id: int, payload: bytes) -> None:
        kind, answer = await self._calls.answer(payload)
        self.remote.answered(kind, request_id, answer)


@pytest.fixture
def front() -> str:
    """Which app the client talks to: the relay's own ("in-process"), or the one an API process
    serves ("api-process"), whose calls reach the relay's through a LoopbackPipe."""
    return "in-process"


@pytest.fixture
async def make_relay(
    tmp_path: Path, clock: FakeClock, upstream: Upstream, front: str
) -> AsyncIterator[RelayFactory]:
    clients: list[TestClient[web.Request, web.Application]] = []

    async def factory(**overrides: Any) -> Relay:
        settings = make_settings(tmp_path, upstream.url, **overrides)
        registry = CollectorRegistry()
        app = create_app(
            settings, clock=clock, rand=lambda: 0.5, registry=registry, run_loops=False
        )
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        if front == "in-process":
            return Relay(app=app, client=client, clock=clock, registry=registry)
        service = app[SERVICE]
        assert isinstance(service, LocalService)
        pipe = LoopbackPipe(CallServer(service))
        api_app = create_api_process_app(
            ApiConfig(
                host="127.0.0.1",
                port=0,
                api_tokens=tuple(t.value for t in settings.api_tokens),
                callback_allow_nets=tuple(str(n) for n in settings.callback_allow_nets),
                shutdown_timeout_s=settings.shutdown_timeout_s,
                event_loop="asyncio",
                log_level="INFO",
            ),
            pipe.remote,
        )
        api_client = TestClient(TestServer(api_app, host="127.0.0.1"))
        await api_client.start_server()
        clients.append(api_client)
        return Relay(app=app, client=api_client, clock=clock, registry=registry, front=pipe.remote)

    yield factory
    for client in clients:
        await client.close()


@pytest.fixture
async def relay(make_relay: RelayFactory) -> Relay:
    return await make_relay()


PG_DSN_ENV = "RELAY_TEST_POSTGRES_DSN"


@pytest.fixture
async def pg_schema() -> AsyncIterator[tuple[str, str]]:
    """A PostgreSQL DSN and a fresh schema name for relay processes; dropped afterwards."""
    dsn = os.environ.get(PG_DSN_ENV)
    if not dsn:
        pytest.skip(f"set {PG_DSN_ENV}=postgresql://postgres@127.0.0.1:5432/test to run this")
    schema = f"relay_proc_{os.getpid()}_{secrets.token_hex(3)}"
    yield dsn, schema
    for _ in range(50):  # the cluster may still be coming back
        try:
            conn = await asyncpg.connect(dsn)
            break
        except (OSError, asyncpg.PostgresError):
            await asyncio.sleep(0.2)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()
