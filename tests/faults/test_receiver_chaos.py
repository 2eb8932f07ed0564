"""Receiver chaos: receivers that are down, slow, failing, gone, redirecting, flooding or silent.

The relay runs as a real `relay serve` process on SQLite; the fake task API and every receiver run
in the test process on their own loopback ports (one port is one receiver to the relay's
per-receiver bound), so what each receiver saw and when is measured where it happened.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from relay.fake_upstream import FAKE_UPSTREAM_KEY, FakeUpstream, Schedule, create_fake_upstream_app
from tests.processes import RelayProcess, free_port, settle

pytestmark = pytest.mark.slow

DELIVERY_TIMEOUT_S = 1.0
MAX_ATTEMPTS = 3
HUGE_BYTES = 50 * 1024 * 1024
CHUNK = b"x" * (64 * 1024)
SLOW_S = 0.5
PER_HOST = 8
# Each healthy receiver's burst stays under the per-receiver bound, so what the latency run
# measures is the sick neighbour, not a healthy receiver's own overflow (which waits 1 s).
HEALTHY_RECEIVERS = 16
HEALTHY_PER_RECEIVER = 6
SICK_WATCHES = 200
SICK_HOLD_TIMEOUT_S = 5.0


@dataclass
class Hook:
    """One receiver on its own port: a handler, and what it saw."""

    handle: Callable[[Hook, web.Request], Awaitable[web.StreamResponse]]
    server: TestServer | None = None
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    paths: list[str] = field(default_factory=list)
    arrivals: dict[str, float] = field(default_factory=dict)  # task id -> first 2xx answer time
    bytes_sent: int = 0

    async def serve(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.paths.append(request.path)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self.handle(self, request)
        finally:
            self.in_flight -= 1

    def url(self, path: str = "/hook") -> str:
        assert self.server is not None
        return str(self.server.make_url(path))


async def start_hooks(hooks: dict[str, Hook]) -> None:
    for hook in hooks.values():
        app = web.Application()
        app.router.add_route("POST", "/{tail:.*}", hook.serve)
        hook.server = TestServer(app, host="127.0.0.1")
        await hook.server.start_server()


async def close_hooks(hooks: dict[str, Hook]) -> None:
    for hook in hooks.values():
        if hook.server is not None:
            await hook.server.close()


# --- behaviours -----------------------------------------------------------------------------------


async def answer_204(hook: Hook, request: web.Request) -> web.StreamResponse:
    doc = await request.json()
    hook.arrivals.setdefault(doc["data"]["taskId"], time.time())
    return web.Response(status=204)


async def answer_slowly(hook: Hook, request: web.Request) -> web.StreamResponse:
    await request.read()
    await asyncio.sleep(SLOW_S)  # the receiver's own pace, inside the relay's timeout
    return web.Response(status=204)


async def answer_503_twice(hook: Hook, request: web.Request) -> web.StreamResponse:
    await request.read()
    return web.Response(status=503 if hook.requests <= 2 else 204)


async def answer_410(hook: Hook, request: web.Request) -> web.StreamResponse:
    await request.read()
    return web.Response(status=410)


async def answer_redirect(hook: Hook, request: web.Request) -> web.StreamResponse:
    await request.read()
    if request.path == "/elsewhere":
        return web.Response(status=204)
    raise web.HTTPFound(location=hook.url("/elsewhere"))


async def answer_50_mb(hook: Hook, request: web.Request) -> web.StreamResponse:
    await request.read()
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/octet-stream"})
    response.content_length = HUGE_BYTES
    await response.prepare(request)
    try:
        while hook.bytes_sent < HUGE_BYTES:
            await response.write(CHUNK)
            hook.bytes_sent += len(CHUNK)
    except ConnectionError:
        pass  # the relay hung up after the status line, as it should
    return response


def holding_open(release: asyncio.Event) -> Callable[[Hook, web.Request], Awaitable[web.Response]]:
    async def hold(hook: Hook, request: web.Request) -> web.Response:
        await request.read()
        await release.wait()  # never answers while the test runs
        return web.Response(status=204)

    return hold


# --- the rig --------------------------------------------------------------------------------------


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[str, FakeUpstream]]:
    # Tasks end at once unless pinned: a watch is delivering right after its first poll.
    app = create_fake_upstream_app(schedule=Schedule(queued_s=0, handling_s=0, archiving_s=0))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/"), app[FAKE_UPSTREAM_KEY]
    await server.close()


def relay_process(tmp_path: Path, upstream_url: str, **env: str) -> RelayProcess:
    return RelayProcess(
        env={
            "RELAY_STORE_URL": f"sqlite:///{tmp_path / 'relay.db'}",
            "RELAY_UPSTREAM_URL": upstream_url,
            "RELAY_CALLBACK_ALLOW_NETS": "127.0.0.0/8",
            "RELAY_POLL_INITIAL_S": "0.2",
            "RELAY_POLL_MAX_S": "0.2",
            "RELAY_UPSTREAM_RPS": "1000",
            "RELAY_UPSTREAM_TIMEOUT_S": "1",
            "RELAY_POLL_LEASE_S": "5",
            "RELAY_DELIVERY_BACKOFF_S": "0.2",
            "RELAY_DELIVERY_BACKOFF_MAX_S": "0.5",
            "RELAY_DELIVERY_PER_HOST": str(PER_HOST),
            **env,
        },
        log_path=tmp_path / "relay.log",
    )


async def register(
    session: aiohttp.ClientSession, relay: RelayProcess, task_id: str, url: str
) -> str:
    payload = {"taskId": task_id, "callbackUrl": url}
    async with session.post(f"{relay.url}/watch", json=payload) as response:
        assert 201 == response.status, await response.text()
        watch_id: str = (await response.json())["watchId"]
        return watch_id


async def view(session: aiohttp.ClientSession, relay: RelayProcess, watch_id: str) -> Any:
    async with session.get(f"{relay.url}/watch/{watch_id}") as response:
        return await response.json()


async def test_each_sick_receiver_ends_as_specified(
    tmp_path: Path, upstream: tuple[str, FakeUpstream]
) -> None:
    """Down, slow, 5xx twice, 410, redirect, 50 MB body, never answering: each ends its own way."""
    release = asyncio.Event()
    hooks = {
        "slow": Hook(answer_slowly),
        "503-twice": Hook(answer_503_twice),
        "410": Hook(answer_410),
        "redirect": Hook(answer_redirect),
        "50-mb-body": Hook(answer_50_mb),
        "never-answers": Hook(holding_open(release)),
    }
    relay = relay_process(
        tmp_path,
        upstream[0],
        RELAY_DELIVERY_TIMEOUT_S=str(DELIVERY_TIMEOUT_S),
        RELAY_DELIVERY_LEASE_S="3",
        RELAY_DELIVERY_MAX_ATTEMPTS=str(MAX_ATTEMPTS),
    )
    await start_hooks(hooks)
    try:
        await relay.start()
        async with aiohttp.ClientSession() as session:
            urls = {name: hook.url() for name, hook in hooks.items()}
            urls["down"] = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
            watch_ids = {
                name: await register(session, relay, f"tk-hiapi-sick-{name}", url)
                for name, url in urls.items()
            }
            started = time.monotonic()

            async def finals() -> dict[str, tuple[str, int]]:
                views = {n: await view(session, relay, w) for n, w in watch_ids.items()}
                return {n: (v["state"], v["deliveryAttempts"]) for n, v in views.items()}

            expected = {
                "down": ("failed", MAX_ATTEMPTS),
                "slow": ("delivered", 1),
                "503-twice": ("delivered", 3),
                "410": ("failed", 1),
                "redirect": ("failed", 1),
                "50-mb-body": ("delivered", 1),
                "never-answers": ("failed", MAX_ATTEMPTS),
            }
            got = await settle(finals, expected, timeout=20)
            took = time.monotonic() - started
            errors = {n: (await view(session, relay, w))["lastError"] for n, w in watch_ids.items()}
        print(
            f"\nreceiver chaos: all 7 ended in {took:.1f} s; 50 MB receiver sent"
            f" {hooks['50-mb-body'].bytes_sent / 2**20:.1f} MiB before the relay hung up;"
            f" last errors {errors}"
        )
        assert expected == got
        assert errors["down"].startswith("cannot connect")
        assert errors["down"].endswith(f"gave up after {MAX_ATTEMPTS} attempts")
        assert (
            f"no answer within {DELIVERY_TIMEOUT_S:g} s; gave up after {MAX_ATTEMPTS} attempts"
            == (errors["never-answers"])
        )
        assert ("HTTP 410", "HTTP 302: redirects are not followed") == (
            errors["410"],
            errors["redirect"],
        )
        assert (None, None, None) == (errors["slow"], errors["503-twice"], errors["50-mb-body"])
        assert ["/hook"] == hooks["redirect"].paths  # the redirect was not followed
        assert MAX_ATTEMPTS == hooks["never-answers"].requests
        # The relay reads the status and hangs up; it never drinks the 50 MB.
        assert hooks["50-mb-body"].bytes_sent < HUGE_BYTES // 4
    finally:
        release.set()
        await relay.stop()
        await close_hooks(hooks)


@dataclass(frozen=True)
class Latencies:
    p50: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Latencies:
        ordered = sorted(values)
        p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
        return cls(p50=statistics.median(ordered), p99=p99, max=ordered[-1])

    def __str__(self) -> str:
        return f"p50 {self.p50 * 1000:.0f} ms, p99 {self.p99 * 1000:.0f} ms, max {self.max * 1000:.0f} ms"


async def healthy_round(
    session: aiohttp.ClientSession,
    relay: RelayProcess,
    upstream: tuple[str, FakeUpstream],
    hooks: list[Hook],
    tag: str,
) -> list[float]:
    """Watch 96 running tasks on the healthy receivers, end them all at once: each's latency."""
    url, fake = upstream
    tasks = {
        f"tk-hiapi-{tag}-{r}-{n}": hook
        for r, hook in enumerate(hooks)
        for n in range(HEALTHY_PER_RECEIVER)
    }

    async def pin(task_id: str, status: str) -> None:
        async with session.put(f"{url}/_fake/tasks/{task_id}", json={"status": status}) as response:
            assert 200 == response.status

    await asyncio.gather(*(pin(t, "handling") for t in tasks))
    for task_id, hook in tasks.items():
        await register(session, relay, task_id, hook.url())

    async def all_polled() -> bool:
        return all(fake.stats()["perTask"].get(t, 0) >= 1 for t in tasks)

    assert await settle(all_polled, True)
    await asyncio.gather(*(pin(t, "success") for t in tasks))
    flips = fake.stats()["flips"]

    async def all_arrived() -> bool:
        return all(t in hook.arrivals for t, hook in tasks.items())

    assert await settle(all_arrived, True, timeout=15)
    return [hook.arrivals[t] - flips[t] for t, hook in tasks.items()]


async def test_a_receiver_holding_every_connection_does_not_slow_the_healthy_ones(
    tmp_path: Path, upstream: tuple[str, FakeUpstream]
) -> None:
    """96 callbacks to 16 healthy receivers, alone and beside one that never answers: as fast."""
    release = asyncio.Event()
    healthy = [Hook(answer_204) for _ in range(HEALTHY_RECEIVERS)]
    sick = Hook(holding_open(release))
    hooks = {f"healthy-{n}": hook for n, hook in enumerate(healthy)} | {"sick": sick}
    relay = relay_process(
        tmp_path,
        upstream[0],
        RELAY_DELIVERY_TIMEOUT_S=str(SICK_HOLD_TIMEOUT_S),
        RELAY_DELIVERY_LEASE_S=str(SICK_HOLD_TIMEOUT_S + 2),
    )
    await start_hooks(hooks)
    try:
        await relay.start()
        async with aiohttp.ClientSession() as session:
            alone = Latencies.of(await healthy_round(session, relay, upstream, healthy, "alone"))

            await asyncio.gather(
                *(
                    register(session, relay, f"tk-hiapi-sick-{n}", sick.url())
                    for n in range(SICK_WATCHES)
                )
            )

            async def sick_in_flight() -> int:
                return sick.in_flight

            # The sick receiver holds its whole share of the relay before the healthy round.
            assert PER_HOST == await settle(sick_in_flight, PER_HOST)
            beside = Latencies.of(await healthy_round(session, relay, upstream, healthy, "beside"))
            held = sick.in_flight
            async with session.get(f"{relay.url}/metrics") as response:
                deferred = [
                    line
                    for line in (await response.text()).splitlines()
                    if line.startswith("relay_callbacks_deferred_total{")
                ]
        print(
            f"\nhealthy delivery latency (flip at the task API -> 2xx at the receiver),"
            f" {HEALTHY_RECEIVERS * HEALTHY_PER_RECEIVER} callbacks each run:"
            f"\n  alone:                      {alone}"
            f"\n  beside a receiver holding {held} connections ({SICK_WATCHES} callbacks): {beside}"
            f"\n  sick receiver's most connections at once: {sick.max_in_flight}; {deferred}"
        )
        assert (PER_HOST, PER_HOST) == (held, sick.max_in_flight)
        assert beside.max <= alone.p99 + 1.0
    finally:
        release.set()
        await relay.stop()
        await close_hooks(hooks)
