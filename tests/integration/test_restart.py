"""kill -9 the relay mid-run, start it again on the same SQLite file: no watch is lost."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from relay import signing
from relay.fake_upstream import Schedule, create_fake_upstream_app
from tests.conftest import SIGNING_SECRET
from tests.processes import RelayProcess, loopback, settle

pytestmark = pytest.mark.slow

WATCHES = 60
KILL_AFTER_CALLBACKS = 20
RUN_TIMEOUT_S = 45.0


class CountingReceiver:
    """Verifies each callback and counts it by webhook-id; sets `target` when enough arrived."""

    def __init__(self, wanted: int) -> None:
        self.by_id: Counter[str] = Counter()
        self.types: dict[str, str] = {}
        self.wanted = wanted
        self.reached: dict[int, asyncio.Event] = {}

    def when(self, count: int) -> asyncio.Event:
        return self.reached.setdefault(count, asyncio.Event())

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        signing.verify(body, dict(request.headers), SIGNING_SECRET)
        msg_id = request.headers["webhook-id"]
        self.by_id[msg_id] += 1
        self.types[msg_id] = (await request.json())["type"]
        for count, event in self.reached.items():
            if len(self.by_id) >= count:
                event.set()
        return web.Response(status=204)


@pytest.fixture
async def servers() -> AsyncIterator[tuple[str, str, CountingReceiver]]:
    # Real time here: the relay is another process. Tasks end 0.3-1.2 s after their first poll.
    upstream_app = create_fake_upstream_app(
        api_key="k", schedule=Schedule(queued_s=0.3, handling_s=0.6, archiving_s=0.3)
    )
    receiver = CountingReceiver(WATCHES)
    async with loopback(upstream_app, receiver.handle) as net:
        yield net.upstream_url, str(net.receiver.make_url("")).rstrip("/"), receiver


async def test_kill_9_mid_run_loses_no_acknowledged_watch(
    tmp_path: Path, servers: tuple[str, str, CountingReceiver]
) -> None:
    """60 watches, SIGKILL after 20 callbacks, restart: all 60 delivered, duplicates same id."""
    upstream_url, callback_url, receiver = servers
    relay = RelayProcess(
        env={
            "RELAY_STORE_URL": f"sqlite:///{tmp_path / 'relay.db'}",
            "RELAY_UPSTREAM_URL": upstream_url,
            "RELAY_UPSTREAM_API_KEY": "k",
            "RELAY_SIGNING_SECRET": SIGNING_SECRET,
            "RELAY_CALLBACK_ALLOW_NETS": "127.0.0.0/8",
            "RELAY_POLL_INITIAL_S": "0.2",
            "RELAY_POLL_MAX_S": "0.5",
            "RELAY_UPSTREAM_TIMEOUT_S": "0.5",
            "RELAY_POLL_LEASE_S": "3",
            "RELAY_DELIVERY_TIMEOUT_S": "1",
            "RELAY_DELIVERY_LEASE_S": "3",
            "RELAY_DELIVERY_BACKOFF_S": "0.2",
        },
        log_path=tmp_path / "relay.log",
    )
    await relay.start()
    acknowledged: list[str] = []
    async with aiohttp.ClientSession() as session:
        for n in range(WATCHES):
            task_id = f"tk-hiapi-restart-{n}" if n % 5 else f"tk-hiapi-restart-fail-{n}"
            async with session.post(
                f"{relay.url}/watch",
                json={"taskId": task_id, "callbackUrl": f"{callback_url}/hook/{n}"},
            ) as response:
                assert 201 == response.status
                acknowledged.append((await response.json())["watchId"])

        await asyncio.wait_for(receiver.when(KILL_AFTER_CALLBACKS).wait(), RUN_TIMEOUT_S)
        relay.kill()
        assert -9 == await relay.stop()
        delivered_before_restart = len(receiver.by_id)
        await relay.start()
        try:
            await asyncio.wait_for(receiver.when(WATCHES).wait(), RUN_TIMEOUT_S)
        except TimeoutError:
            pytest.fail(f"{len(receiver.by_id)} of {WATCHES} delivered\n{relay.log_tail()}")

        assert {f"msg_{w}" for w in acknowledged} == set(receiver.by_id)
        duplicates = sum(count - 1 for count in receiver.by_id.values())
        # At-least-once: only callbacks in flight at the kill may repeat, each under its own id.
        assert duplicates <= WATCHES - delivered_before_restart
        assert 12 == sum(1 for t in receiver.types.values() if t == "task.fail")

        async def delivered_in_store() -> int:
            url = f"{relay.url}/watches?state=delivered&limit=1000"
            async with session.get(url) as response:
                return len((await response.json())["watches"])

        # The receiver sees the last callback a moment before the relay commits it.
        assert WATCHES == await settle(delivered_in_store, WATCHES)
    assert 0 == await relay.stop()
