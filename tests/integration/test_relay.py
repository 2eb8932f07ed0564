"""The relay end to end: the fake task API and a real receiver on loopback, a real SQLite file,
and the loops driven one tick at a time on a fake clock."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from relay import signing
from relay.delivery import receiver_key
from relay.state import DELIVERER
from relay.store.base import StoreUnavailable
from tests.conftest import SIGNING_SECRET, Receiver, Relay, RelayFactory, Upstream

TASK = "tk-hiapi-01HZTQ8BX2N3GM3YFK4Z9D7VQR"


async def test_success_callback_carries_the_upstream_data_verbatim(
    relay: Relay, upstream: Upstream, receiver: Receiver
) -> None:
    """task.success forwards every field of the upstream `data`, signed per Standard Webhooks."""
    output = [{"url": "https://cdn.example.invalid/v.mp4", "type": "video", "expireAt": 1}]
    await upstream.flip(TASK, "success", output=output)
    watch = await relay.register(TASK, receiver.at("/hook"), metadata={"order": 7})

    assert (1, 1) == await relay.step()

    [received] = receiver.requests
    signing.verify(received.body, received.headers, SIGNING_SECRET, now=relay.clock())
    body = received.json
    assert ["type", "timestamp", "data"] == list(body)
    assert "task.success" == body["type"]
    assert {"watchId", "taskId", "metadata", "task"} == set(body["data"])
    task = body["data"]["task"]
    assert TASK == task["taskId"]
    assert "success" == task["status"]
    assert output == task["output"]
    assert {"taskId", "model", "status", "created", "completed", "output"} <= set(task)
    assert f"msg_{watch['watchId']}" == received.headers["webhook-id"]
    assert str(int(relay.clock())) == received.headers["webhook-timestamp"]
    assert "application/json" == received.headers["Content-Type"]
    view = await relay.watch(watch["watchId"])
    assert ("delivered", "success", 1, 1) == (
        view["state"],
        view["taskStatus"],
        view["polls"],
        view["deliveryAttempts"],
    )


@pytest.mark.parametrize("front", ["in-process", "api-process"])
async def test_integers_past_64_bits_arrive_exact_in_data_and_metadata(
    relay: Relay, upstream: Upstream, receiver: Receiver
) -> None:
    """orjson would read 123456789012345678901234567890 as 1.2345678901234568e+29 (and refuse
    to write it): the task's data and the metadata keep every digit, through an API process
    too."""
    big, negative = 123456789012345678901234567890, -98765432109876543210987
    raw = (
        f'{{"code":200,"message":"success","data":{{"taskId":"{TASK}","status":"success",'
        f'"created":1,"completed":2,"output":[{{"seed":{big},"offset":{negative},"ratio":0.5}}]}}}}'
    )
    await upstream.script(TASK, {"body": raw})
    watch = await relay.register(TASK, receiver.at("/hook"), metadata={"order": big})
    assert {"order": big} == watch["metadata"]

    assert (1, 1) == await relay.step()

    [received] = receiver.requests
    signing.verify(received.body, received.headers, SIGNING_SECRET, now=relay.clock())
    assert b'"metadata":{"order":123456789012345678901234567890}' in received.body
    assert b'{"seed":123456789012345678901234567890,"offset":-98765432109876543210987' in (
        received.body
    )
    body = json.loads(received.body)  # the standard library keeps every integer
    assert [{"seed": big, "offset": negative, "ratio": 0.5}] == body["data"]["task"]["output"]
    assert {"order": big} == (await relay.watch(watch["watchId"]))["metadata"]


async def test_fail_callback_carries_the_error(
    relay: Relay, upstream: Upstream, receiver: Receiver
) -> None:
    """A task that fails upstream ends with task.fail and its error object."""
    error = {"code": 5001, "message": "content policy"}
    await upstream.flip(TASK, "fail", error=error)
    await relay.register(TASK, receiver.at("/hook"))

    await relay.step()

    [body] = receiver.bodies()
    assert "task.fail" == body["type"]
    assert error == body["data"]["task"]["error"]


async def test_task_not_found_past_the_grace_window_ends_with_not_found(
    make_relay: RelayFactory, upstream: Upstream, receiver: Receiver
) -> None:
    """Not-found inside the grace window keeps polling; past it the callback is task.not_found."""
    relay = await make_relay(not_found_grace_s=60.0, poll_initial_s=10.0)
    await upstream.control("DELETE", f"/tasks/{TASK}")
    watch = await relay.register(TASK, receiver.at("/hook"))

    assert (1, 0) == await relay.step()
    view = await relay.watch(watch["watchId"])
    assert ("watching", "task not found upstream") == (view["state"], view["lastError"])
    for _ in range(5):
        await relay.step(10.0)
    assert [] == receiver.requests
    await relay.step(10.0)  # 60 s after the first not-found

    [body] = receiver.bodies()
    assert ("task.not_found", None) == (body["type"], body["data"]["task"])
    assert 7 == upstream.polls(TASK)


async def test_not_found_then_visible_keeps_the_watch(
    make_relay: RelayFactory, upstream: Upstream, receiver: Receiver
) -> None:
    """A task invisible at first (just created) and visible within the grace window is watched on."""
    relay = await make_relay(not_found_grace_s=60.0, poll_initial_s=10.0)
    await upstream.control("DELETE", f"/tasks/{TASK}")
    await relay.register(TASK, receiver.at("/hook"))
    await relay.step()
    await upstream.flip(TASK, "handling")
    await relay.step(10.0)
    await relay.step(70.0)
    assert [] == receiver.requests
    await upstream.flip(TASK, "success")
    await relay.step(200.0)
    assert ["task.success"] == [b["type"] for b in receiver.bodies()]


async def test_watch_past_its_deadline_gets_a_timeout_callback(
    make_relay: RelayFactory, upstream: Upstream, receiver: Receiver
) -> None:
    """A task that never ends produces task.timeout at the watch's deadline, with no task data."""
    relay = await make_relay(watch_timeout_s=100.0, poll_max_s=30.0)
    await upstream.flip(TASK, "handling")
    watch = await relay.register(TASK, receiver.at("/hook"))
    await relay.step()
    await relay.step(99.0)
    assert [] == receiver.requests

    await relay.step(1.0)

    [body] = receiver.bodies()
    assert ("task.timeout", None) == (body["type"], body["data"]["task"])
    view = await relay.watch(watch["watchId"])
    assert ("delivered", "handling") == (view["state"], view["taskStatus"])
    polls_at_deadline = upstream.polls(TASK)
    await relay.step(1000.0)
    assert polls_at_deadline == upstream.polls(TASK)  # the stream ended with its last watch


async def test_five_watches_on_one_task_share_one_poll_stream(
    relay: Relay, upstream: Upstream, receiver: Receiver
) -> None:
    """Five services watching one task cost one poll per interval and each gets its callback."""
    await upstream.flip(TASK, "handling")
    watches = [await relay.register(TASK, receiver.at(f"/svc{i}")) for i in range(5)]

    await relay.step()
    await relay.step(2.0)
    await relay.step(4.0)
    assert 3 == upstream.polls(TASK)
    assert 0 == upstream.fake.stats()["overlaps"]

    await upstream.flip(TASK, "success")
    await relay.step(8.0)

    assert 4 == upstream.polls(TASK)
    assert {f"/svc{i}" for i in range(5)} == {r.path for r in receiver.requests}
    assert {f"msg_{w['watchId']}" for w in watches} == {
        r.headers["webhook-id"] for r in receiver.requests
    }


async def test_poll_interval_grows_to_its_cap_and_archiving_resets_it(
    make_relay: RelayFactory, upstream: Upstream
) -> None:
    """Polls come at 2, 4, 8, 10 (cap) s apart; archiving brings the interval back to 2 s."""
    relay = await make_relay(poll_initial_s=2.0, poll_factor=2.0, poll_max_s=10.0, poll_jitter=0.0)
    await upstream.flip(TASK, "handling")
    watch = await relay.register(TASK, "http://127.0.0.1:9/hook")

    gaps = []
    last = relay.clock()
    for _ in range(6):
        await relay.poll()
        view = await relay.watch(watch["watchId"])
        next_at = _epoch(view["nextPollAt"])
        gaps.append(round(next_at - last, 3))
        relay.clock.now = last = next_at
    assert [2.0, 4.0, 8.0, 10.0, 10.0, 10.0] == gaps

    await upstream.flip(TASK, "archiving")
    await relay.poll()
    view = await relay.watch(watch["watchId"])
    assert 2.0 == round(_epoch(view["nextPollAt"]) - relay.clock(), 3)


async def test_nothing_is_polled_before_it_is_due(relay: Relay, upstream: Upstream) -> None:
    """A tick before the next due time makes no upstream request."""
    await upstream.flip(TASK, "handling")
    await relay.register(TASK, "http://127.0.0.1:9/hook")
    assert 1 == await relay.poll()
    # Due after 2 s x (1 - 0.2 jitter x 0.5 draw) = 1.8 s: jitter only ever brings a poll forward.
    assert 0 == await relay.poll(1.79)
    assert 1 == await relay.poll(0.01)


async def test_rate_budget_caps_polls_per_second(
    make_relay: RelayFactory, upstream: Upstream
) -> None:
    """RELAY_UPSTREAM_RPS=50: a burst of 5, then 5 per 0.1 s; any second sees at most 55 polls."""
    relay = await make_relay(upstream_rps=50.0)
    for i in range(100):
        await upstream.flip(f"{TASK}{i}", "handling")
        await relay.register(f"{TASK}{i}", "http://127.0.0.1:9/hook")

    polled = [await relay.poll()] + [await relay.poll(0.1) for _ in range(10)]

    assert [5] * 11 == polled
    assert 55 == upstream.fake.stats()["requests"]
    assert 0 == await relay.poll(0.01)


@pytest.mark.parametrize(
    ("script", "outcome"),
    [
        ({"status": 500}, "server_error"),
        ({"status": 502}, "server_error"),
        ({"status": 503}, "server_error"),
        ({"status": 429}, "rate_limited"),
        ({"status": 401}, "auth_error"),
        ({"status": 403}, "auth_error"),
        ({"status": 400}, "client_error"),
        ({"body": "<html>bad gateway</html>"}, "invalid_response"),
        ({"json": {"code": 200, "message": "success", "data": {"id": 1}}}, "invalid_response"),
        ({"json": [1, 2, 3]}, "invalid_response"),
    ],
)
async def test_upstream_fault_is_counted_and_retried_without_a_callback(
    relay: Relay, upstream: Upstream, receiver: Receiver, script: dict[str, object], outcome: str
) -> None:
    """Each upstream fault is counted by outcome, backs off, and the watch still ends right."""
    await upstream.flip(TASK, "success")
    await upstream.script(TASK, script)
    watch = await relay.register(TASK, receiver.at("/hook"))

    await relay.step()

    assert [] == receiver.requests
    assert 1.0 == relay.sample("relay_upstream_polls_total", {"outcome": outcome})
    view = await relay.watch(watch["watchId"])
    assert "watching" == view["state"]
    assert view["lastError"].startswith(f"upstream {outcome}")
    assert 2.0 == round(_epoch(view["nextPollAt"]) - relay.clock(), 3)  # first error backoff
    await relay.step(2.0)
    assert ["task.success"] == [b["type"] for b in receiver.bodies()]


async def test_upstream_retry_after_is_honored(relay: Relay, upstream: Upstream) -> None:
    """A 429 with Retry-After: 30 puts the next poll 30 s out, past the 2 s error backoff."""
    await upstream.flip(TASK, "handling")
    await upstream.script(TASK, {"status": 429, "retryAfter": 30})
    watch = await relay.register(TASK, "http://127.0.0.1:9/hook")
    await relay.poll()
    view = await relay.watch(watch["watchId"])
    assert 30.0 == round(_epoch(view["nextPollAt"]) - relay.clock(), 3)


async def test_upstream_timeout_and_reset_are_network_outcomes(
    make_relay: RelayFactory, upstream: Upstream, receiver: Receiver
) -> None:
    """A hung upstream counts as timeout, dropped connections as network_error; neither loses the watch."""
    relay = await make_relay(upstream_timeout_s=0.2)
    await upstream.flip(TASK, "success")
    # aiohttp and our immediate retries absorb single resets; six in a row exhaust them.
    await upstream.script(TASK, {"delayS": 1.0}, *[{"reset": True}] * 6)
    await relay.register(TASK, receiver.at("/hook"))

    await relay.step()
    assert 1.0 == relay.sample("relay_upstream_polls_total", {"outcome": "timeout"})
    await relay.step(2.0)
    assert 1.0 == relay.sample("relay_upstream_polls_total", {"outcome": "network_error"})
    assert [] == receiver.requests
    await relay.step(4.0)
    assert ["task.success"] == [b["type"] for b in receiver.bodies()]


async def test_unknown_upstream_status_is_counted_and_not_terminal(
    relay: Relay, upstream: Upstream, receiver: Receiver
) -> None:
    """A status the relay does not know keeps the watch watching and counts as `unknown`."""
    data = {"taskId": TASK, "model": "m", "status": "paused", "created": 1, "completed": 0}
    await upstream.script(TASK, {"json": {"code": 200, "message": "success", "data": data}})
    watch = await relay.register(TASK, receiver.at("/hook"))
    await relay.step()
    assert 1.0 == relay.sample("relay_task_status_total", {"status": "unknown"})
    view = await relay.watch(watch["watchId"])
    assert ("watching", "paused") == (view["state"], view["taskStatus"])
    assert [] == receiver.requests


async def test_receiver_5xx_then_2xx_is_retried_with_the_same_webhook_id(
    relay: Relay, upstream: Upstream, receiver: Receiver
) -> None:
    """Two 5xx answers then a 2xx: three attempts 5 s and 10 s apart, one webhook-id."""
    await upstream.flip(TASK, "success")
    receiver.script("/hook", 500, 503)
    watch = await relay.register(TASK, receiver.at("/hook"))

    await relay.step()
    view = await relay.watch(watch["watchId"])
    assert ("delivering", 1, "HTTP 500") == (
        view["state"],
        view["deliveryAttempts"],
        view["lastError"],
    )
    assert 0 == await relay.deliver(4.9)
    assert 1 == await relay.deliver(0.1)
    assert 0 == await relay.deliver(9.9)
    assert 1 == await relay.deliver(0.1)

    assert 3 == len(receiver.requests)
    assert 1 == len({r.headers["webhook-id"] for r in receiver.requests})
    assert 1 == len({r.body for r in receiver.requests})
    assert 3 == len({r.headers["webhook-timestamp"] for r in receiver.requests})
    for received in receiver.requests:
        signing.verify(
            received.body,
            received.headers,
            SIGNING_SECRET,
            now=int(received.headers["webhook-timestamp"]),
        )
    view = await relay.watch(watch["watchId"])
    assert ("delivered", 3, None) == (view["state"], view["deliveryAttempts"], view["lastError"])
    assert 2.0 == relay.sample("relay_callback_attempts_total", {"outcome": "retry"})
    assert 1.0 == relay.sample("relay_callback_attempts_total", {"outcome": "delivered"})
    assert 1.0 == relay.sample("relay_terminal_to_delivered_seconds_count")
    assert 15.0 == relay.sample("relay_terminal_to_delivered_seconds_sum")


async def test_receiver_410_stops_delivery_at_once(
    relay: Relay, upstream: Upstream, receiver: Receiver
) -> None:
    """410 Gone fails the watch after one attempt; it stays visible and counted."""
    await upstream.flip(TASK, "success")
    receiver.script("/hook", 410)
    watch = await relay.register(TASK, receiver.at("/hook"))
    await relay.step()
    await relay.deliver(3600.0)

    assert 1 == len(receiver.requests)
    view = await relay.watch(watch["watchId"])
    assert ("failed", 1, "HTTP 410") == (view["state"], view["deliveryAttempts"], view["lastError"])
    assert 1.0 == relay.sample("relay_callback_attempts_total", {"outcome": "gave_up"})
    assert 1.0 == relay.sample("relay_watches_finished_total", {"result": "failed"})


async def test_receiver_redirect_is_not_followed(
    relay: Relay, upstream: Upstream, receiver: Receiver
) -> None:
    """A 302 from the receiver fails the delivery; the redirect target gets nothing."""
    await upstream.flip(TASK, "success")
    receiver.script("/hook", 302)
    watch = await relay.register(TASK, receiver.at("/hook"))
    await relay.step()
    assert ["/hook"] == [r.path for r in receiver.requests]
    view = await relay.watch(watch["watchId"])
    assert ("failed", "HTTP 302: redirects are not followed") == (
        view["state"],
        view["lastError"],
    )


async def test_receiver_too_slow_is_retried(
    make_relay: RelayFactory, upstream: Upstream, receiver: Receiver
) -> None:
    """A receiver slower than RELAY_DELIVERY_TIMEOUT_S counts as a failed attempt to retry."""
    relay = await make_relay(delivery_timeout_s=0.2)
    await upstream.flip(TASK, "success")
    receiver.delays["/hook"] = 1.0
    watch = await relay.register(TASK, receiver.at("/hook"))
    await relay.step()
    view = await relay.watch(watch["watchId"])
    assert ("delivering", "no answer within 0.2 s") == (view["state"], view["lastError"])
    receiver.delays.clear()
    await relay.deliver(5.0)
    assert "delivered" == (await relay.watch(watch["watchId"]))["state"]


async def test_receiver_429_retry_after_is_honored(
    relay: Relay, upstream: Upstream, receiver: Receiver
) -> None:
    """A 429 with Retry-After: 120 defers the next attempt to 120 s, not the 5 s schedule."""
    await upstream.flip(TASK, "success")
    receiver.script("/hook", 429)
    await relay.register(TASK, receiver.at("/hook"))
    await relay.step()
    assert 0 == await relay.deliver(119.0)
    assert 1 == await relay.deliver(1.0)


async def test_delivery_gives_up_after_max_attempts_and_redelivery_succeeds(
    make_relay: RelayFactory, upstream: Upstream, receiver: Receiver
) -> None:
    """After RELAY_DELIVERY_MAX_ATTEMPTS failures the watch is failed; redeliver sends it again."""
    relay = await make_relay(delivery_max_attempts=3)
    await upstream.flip(TASK, "success")
    receiver.script("/hook", 500, 500, 500)
    watch = await relay.register(TASK, receiver.at("/hook"))
    await relay.step()
    await relay.deliver(5.0)
    await relay.deliver(10.0)
    view = await relay.watch(watch["watchId"])
    assert ("failed", 3) == (view["state"], view["deliveryAttempts"])
    assert "HTTP 500; gave up after 3 attempts" == view["lastError"]

    response = await relay.client.post(f"/watch/{watch['watchId']}/redeliver")
    assert 202 == response.status
    await relay.deliver()
    assert "delivered" == (await relay.watch(watch["watchId"]))["state"]
    assert 1 == len({r.headers["webhook-id"] for r in receiver.requests})


async def test_cancelled_watch_gets_no_callback_and_other_watchers_still_do(
    relay: Relay, upstream: Upstream, receiver: Receiver
) -> None:
    """Cancelling one of two watches on a task silences only that one."""
    await upstream.flip(TASK, "handling")
    first = await relay.register(TASK, receiver.at("/a"))
    await relay.register(TASK, receiver.at("/b"))
    await relay.step()
    response = await relay.client.delete(f"/watch/{first['watchId']}")
    assert 204 == response.status
    await upstream.flip(TASK, "success")
    await relay.step(2.0)
    assert ["/b"] == [r.path for r in receiver.requests]
    assert "cancelled" == (await relay.watch(first["watchId"]))["state"]


async def test_a_watch_cancelled_while_its_callback_is_out_counts_as_cancelled_only(
    relay: Relay, upstream: Upstream, receiver: Receiver
) -> None:
    """The receiver answers 2xx after the watch was cancelled: the attempt is counted, the watch
    stays cancelled, and it ends once in relay_watches_finished_total (as cancelled)."""
    await upstream.flip(TASK, "success")
    watch = await relay.register(TASK, receiver.at("/slow"))
    receiver.gates["/slow"] = gate = asyncio.Event()
    await relay.poll()
    delivering = asyncio.ensure_future(relay.deliver())
    await receiver.arrived.wait()
    response = await relay.client.delete(f"/watch/{watch['watchId']}")
    assert 204 == response.status
    gate.set()
    await delivering

    assert "cancelled" == (await relay.watch(watch["watchId"]))["state"]
    assert 1 == relay.sample("relay_callback_attempts_total", {"outcome": "delivered"})
    finished = {
        result: relay.sample("relay_watches_finished_total", {"result": result})
        for result in ("delivered", "failed", "cancelled")
    }
    assert {"delivered": 0, "failed": 0, "cancelled": 1} == finished


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def test_revoked_api_key_pauses_all_polling_with_backoff(
    relay: Relay, upstream: Upstream, receiver: Receiver
) -> None:
    """401 for every task pauses the whole poller (2 s, 4 s, ...) and raises the auth gauge."""
    for i in range(10):
        await upstream.flip(f"{TASK}{i}", "success")
        await relay.register(f"{TASK}{i}", receiver.at(f"/h{i}"))
    await upstream.control("POST", "/fail-all", {"status": 401})

    await relay.poll()
    polled_once = upstream.fake.stats()["requests"]
    assert 1.0 == relay.sample("relay_upstream_auth_failing")
    assert 0 == await relay.poll(1.9)  # paused, though every other stream is due
    assert 1 == await relay.poll(0.1)  # one probe after the pause...
    assert 0 == await relay.poll(3.9)  # ...then a pause twice as long
    assert polled_once + 1 == upstream.fake.stats()["requests"]

    await upstream.control("POST", "/fail-all", {"status": None})
    await relay.step(0.1)
    await relay.step(60.0)
    await relay.deliver(1.0)  # one receiver takes 8 at a time (RELAY_DELIVERY_PER_HOST)
    assert 0.0 == relay.sample("relay_upstream_auth_failing")
    assert 10 == len(receiver.requests)


async def test_one_receiver_gets_at_most_its_share_of_attempts_in_flight(
    make_relay: RelayFactory, upstream: Upstream, receiver: Receiver
) -> None:
    """20 callbacks to one receiver, RELAY_DELIVERY_PER_HOST=8: 8 go, 12 wait uncounted until
    one of the 8 ends, then go as slots free, not a second later."""
    relay = await make_relay(delivery_per_host=8)
    watches = []
    for i in range(20):
        await upstream.flip(f"{TASK}{i}", "success")
        watches.append(await relay.register(f"{TASK}{i}", receiver.at(f"/h{i}")))
    await relay.poll()

    assert 8 == await relay.deliver()
    assert 12.0 == relay.sample("relay_callbacks_deferred_total", {"reason": "receiver_busy"})
    waiting = [await relay.watch(w["watchId"]) for w in watches]
    assert 12 == sum(1 for w in waiting if w["state"] == "delivering")
    assert {0} == {w["deliveryAttempts"] for w in waiting if w["state"] == "delivering"}
    assert 8 == await relay.deliver()  # the clock has not moved
    assert 4 == await relay.deliver()
    assert 20 == len(receiver.requests)
    assert 16.0 == relay.sample("relay_callbacks_deferred_total", {"reason": "receiver_busy"})


async def _next_arrival(receiver: Receiver, count: int) -> None:
    """Wait until the receiver has had `count` requests (each arrival sets `arrived`)."""
    while len(receiver.requests) < count:
        receiver.arrived.clear()
        if len(receiver.requests) < count:
            await asyncio.wait_for(receiver.arrived.wait(), 10)


async def test_a_freed_slot_brings_forward_one_waiting_callback_not_a_slot_s_worth(
    make_relay: RelayFactory, upstream: Upstream, receiver: Receiver
) -> None:
    """The receiver's attempts end one at a time: each freed slot brings forward as many waiting
    callbacks as the receiver has slots free (one), not RELAY_DELIVERY_PER_HOST (4), which the
    next claim would mostly defer again (each such round trip two store writes and a count)."""
    relay = await make_relay(delivery_per_host=4)
    for i in range(12):
        await upstream.flip(f"{TASK}{i}", "success")
        await relay.register(f"{TASK}{i}", receiver.at(f"/h{i}"))
        receiver.gates[f"/h{i}"] = asyncio.Event()
    await relay.poll()
    stopping = asyncio.Event()
    running = asyncio.create_task(relay.app[DELIVERER].run(stopping))
    try:
        await _next_arrival(receiver, 4)
        for n in range(4, 12):  # end the oldest attempt; the next callback goes in its slot
            receiver.gates[receiver.requests[n - 4].path].set()
            await _next_arrival(receiver, n + 1)
        for gate in receiver.gates.values():
            gate.set()
    finally:
        stopping.set()
        await asyncio.wait_for(running, 10)

    assert 12 == len({r.path for r in receiver.requests}) == len(receiver.requests)
    # The 8 that waited at first, each deferred once.
    assert 8.0 == relay.sample("relay_callbacks_deferred_total", {"reason": "receiver_busy"})


async def test_callbacks_waiting_for_a_receiver_whose_attempts_hang_go_after_an_attempt_s_time(
    make_relay: RelayFactory, upstream: Upstream, receiver: Receiver
) -> None:
    """No attempt of the busy receiver ends here (it hangs, or another replica holds it): its
    waiting callbacks fall due anyway once an attempt would have timed out (2 s) plus 1 s."""
    relay = await make_relay(delivery_per_host=1, delivery_timeout_s=2.0)
    for i in range(2):
        await upstream.flip(f"{TASK}{i}", "success")
        await relay.register(f"{TASK}{i}", receiver.at(f"/h{i}"))
    await relay.poll()
    deliverer = relay.app[DELIVERER]
    # One attempt holds the receiver's only slot and never ends within this test.
    deliverer._host_in_flight[receiver_key(receiver.at("/"))] = 1

    assert 0 == await relay.deliver()
    assert 0 == await relay.deliver(2.9)
    deliverer._host_in_flight.clear()
    assert 1 == await relay.deliver(0.1)  # due after 3 s; one slot, so one goes...
    assert 1 == await relay.deliver()  # ...and the other as soon as it ends


async def test_a_hanging_receiver_s_backlog_is_deferred_once_per_attempt_time_not_each_second(
    make_relay: RelayFactory, upstream: Upstream, receiver: Receiver
) -> None:
    """While its attempts hang, a receiver's waiting callbacks are not claimed and deferred
    again every second: with a large backlog that churn kept the loop busy and made the other
    receivers' callbacks queue behind it."""
    relay = await make_relay(delivery_per_host=1, delivery_timeout_s=10.0)
    for i in range(5):
        await upstream.flip(f"{TASK}{i}", "success")
        await relay.register(f"{TASK}{i}", receiver.at(f"/h{i}"))
    await relay.poll()
    relay.app[DELIVERER]._host_in_flight[receiver_key(receiver.at("/"))] = 1  # hangs

    def deferred() -> float:
        return relay.sample("relay_callbacks_deferred_total", {"reason": "receiver_busy"}) or 0.0

    assert (0, 5.0) == (await relay.deliver(), deferred())
    assert (0, 5.0) == (await relay.deliver(1.5), deferred())  # once, not again after 1 s
    assert (0, 5.0) == (await relay.deliver(9.0), deferred())  # still within 10 s + 1 s


async def test_a_failed_record_still_frees_the_receiver_for_its_parked_callbacks(
    make_relay: RelayFactory,
    upstream: Upstream,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The store fails to record an attempt: the receiver's slot is free all the same, so its
    parked callback is due at once, not when its deferral ends."""
    relay = await make_relay(delivery_per_host=1)
    for i in range(2):
        await upstream.flip(f"{TASK}{i}", "success")
        await relay.register(f"{TASK}{i}", receiver.at(f"/h{i}"))
    await relay.poll()
    real_record = relay.store.record_deliveries
    failures = [StoreUnavailable("sqlite: disk I/O error")]

    async def record_failing_once(records: Any, *, now: float) -> None:
        if failures:
            raise failures.pop()
        await real_record(records, now=now)

    monkeypatch.setattr(relay.store, "record_deliveries", record_failing_once)

    assert 1 == await relay.deliver()  # one attempt (its record fails), the other parked
    assert 1 == await relay.deliver()  # the clock has not moved: the parked one goes now
    assert 2 == len(receiver.requests)
    # Both attempts happened, the one whose record failed included.
    assert 2.0 == relay.sample("relay_callback_attempts_total", {"outcome": "delivered"})


async def test_a_receiver_freed_while_its_callbacks_were_being_parked_gets_them_at_once(
    make_relay: RelayFactory,
    upstream: Upstream,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The receiver's last attempt ends while the deferral is being written: nothing is left
    to bring the parked callbacks forward, so the claim itself does, at once."""
    relay = await make_relay(delivery_per_host=1)
    for i in range(2):
        await upstream.flip(f"{TASK}{i}", "success")
        await relay.register(f"{TASK}{i}", receiver.at(f"/h{i}"))
    await relay.poll()
    deliverer = relay.app[DELIVERER]
    deliverer._host_in_flight[receiver_key(receiver.at("/"))] = 1  # an attempt in flight
    real_defer = relay.store.defer_deliveries

    async def defer_while_the_attempt_ends(held: list[tuple[str, float]], *, due_at: float) -> None:
        await real_defer(held, due_at=due_at)
        deliverer._host_in_flight.clear()  # ended, and found nothing parked yet

    monkeypatch.setattr(relay.store, "defer_deliveries", defer_while_the_attempt_ends)

    assert 0 == await relay.deliver()
    assert 1 == await relay.deliver()  # the clock has not moved: not 1 s later
    assert 1 == await relay.deliver()
    assert 2 == len(receiver.requests)
