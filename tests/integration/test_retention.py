"""The retention sweep: finished watches are deleted once RELAY_WATCH_RETENTION_S has passed since
they last changed; active ones never. The clock is the test's; the sweep is run by hand."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from relay import app as app_module
from relay.app import purge_finished
from relay.fake_upstream import create_fake_upstream_app
from tests.conftest import SIGNING_SECRET, Receiver, Relay, RelayFactory, Upstream
from tests.processes import RelayProcess, loopback, settle

HOUR = 3600.0


async def test_finished_watches_go_once_older_than_the_retention_and_active_ones_stay(
    make_relay: RelayFactory, upstream: Upstream, receiver: Receiver
) -> None:
    relay = await make_relay(watch_retention_s=HOUR)
    hook = receiver.at("/hook")
    cancelled = (await relay.register("tk-hiapi-ret-1", hook))["watchId"]
    delivered = (await relay.register("tk-hiapi-ret-2", hook))["watchId"]
    watching = (await relay.register("tk-hiapi-ret-3", hook))["watchId"]
    assert 204 == (await relay.client.delete(f"/watch/{cancelled}")).status  # at T0
    await upstream.flip("tk-hiapi-ret-2", "success")
    await relay.step(advance=60)  # seen and delivered at T0 + 60
    assert "delivered" == (await relay.watch(delivered))["state"]

    relay.clock.advance(HOUR - 30)  # T0 + 3630: the cancelled watch is past the hour
    assert 1 == await purge_finished(relay.app)
    assert 404 == (await relay.client.get(f"/watch/{cancelled}")).status
    assert "delivered" == (await relay.watch(delivered))["state"]
    assert 404 == (await relay.client.post(f"/watch/{cancelled}/redeliver")).status

    relay.clock.advance(60)  # T0 + 3690: the delivered one too
    assert 1 == await purge_finished(relay.app)
    assert 404 == (await relay.client.get(f"/watch/{delivered}")).status
    assert "watching" == (await relay.watch(watching))["state"]
    assert 0 == await purge_finished(relay.app)
    assert 2 == relay.sample("relay_watches_purged_total")
    listed = await (await relay.client.get("/watches")).json()
    assert [watching] == [w["watchId"] for w in listed["watches"]]


async def relay_with_old_cancelled_watches(
    make_relay: RelayFactory, receiver: Receiver, count: int
) -> Relay:
    """A relay keeping finished watches an hour, with `count` watches cancelled two hours ago."""
    relay = await make_relay(watch_retention_s=HOUR)
    for n in range(count):
        watch = await relay.register(f"tk-hiapi-ret-{n}", receiver.at("/hook"))
        assert 204 == (await relay.client.delete(f"/watch/{watch['watchId']}")).status
    relay.clock.advance(2 * HOUR)
    return relay


async def test_a_backlog_goes_in_batches_until_the_last_short_one(
    make_relay: RelayFactory, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "PURGE_BATCH", 2)
    relay = await relay_with_old_cancelled_watches(make_relay, receiver, 5)

    assert 5 == await purge_finished(relay.app)  # 2 + 2 + 1
    assert 5 == relay.sample("relay_watches_purged_total")


async def test_a_stop_ends_the_sweep_between_batches(
    make_relay: RelayFactory, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "PURGE_BATCH", 1)
    relay = await relay_with_old_cancelled_watches(make_relay, receiver, 3)
    stopping = asyncio.Event()
    store = relay.store
    purge = store.purge_finished

    async def purge_then_stop(*, before: float, limit: int) -> int:
        count = await purge(before=before, limit=limit)
        stopping.set()  # the stop arrives while the first batch is written
        return count

    monkeypatch.setattr(store, "purge_finished", purge_then_stop)
    assert 1 == await purge_finished(relay.app, stopping)
    monkeypatch.setattr(store, "purge_finished", purge)
    assert 2 == await purge_finished(relay.app)


async def test_a_retention_of_zero_keeps_every_watch(
    make_relay: RelayFactory, receiver: Receiver
) -> None:
    relay = await make_relay(watch_retention_s=0.0)
    watch = await relay.register("tk-hiapi-ret-0", receiver.at("/hook"))
    assert 204 == (await relay.client.delete(f"/watch/{watch['watchId']}")).status
    relay.clock.advance(10 * 365 * 86_400)

    assert 0 == await purge_finished(relay.app)
    assert "cancelled" == (await relay.watch(watch["watchId"]))["state"]


@pytest.mark.slow
async def test_the_relay_process_runs_the_sweep(tmp_path: Path) -> None:
    """`relay serve` starts the retention loop: its first sweep, at start, deletes a watch
    cancelled before a restart (retention 1 ms; a restart takes far longer)."""

    async def hook(request: web.Request) -> web.Response:
        return web.Response(status=204)

    async with loopback(create_fake_upstream_app(api_key="k"), hook) as net:
        relay = RelayProcess(
            env={
                "RELAY_STORE_URL": f"sqlite:///{tmp_path / 'relay.db'}",
                "RELAY_UPSTREAM_URL": str(net.upstream.make_url("")).rstrip("/"),
                "RELAY_UPSTREAM_API_KEY": "k",
                "RELAY_SIGNING_SECRET": SIGNING_SECRET,
                "RELAY_CALLBACK_ALLOW_NETS": "127.0.0.0/8",
                "RELAY_WATCH_RETENTION_S": "0.001",
            },
            log_path=tmp_path / "relay.log",
        )
        await relay.start()
        async with aiohttp.ClientSession() as session:
            callback = str(net.receiver.make_url("/hook/1"))
            async with session.post(
                f"{relay.url}/watch", json={"taskId": "tk-hiapi-ret-p", "callbackUrl": callback}
            ) as response:
                assert 201 == response.status
                watch_id = (await response.json())["watchId"]
            async with session.delete(f"{relay.url}/watch/{watch_id}") as response:
                assert 204 == response.status
            assert 0 == await relay.stop()
            await relay.start()

            async def status() -> int:
                async with session.get(f"{relay.url}/watch/{watch_id}") as response:
                    return response.status

            assert 404 == await settle(status, 404), relay.log_tail()
            async with session.get(f"{relay.url}/metrics") as response:
                assert "relay_watches_purged_total 1.0" in await response.text()
        assert 0 == await relay.stop()
    assert '"watches_purged"' in relay.log_path.read_text()
