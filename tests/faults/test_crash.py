"""kill -9 at random points over several rounds, restarting on the same SQLite file each time.

The kills land between a commit and its 201, mid-poll, mid-delivery, and (in the receiver's own
handler) between the receiver's 2xx and the relay's record of it. Every acknowledged watch must
get its callback; a repeat is allowed only under the same webhook-id (at-least-once)."""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from relay.fake_upstream import Schedule, create_fake_upstream_app
from tests.processes import RelayProcess, loopback, settle

pytestmark = pytest.mark.slow

ROUNDS = int(os.environ.get("RELAY_SOAK_ROUNDS", "4"))
WATCHES_PER_ROUND = 40
SEED = 20261128


async def test_random_kill_9_rounds_lose_no_acknowledged_watch(tmp_path: Path) -> None:
    """Several rounds of register-and-kill: every 201 is delivered; repeats share a webhook-id."""
    rng = random.Random(SEED)
    by_id: Counter[str] = Counter()
    by_pair: dict[str, set[str]] = {}
    relay: RelayProcess | None = None
    kill_in_receiver = asyncio.Event()

    async def receive(request: web.Request) -> web.StreamResponse:
        msg_id = request.headers["webhook-id"]
        body = await request.json()
        by_id[msg_id] += 1
        by_pair.setdefault(f"{body['data']['taskId']} {request.path}", set()).add(msg_id)
        response = web.Response(status=204)
        if kill_in_receiver.is_set() and relay is not None:
            kill_in_receiver.clear()
            await response.prepare(request)
            await response.write_eof()
            relay.kill()  # the receiver has answered 2xx; the relay may not have recorded it
        return response

    async with loopback(
        create_fake_upstream_app(schedule=Schedule(queued_s=0.2, handling_s=0.4, archiving_s=0.2)),
        receive,
    ) as net:
        relay = RelayProcess(
            env=net.relay_env(
                tmp_path,
                RELAY_POLL_INITIAL_S="0.2",
                RELAY_POLL_MAX_S="0.4",
                RELAY_UPSTREAM_TIMEOUT_S="0.5",
                RELAY_POLL_LEASE_S="3",
                RELAY_DELIVERY_TIMEOUT_S="0.5",
                RELAY_DELIVERY_LEASE_S="2",
                RELAY_DELIVERY_BACKOFF_S="0.2",
            ),
            log_path=tmp_path / "relay.log",
        )
        acknowledged: set[str] = set()
        unanswered: list[dict[str, str]] = []
        kills = 0
        try:
            async with aiohttp.ClientSession() as session:

                async def register(payload: dict[str, str]) -> None:
                    try:
                        async with session.post(f"{relay.url}/watch", json=payload) as response:
                            assert response.status in (200, 201), await response.text()
                            acknowledged.add((await response.json())["watchId"])
                    except aiohttp.ClientError:
                        unanswered.append(payload)  # the client retries it next round

                for round_no in range(ROUNDS):
                    await relay.start()
                    retries, unanswered[:] = list(unanswered), []
                    fresh = [
                        {
                            "taskId": f"tk-hiapi-crash-{round_no}-{n}",
                            "callbackUrl": net.hook(n % 3),
                        }
                        for n in range(WATCHES_PER_ROUND)
                    ]
                    batch = asyncio.gather(*(register(p) for p in retries + fresh))
                    if round_no % 2:
                        kill_in_receiver.set()  # this round dies inside a callback's 2xx
                        await batch
                        await asyncio.wait_for(relay.proc.wait(), 30)  # type: ignore[union-attr]
                    else:
                        await asyncio.sleep(rng.uniform(0.02, 1.0))  # a random point of the run
                        relay.kill()
                        await batch
                        await relay.stop()
                    kills += 1

                kill_in_receiver.clear()
                await relay.start()
                for payload in unanswered:
                    await register(payload)

                async def delivered() -> int:
                    return len({f"msg_{w}" for w in acknowledged} & set(by_id))

                assert len(acknowledged) == await settle(delivered, len(acknowledged), timeout=60)
            duplicates = sum(count - 1 for count in by_id.values())
            print(
                f"\ncrash: {kills} kills over {ROUNDS} rounds, {len(acknowledged)} acknowledged, "
                f"0 lost, {duplicates} repeated (same webhook-id)"
            )
            # Idempotent registration held through the crashes: one watch (one id) per pair.
            assert all(1 == len(ids) for ids in by_pair.values())
            assert 0 == await relay.stop()
        finally:
            if relay.proc is not None and relay.proc.returncode is None:
                await relay.stop()
