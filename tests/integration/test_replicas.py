"""Three `relay serve` replicas on one PostgreSQL schema, one killed with SIGKILL mid-run."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from relay import signing
from relay.fake_upstream import FAKE_UPSTREAM_KEY, Schedule, create_fake_upstream_app
from tests.conftest import SIGNING_SECRET
from tests.processes import RelayProcess, settle

pytestmark = pytest.mark.slow

TASKS = 1000
WATCHES_PER_TASK = 2  # coalescing must hold across replicas too
WATCHES = TASKS * WATCHES_PER_TASK
RPS_BUDGET = 1200.0
LEASE_S = 3.0
RUN_TIMEOUT_S = 90.0


class Receiver:
    def __init__(self) -> None:
        self.by_id: Counter[str] = Counter()
        self.arrived = asyncio.Event()
        self.wanted = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        signing.verify(body, dict(request.headers), SIGNING_SECRET)
        self.by_id[request.headers["webhook-id"]] += 1
        if self.wanted and len(self.by_id) >= self.wanted:
            self.arrived.set()
        return web.Response(status=204)

    async def until(self, count: int, timeout: float) -> None:
        self.wanted = count
        self.arrived.clear()
        if len(self.by_id) < count:
            await asyncio.wait_for(self.arrived.wait(), timeout)


async def test_three_replicas_one_killed_deliver_every_watch_without_overlapping_polls(
    tmp_path: Path, pg_schema: tuple[str, str]
) -> None:
    """2,000 watches on 1,000 tasks over 3 replicas; SIGKILL one: all delivered, no overlap."""
    dsn, schema = pg_schema
    upstream_app = create_fake_upstream_app(
        api_key="k", schedule=Schedule(queued_s=0.3, handling_s=0.6, archiving_s=0.3)
    )
    upstream = TestServer(upstream_app, host="127.0.0.1")
    receiver = Receiver()
    receiver_app = web.Application()
    receiver_app.router.add_post("/hook/{n}", receiver.handle)
    callback = TestServer(receiver_app, host="127.0.0.1")
    await upstream.start_server()
    await callback.start_server()
    env = {
        "RELAY_STORE_URL": dsn,
        "RELAY_POSTGRES_SCHEMA": schema,
        "RELAY_UPSTREAM_URL": str(upstream.make_url("")).rstrip("/"),
        "RELAY_UPSTREAM_API_KEY": "k",
        "RELAY_SIGNING_SECRET": SIGNING_SECRET,
        "RELAY_CALLBACK_ALLOW_NETS": "127.0.0.0/8",
        "RELAY_UPSTREAM_RPS": str(RPS_BUDGET),
        "RELAY_POLL_INITIAL_S": "0.3",
        "RELAY_POLL_MAX_S": "0.6",
        "RELAY_UPSTREAM_TIMEOUT_S": "0.5",
        "RELAY_POLL_LEASE_S": str(LEASE_S),
        "RELAY_DELIVERY_TIMEOUT_S": "1",
        "RELAY_DELIVERY_LEASE_S": str(LEASE_S),
        "RELAY_DELIVERY_BACKOFF_S": "0.2",
        "RELAY_LOG_LEVEL": "WARNING",
    }
    replicas = [RelayProcess(env=env, log_path=tmp_path / f"relay-{n}.log") for n in range(3)]
    try:
        # The first replica migrates; the others start together on the migrated schema.
        await replicas[0].start()
        await asyncio.gather(*(r.start() for r in replicas[1:]))
        acknowledged: list[str] = []
        upstream_url = env["RELAY_UPSTREAM_URL"]
        callback_url = str(callback.make_url("")).rstrip("/")
        async with aiohttp.ClientSession() as session:

            async def register(n: int) -> None:
                replica = replicas[n % 3]
                payload = {
                    "taskId": f"tk-hiapi-replica-{n % TASKS}",
                    "callbackUrl": f"{callback_url}/hook/{n // TASKS}",
                }
                async with session.post(f"{replica.url}/watch", json=payload) as response:
                    assert 201 == response.status, await response.text()
                    acknowledged.append((await response.json())["watchId"])

            async def flip(tasks: range, status: str) -> None:
                for start in range(tasks.start, tasks.stop, 50):
                    await asyncio.gather(
                        *(
                            session.put(
                                f"{upstream_url}/_fake/tasks/tk-hiapi-replica-{t}",
                                json={"status": status},
                            )
                            for t in range(start, min(start + 50, tasks.stop))
                        )
                    )

            # Every task stays in handling until the test ends it, a third at a time.
            await flip(range(TASKS), "handling")
            for start in range(0, WATCHES, 50):
                await asyncio.gather(*(register(n) for n in range(start, start + 50)))
            third = TASKS // 3
            await flip(range(third), "success")
            await receiver.until(third * WATCHES_PER_TASK, RUN_TIMEOUT_S)
            await flip(range(third, 2 * third), "success")
            # Kill while the second third's callbacks are flowing and every stream is being polled.
            await receiver.until(third * WATCHES_PER_TASK + 100, RUN_TIMEOUT_S)
            victim = replicas[1]
            victim.kill()
            assert -9 == await victim.stop()
            killed_at = time.monotonic()
            delivered_at_kill = len(receiver.by_id)
            await flip(range(2 * third, TASKS), "success")
            try:
                await receiver.until(WATCHES, RUN_TIMEOUT_S)
            except TimeoutError:
                pytest.fail(
                    f"{len(receiver.by_id)} of {WATCHES} delivered\n{replicas[0].log_tail()}"
                )
            finished_after_kill = time.monotonic() - killed_at

            survivor = replicas[0]

            async def delivered_in_store() -> int:
                url = f"{survivor.url}/watches?state=delivered&limit=1000"
                total, cursor = 0, None
                while True:
                    page_url = url + (f"&cursor={cursor}" if cursor else "")
                    async with session.get(page_url) as response:
                        page = await response.json()
                    total += len(page["watches"])
                    cursor = page["nextCursor"]
                    if cursor is None:
                        return total

            assert WATCHES == await settle(delivered_in_store, WATCHES)

        stats = upstream_app[FAKE_UPSTREAM_KEY].stats()
        duplicates = sum(count - 1 for count in receiver.by_id.values())
        print(
            f"\nreplicas: {WATCHES} watches on {TASKS} tasks, killed one after "
            f"{delivered_at_kill} callbacks; all delivered {finished_after_kill:.1f} s after the "
            f"kill; duplicates {duplicates}; upstream polls {stats['requests']}, overlaps "
            f"{stats['overlaps']}, max polls in one second {stats['maxRps1s']}"
        )
        assert {f"msg_{w}" for w in acknowledged} == set(receiver.by_id)
        assert 0 == stats["overlaps"]  # no task was ever polled by two replicas at once
        assert 1 == max(stats["maxConcurrentPerTask"].values())
        # At-least-once: only the dead replica's callbacks in flight can repeat (<= its concurrency).
        assert duplicates <= 32
        # The whole deployment stays within its budget (burst included) as the fake measured it.
        assert stats["maxRps1s"] <= RPS_BUDGET * 1.1 + 3
        assert 0 == await survivor.stop()
    finally:
        for replica in replicas:
            if replica.proc is not None and replica.proc.returncode is None:
                await replica.stop()
        await upstream.close()
        await callback.close()
