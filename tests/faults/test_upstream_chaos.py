"""Upstream chaos: a task API that fails a third of its answers, or rejects the key for a while.

The relay runs as a real `relay serve` process on SQLite; the fake task API and the receiver run in
the test process, so every request the relay sends is counted where it lands.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from relay import signing
from relay.fake_upstream import (
    CHAOS_KINDS,
    FAKE_UPSTREAM_KEY,
    FakeUpstream,
    Schedule,
    create_fake_upstream_app,
)
from tests.conftest import SIGNING_SECRET
from tests.processes import RelayProcess, loopback, settle

pytestmark = pytest.mark.slow

WATCHES = 200
RPS = 150
CHAOS_RATE = 0.3
SEED = 7
POLL_INITIAL_S = 0.2
UPSTREAM_TIMEOUT_S = 0.5
UPSTREAM_CONCURRENCY = 32
# Tasks end 3 s after their first poll.
SCHEDULE = Schedule(queued_s=1.0, handling_s=1.5, archiving_s=0.5)
OUTAGE_S = 4.0
STORM_S = 3.0
RUN_TIMEOUT_S = 40.0


@dataclass
class Callback:
    webhook_id: str
    type: str
    task_status: str
    true_status: str | None
    latency_s: float | None


@dataclass
class Recorder:
    """The receiver: verifies each callback and notes what the fake says of its task right then."""

    fake: FakeUpstream
    by_path: dict[str, list[Callback]] = field(default_factory=dict)
    all_in: asyncio.Event = field(default_factory=asyncio.Event)
    wanted: int = WATCHES

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        signing.verify(body, dict(request.headers), SIGNING_SECRET)
        doc = await request.json()
        task_id = doc["data"]["taskId"]
        ended = self.fake.ended_at(task_id)
        self.by_path.setdefault(request.path, []).append(
            Callback(
                webhook_id=request.headers["webhook-id"],
                type=doc["type"],
                task_status=doc["data"]["task"]["status"],
                true_status=self.fake.status_of(task_id),
                latency_s=None if ended is None else time.time() - ended,
            )
        )
        if len(self.by_path) >= self.wanted:
            self.all_in.set()
        return web.Response(status=204)


@dataclass
class Rig:
    upstream_url: str
    callback_url: str
    fake: FakeUpstream
    recorder: Recorder


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    app = create_fake_upstream_app(api_key="k", schedule=SCHEDULE)
    fake = app[FAKE_UPSTREAM_KEY]
    recorder = Recorder(fake)
    async with loopback(app, recorder.handle) as net:
        yield Rig(
            upstream_url=net.upstream_url,
            callback_url=str(net.receiver.make_url("")).rstrip("/"),
            fake=fake,
            recorder=recorder,
        )


def relay_process(tmp_path: Path, upstream_url: str) -> RelayProcess:
    return RelayProcess(
        env={
            "RELAY_STORE_URL": f"sqlite:///{tmp_path / 'relay.db'}",
            "RELAY_UPSTREAM_URL": upstream_url,
            "RELAY_UPSTREAM_API_KEY": "k",
            "RELAY_SIGNING_SECRET": SIGNING_SECRET,
            "RELAY_CALLBACK_ALLOW_NETS": "127.0.0.0/8",
            "RELAY_POLL_INITIAL_S": str(POLL_INITIAL_S),
            "RELAY_POLL_MAX_S": "0.3",
            "RELAY_ERROR_BACKOFF_MAX_S": "2",
            "RELAY_RETRY_AFTER_MAX_S": "2",
            "RELAY_UPSTREAM_RPS": str(RPS),
            "RELAY_UPSTREAM_CONCURRENCY": str(UPSTREAM_CONCURRENCY),
            "RELAY_UPSTREAM_TIMEOUT_S": str(UPSTREAM_TIMEOUT_S),
            "RELAY_POLL_LEASE_S": "3",
            "RELAY_DELIVERY_TIMEOUT_S": "2",
            "RELAY_DELIVERY_LEASE_S": "4",
            "RELAY_DELIVERY_BACKOFF_S": "0.2",
        },
        log_path=tmp_path / "relay.log",
    )


def task_id_for(n: int) -> str:
    return f"tk-hiapi-chaos-fail-{n}" if n % 5 == 0 else f"tk-hiapi-chaos-{n}"


async def register_all(session: aiohttp.ClientSession, relay: RelayProcess, rig: Rig) -> list[str]:
    watch_ids = []
    for n in range(WATCHES):
        payload = {"taskId": task_id_for(n), "callbackUrl": f"{rig.callback_url}/hook/{n}"}
        async with session.post(f"{relay.url}/watch", json=payload) as response:
            assert 201 == response.status, await response.text()
            watch_ids.append((await response.json())["watchId"])
    return watch_ids


async def wait_for_all(relay: RelayProcess, rig: Rig) -> None:
    try:
        await asyncio.wait_for(rig.recorder.all_in.wait(), RUN_TIMEOUT_S)
    except TimeoutError:
        got = len(rig.recorder.by_path)
        pytest.fail(f"{got} of {WATCHES} watches called back\n{relay.log_tail()}")


def check_every_watch_ended_right(rig: Rig, watch_ids: list[str]) -> tuple[int, float]:
    """Every watch: one webhook-id, the right type, a task that had truly ended; (dups, max s)."""
    wrong = []
    for n, watch_id in enumerate(watch_ids):
        calls = rig.recorder.by_path.get(f"/hook/{n}", [])
        expected_type = "task.fail" if n % 5 == 0 else "task.success"
        expected_status = "fail" if n % 5 == 0 else "success"
        seen = {(c.webhook_id, c.type, c.task_status, c.true_status) for c in calls}
        if seen != {(f"msg_{watch_id}", expected_type, expected_status, expected_status)}:
            wrong.append((n, seen))
    assert [] == wrong
    duplicates = sum(len(calls) - 1 for calls in rig.recorder.by_path.values())
    latencies = [c.latency_s for calls in rig.recorder.by_path.values() for c in calls]
    assert None not in latencies
    return duplicates, max(c for c in latencies if c is not None)


async def delivered_in_store(session: aiohttp.ClientSession, relay: RelayProcess) -> int:
    async with session.get(f"{relay.url}/watches?state=delivered&limit=1000") as response:
        return len((await response.json())["watches"])


async def metric(
    session: aiohttp.ClientSession, relay: RelayProcess, name: str
) -> dict[str, float]:
    """Every sample of one metric family from /metrics, by its label text."""
    async with session.get(f"{relay.url}/metrics") as response:
        text = await response.text()
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
    return {labels or "": float(value) for labels, value in pattern.findall(text)}


async def control(session: aiohttp.ClientSession, rig: Rig, path: str, body: Any) -> Any:
    async with session.post(f"{rig.upstream_url}/_fake{path}", json=body) as response:
        assert 200 == response.status, await response.text()
        return await response.json()


@pytest.mark.parametrize(
    "kinds",
    [
        pytest.param(CHAOS_KINDS, id="all-12-kinds"),
        # A 401 pauses all polling for a moment; without it the budget is the only brake.
        pytest.param(tuple(k for k in CHAOS_KINDS if k != "401"), id="saturated-without-401"),
    ],
)
async def test_a_third_of_upstream_answers_failing_every_way_still_ends_every_watch_right(
    tmp_path: Path, rig: Rig, kinds: tuple[str, ...]
) -> None:
    """200 watches, 30 % of GETs faulty: every watch ends right; never over 1.1 x RPS."""
    relay = relay_process(tmp_path, rig.upstream_url)
    await relay.start()
    started = time.monotonic()
    try:
        async with aiohttp.ClientSession() as session:
            config = {
                "rate": CHAOS_RATE,
                "seed": SEED,
                "kinds": list(kinds),
                "hangS": UPSTREAM_TIMEOUT_S * 3,
            }
            await control(session, rig, "/chaos", config)
            watch_ids = await register_all(session, relay, rig)
            await wait_for_all(relay, rig)
            took = time.monotonic() - started
            async with session.get(f"{rig.upstream_url}/_fake/chaos") as response:
                injected = (await response.json())["injected"]
            stats = rig.fake.stats()
            outcomes = await metric(session, relay, "relay_upstream_polls_total")
            assert WATCHES == await settle(lambda: delivered_in_store(session, relay), WATCHES)
        duplicates, max_latency = check_every_watch_ended_right(rig, watch_ids)
        print(
            f"\nupstream chaos ({len(kinds)} kinds): {WATCHES} watches, {stats['requests']} GETs"
            f" in {took:.1f} s, {sum(injected.values())} faults {injected},"
            f" maxRps1s {stats['maxRps1s']} (budget {RPS}), lost 0, duplicated {duplicates},"
            f" max end->callback {max_latency:.2f} s, relay poll outcomes {outcomes}"
        )
        assert set(kinds) == set(injected)
        assert 0 == duplicates
        assert stats["maxRps1s"] <= 1.1 * RPS + 1
        assert 0 == await relay.stop()
    finally:
        await relay.stop()  # a no-op after a clean stop; never leaves a relay behind


async def test_an_upstream_dropping_every_connection_sees_no_more_than_the_budget(
    tmp_path: Path, rig: Rig
) -> None:
    """Every GET reset for 3 s: immediate retries wait for tokens too; then every watch ends."""
    relay = relay_process(tmp_path, rig.upstream_url)
    await relay.start()
    try:
        async with aiohttp.ClientSession() as session:
            await control(session, rig, "/chaos", {"rate": 1, "seed": SEED, "kinds": ["reset"]})
            watch_ids = await register_all(session, relay, rig)
            await asyncio.sleep(STORM_S)  # the storm's length; nothing waits on a race here
            await control(session, rig, "/chaos", {"rate": 0})
            storm = rig.fake.stats()
            failed_polls = (await metric(session, relay, "relay_upstream_polls_total")).get(
                '{outcome="network_error"}'
            )
            await wait_for_all(relay, rig)
            assert WATCHES == await settle(lambda: delivered_in_store(session, relay), WATCHES)
        duplicates, max_latency = check_every_watch_ended_right(rig, watch_ids)
        print(
            f"\nreset storm: {storm['requests']} GETs, all reset, for {failed_polls} failed polls;"
            f" maxRps1s {storm['maxRps1s']} (budget {RPS}); then {WATCHES} watches ended right,"
            f" lost 0, duplicated {duplicates}, max end->callback {max_latency:.2f} s"
        )
        assert 0 == duplicates
        assert storm["maxRps1s"] <= 1.1 * RPS + 1
        assert 0 == await relay.stop()
    finally:
        await relay.stop()  # a no-op after a clean stop; never leaves a relay behind


async def test_a_revoked_key_pauses_polling_raises_the_alert_metric_and_loses_nothing(
    tmp_path: Path, rig: Rig
) -> None:
    """401 for every task for 4 s: a few probes, not thousands; the gauge is 1, then 0; all end."""
    relay = relay_process(tmp_path, rig.upstream_url)
    await relay.start()
    try:
        async with aiohttp.ClientSession() as session:
            watch_ids = await register_all(session, relay, rig)
            await control(session, rig, "/fail-all", {"status": 401})
            before = rig.fake.stats()["requests"]
            outage_started = time.monotonic()

            async def auth_failing() -> float:
                return (await metric(session, relay, "relay_upstream_auth_failing"))[""]

            during = await settle(auth_failing, 1.0, timeout=OUTAGE_S)
            await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - outage_started)))
            requests_in_outage = rig.fake.stats()["requests"] - before
            await control(session, rig, "/fail-all", {"status": None})
            after = await settle(auth_failing, 0.0, timeout=10)
            await wait_for_all(relay, rig)
            auth_polls = (await metric(session, relay, "relay_upstream_polls_total")).get(
                '{outcome="auth_error"}'
            )
            assert WATCHES == await settle(lambda: delivered_in_store(session, relay), WATCHES)
        duplicates, max_latency = check_every_watch_ended_right(rig, watch_ids)
        unpaused = WATCHES * OUTAGE_S / POLL_INITIAL_S
        print(
            f"\nrevoked key: {OUTAGE_S:g} s of 401 for {WATCHES} watches: {requests_in_outage}"
            f" GETs (unpaused at least {unpaused:.0f}), auth_error polls {auth_polls},"
            f" auth_failing {during:g} during / {after:g} after, lost 0,"
            f" duplicated {duplicates}, max end->callback {max_latency:.2f} s"
        )
        assert (1.0, 0.0, 0) == (during, after, duplicates)
        # The probes at the doubling pauses, plus what was in flight when the key was revoked.
        assert requests_in_outage <= UPSTREAM_CONCURRENCY + 20
        assert 0 == await relay.stop()
    finally:
        await relay.stop()  # a no-op after a clean stop; never leaves a relay behind
