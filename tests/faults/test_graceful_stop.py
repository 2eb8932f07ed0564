"""SIGTERM: the relay stops taking work, finishes or hands back what is in flight, exits 0."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from relay.fake_upstream import Schedule, create_fake_upstream_app
from tests.processes import RelayProcess, loopback, settle

pytestmark = pytest.mark.slow

WATCHES = 20
SHUTDOWN_TIMEOUT_S = 1.0


async def test_sigterm_mid_delivery_exits_0_within_the_bound_and_loses_nothing(
    tmp_path: Path,
) -> None:
    """20 callbacks hang at the receiver; SIGTERM exits 0 after ~1 s; a restart delivers all 20."""
    hang = asyncio.Event()
    arrivals: Counter[str] = Counter()
    held = 0

    async def receive(request: web.Request) -> web.Response:
        nonlocal held
        arrivals[request.headers["webhook-id"]] += 1
        if not hang.is_set():
            held += 1
            await asyncio.sleep(30)  # far past the relay's shutdown bound
        return web.Response(status=204)

    async with loopback(
        create_fake_upstream_app(schedule=Schedule(queued_s=0, handling_s=0, archiving_s=0)),
        receive,
    ) as net:
        relay = RelayProcess(
            env=net.relay_env(
                tmp_path,
                RELAY_DELIVERY_TIMEOUT_S="60",
                RELAY_DELIVERY_LEASE_S="120",
                RELAY_DELIVERY_PER_HOST="32",
                RELAY_SHUTDOWN_TIMEOUT_S=str(SHUTDOWN_TIMEOUT_S),
            ),
            log_path=tmp_path / "relay.log",
        )
        try:
            await relay.start()
            async with aiohttp.ClientSession() as session:
                for n in range(WATCHES):
                    payload = {
                        "taskId": f"tk-hiapi-stop-{n}",
                        "callbackUrl": net.hook(n),
                    }
                    async with session.post(f"{relay.url}/watch", json=payload) as response:
                        assert 201 == response.status

                async def arrived() -> int:
                    return len(arrivals)

                assert WATCHES == await settle(arrived, WATCHES, timeout=20)
                started = time.monotonic()
                assert 0 == await relay.stop(signal.SIGTERM)
                stop_took = time.monotonic() - started
                log = relay.log_path.read_text()
                assert '"event":"work_handed_back"' in log

                # Restarted, with a healthy receiver: the handed-back callbacks go at once, not after
                # their 120 s lease.
                hang.set()
                await relay.start()

                async def redelivered() -> int:
                    return sum(1 for count in arrivals.values() if count >= 2)

                assert WATCHES == await settle(redelivered, WATCHES, timeout=20)
            print(f"\ngraceful stop: {held} held, exit 0 after {stop_took:.2f} s, all redelivered")
            # Shutdown bound plus aiohttp's own teardown; far below the 30 s the receiver holds.
            assert stop_took < SHUTDOWN_TIMEOUT_S * 2 + 3
            assert 0 == await relay.stop()
        finally:
            if relay.proc is not None and relay.proc.returncode is None:
                await relay.stop()
