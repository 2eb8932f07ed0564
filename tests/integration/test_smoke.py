"""The relay end to end against the fake task API and a real receiver, driven by tick(now)."""

from __future__ import annotations

from relay import signing
from tests.conftest import SIGNING_SECRET, Receiver, Relay, Upstream


async def test_registered_watch_of_finished_task_gets_signed_success_callback(
    relay: Relay, upstream: Upstream, receiver: Receiver
) -> None:
    """A task that already succeeded is polled at once and its callback arrives signed."""
    await upstream.flip("tk-hiapi-done-1", "success")
    watch = await relay.register("tk-hiapi-done-1", receiver.at("/hook"), metadata={"k": 1})

    assert (1, 1) == await relay.step()

    [received] = receiver.requests
    signing.verify(received.body, received.headers, SIGNING_SECRET, now=relay.clock())
    body = received.json
    assert "task.success" == body["type"]
    assert {"k": 1} == body["data"]["metadata"]
    assert watch["watchId"] == body["data"]["watchId"]
    assert "delivered" == (await relay.watch(watch["watchId"]))["state"]
