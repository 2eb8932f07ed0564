"""`relay serve` with RELAY_API_PROCESSES=2: the API processes share the port and take
connections; registrations through them are the relay's (committed, polled, called back once);
their requests are counted in the relay's /metrics; one killed -9 is replaced and loses nothing
it acknowledged; SIGTERM takes them down with the relay."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import Counter
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from relay.apiprocs import CALL, CONFIG, LAST_KIND, MAX_PAYLOAD, READY, STOP, ApiConfig
from relay.fake_upstream import Schedule, create_fake_upstream_app
from relay.frames import FrameDecoder, encode
from tests.processes import (
    RelayProcess,
    alive,
    child_pids,
    children_started,
    free_port,
    loopback,
    settle,
)

pytestmark = pytest.mark.slow

WATCHES = 60
TOKEN = "tok-api-processes-5d1c0b7a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _established_on(port: int, pid: int) -> int:
    """How many established TCP connections to `port` process `pid` holds the server end of."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        if local_port == port and fields[3] == "01" and fields[9] in inodes:  # 01: ESTABLISHED
            count += 1
    return count


async def _metric(session: aiohttp.ClientSession, url: str, line_start: str) -> float:
    async with session.get(f"{url}/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith(line_start + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_api_processes_serve_the_port_and_lose_nothing_through_a_kill(
    tmp_path: Path,
) -> None:
    arrivals: Counter[str] = Counter()

    async def receive(request: web.Request) -> web.Response:
        arrivals[request.match_info["n"]] += 1
        return web.Response(status=204)

    schedule = Schedule(queued_s=0.5, handling_s=1.0, archiving_s=0.2)
    upstream = create_fake_upstream_app(schedule=schedule)
    async with loopback(upstream, receive) as net:
        relay = RelayProcess(
            env=net.relay_env(
                tmp_path,
                RELAY_API_PROCESSES="2",
                RELAY_API_TOKENS=TOKEN,
                RELAY_POLL_INITIAL_S="0.2",
                RELAY_POLL_MAX_S="0.2",
                RELAY_POLL_FACTOR="1",
                RELAY_UPSTREAM_RPS="2000",
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

                async def ready_children() -> float:
                    return await _metric(session, relay.url, "relay_api_processes")

                assert 2 == await settle(ready_children, 2, timeout=20)

                # 24 keep-alive connections at once: the kernel spreads them over the three
                # listeners, and each API process holds some of them.
                spread = aiohttp.TCPConnector(limit=24)
                async with aiohttp.ClientSession(connector=spread) as many:
                    hold = asyncio.Event()

                    async def held(n: int) -> None:
                        async with many.get(f"{relay.url}/healthz") as response:
                            assert 200 == response.status
                            await hold.wait()

                    holders = [asyncio.create_task(held(n)) for n in range(24)]
                    await asyncio.sleep(0)  # let every request go out

                    async def all_held() -> bool:  # 24, and the scrapes' keep-alive one
                        return sum(_established_on(relay.port, p) for p in [pid, *first]) >= 24

                    assert await settle(all_held, True, timeout=10)
                    serving = [p for p in first if _established_on(relay.port, p)]
                    hold.set()
                    await asyncio.gather(*holders)
                assert serving, "no API process took a connection"

                async def counted_201s() -> float:
                    return await _metric(
                        session,
                        relay.url,
                        'relay_http_requests_total{code="201",method="POST",route="/watch"}',
                    )

                created = []
                for n in range(WATCHES):
                    if n == WATCHES // 2:
                        # Counted before the kill: what reached the relay's registry stays.
                        assert n == await settle(counted_201s, n, timeout=10)
                        os.kill(first[0], signal.SIGKILL)

                        async def exits() -> float:
                            return await _metric(
                                session, relay.url, "relay_api_process_exits_total"
                            )

                        assert 1 == await settle(exits, 1, timeout=20)
                    payload = {"taskId": f"tk-hiapi-ap{n}", "callbackUrl": net.hook(n)}
                    # A new connection each: they land on every process still listening.
                    async with (
                        aiohttp.ClientSession(
                            connector=aiohttp.TCPConnector(force_close=True)
                        ) as once,
                        once.post(f"{relay.url}/watch", json=payload, headers=AUTH) as response,
                    ):
                        assert 201 == response.status, await response.text()
                        created.append((await response.json())["watchId"])
                again = {"taskId": "tk-hiapi-ap0", "callbackUrl": net.hook(0)}
                async with session.post(f"{relay.url}/watch", json=again, headers=AUTH) as r:
                    assert 200 == r.status
                    assert created[0] == (await r.json())["watchId"]
                async with session.post(f"{relay.url}/watch", json={}, headers=AUTH) as r:
                    assert 422 == r.status
                    assert "taskId" in (await r.json())["detail"]

                async def delivered() -> int:
                    return len(arrivals)

                assert WATCHES == await settle(delivered, WATCHES, timeout=30)
                assert 2 == await settle(ready_children, 2, timeout=20)

                # Every process's requests reach the relay's registry.
                assert WATCHES == await settle(counted_201s, WATCHES, timeout=10)
                registered = await _metric(session, relay.url, "relay_watches_registered_total")
                assert WATCHES == registered
            replacements = child_pids(pid)
            assert 2 == len(replacements)
            assert first[0] not in replacements
            assert 1 == max(arrivals.values())
            log = relay.log_path.read_text()
            assert '"event":"api_process_exited"' in log
            assert TOKEN not in log  # the API processes got it on their stdin, and never log it

            assert 0 == await relay.stop(signal.SIGTERM)
            for child in replacements:
                assert not alive(child), "an API process outlived the relay"
        finally:
            if relay.proc is not None and relay.proc.returncode is None:
                await relay.stop()


async def test_an_api_process_whose_relay_dies_during_its_drain_answers_503_at_once(
    tmp_path: Path,
) -> None:
    """The relay sent STOP, then died (kill -9 past its grace period): the request still waiting
    for its answer gets a 503 store-unavailable, not a connection cut after the drain timeout."""
    port = free_port()
    config = ApiConfig(
        host="127.0.0.1",
        port=port,
        api_tokens=(),
        callback_allow_nets=("127.0.0.0/8",),
        shutdown_timeout_s=60.0,
        event_loop="asyncio",
        log_level="INFO",
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "api-process",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert child.stdin is not None
    assert child.stdout is not None
    try:
        child.stdin.write(encode(CONFIG, 0, orjson.dumps(config)))
        decoder = FrameDecoder(last_kind=LAST_KIND, max_payload=MAX_PAYLOAD)

        async def next_frame() -> tuple[int, int, int, bytes]:
            while True:
                frames = decoder.feed(await child.stdout.read(65536))  # type: ignore[union-attr]
                if frames:
                    assert 1 == len(frames)
                    return frames[0]

        assert READY == (await asyncio.wait_for(next_frame(), 20))[0]
        async with aiohttp.ClientSession() as session:
            payload = {"taskId": "tk-hiapi-gone", "callbackUrl": "http://127.0.0.1:9/h"}
            posting = asyncio.ensure_future(
                session.post(f"http://127.0.0.1:{port}/watch", json=payload)
            )
            kind, _, _, call = await asyncio.wait_for(next_frame(), 20)
            assert CALL == kind
            assert "register" == orjson.loads(call)[1]  # after its deadline
            child.stdin.write(encode(STOP, 0))  # never answered: the relay dies now
            child.stdin.close()
            async with await asyncio.wait_for(posting, 20) as response:
                assert 503 == response.status
                assert "store-unavailable" in (await response.json())["type"]
        assert 0 == await asyncio.wait_for(child.wait(), 20)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
