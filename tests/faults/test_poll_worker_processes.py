"""`relay serve` with RELAY_POLL_PROCESSES=2: watches end in callbacks as without workers; a
worker killed -9 under load loses no watch; SIGTERM takes the workers down with the relay."""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from relay.fake_upstream import Schedule, create_fake_upstream_app
from tests.processes import RelayProcess, alive, child_pids, children_started, loopback, settle

pytestmark = pytest.mark.slow

WATCHES = 60
API_KEY = "sk-poll-workers-b64c1f0e"


async def test_a_relay_with_poll_workers_delivers_every_watch_through_a_worker_kill(
    tmp_path: Path,
) -> None:
    arrivals: Counter[str] = Counter()

    async def receive(request: web.Request) -> web.Response:
        arrivals[request.match_info["n"]] += 1
        return web.Response(status=204)

    schedule = Schedule(queued_s=0.5, handling_s=1.0, archiving_s=0.2)
    upstream = create_fake_upstream_app(schedule=schedule, api_key=API_KEY)
    async with loopback(upstream, receive) as net:
        relay = RelayProcess(
            env=net.relay_env(
                tmp_path,
                RELAY_POLL_PROCESSES="2",
                RELAY_POLL_INITIAL_S="0.2",
                RELAY_POLL_MAX_S="0.2",
                RELAY_POLL_FACTOR="1",
                RELAY_ERROR_BACKOFF_MAX_S="0.5",
                RELAY_UPSTREAM_RPS="2000",
                RELAY_UPSTREAM_API_KEY=API_KEY,
            ),
            log_path=tmp_path / "relay.log",
        )
        try:
            await relay.start()
            assert relay.proc is not None
            pid = relay.proc.pid
            first = await children_started(pid, 2)
            assert 2 == len(first)
            async with aiohttp.ClientSession() as session:
                for n in range(WATCHES):
                    payload = {"taskId": f"tk-hiapi-w{n}", "callbackUrl": net.hook(n)}
                    async with session.post(f"{relay.url}/watch", json=payload) as response:
                        assert 201 == response.status
                os.kill(first[0], signal.SIGKILL)  # polls are in flight: the tasks are running

                async def delivered() -> int:
                    return len(arrivals)

                assert WATCHES == await settle(delivered, WATCHES, timeout=30)
                async with session.get(f"{relay.url}/metrics") as response:
                    metrics = await response.text()
            assert "relay_poll_worker_exits_total 1.0" in metrics
            assert "relay_poll_workers 2.0" in metrics
            replacements = child_pids(pid)
            assert len(replacements) == 2
            assert first[0] not in replacements
            assert max(arrivals.values()) == 1
            log = relay.log_path.read_text()
            assert '"event":"poll_worker_exited"' in log
            assert API_KEY not in log  # the workers got it on their stdin, and never logged it

            assert 0 == await relay.stop(signal.SIGTERM)
            for worker in replacements:
                assert not alive(worker), "a poll worker outlived the relay"
        finally:
            if relay.proc is not None and relay.proc.returncode is None:
                await relay.stop()
