"""Poll worker processes (RELAY_POLL_PROCESSES): real `relay poll-worker` children, a real fake
task API on loopback. A poll through a child classifies exactly like one made in-process; a child
that dies or hangs fails only its polls in flight, as network errors, and is replaced."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from relay.fake_upstream import FAKE_UPSTREAM_KEY, FakeUpstream, create_fake_upstream_app
from relay.metrics import Metrics
from relay.models import PollOutcome, PollResult
from relay.pollworkers import CONFIG, PROTOCOL_VERSION, PollWorkerPool, WorkerConfig, encode
from relay.upstream import Answer, UpstreamClient, make_upstream_session

KEY = "k-poll-workers"
# Every wait below is bounded by this; none is needed for a passing test to pass.
BOUND_S = 20.0


class Fake:
    def __init__(self, url: str, fake: FakeUpstream) -> None:
        self.url = url
        self.fake = fake

    async def script(self, task_id: str, *responses: dict[str, Any]) -> None:
        async with (
            aiohttp.ClientSession() as control,
            control.post(
                f"{self.url}/_fake/script/{task_id}", json={"responses": list(responses)}
            ) as response,
        ):
            assert 200 == response.status


@pytest.fixture
async def fake() -> AsyncIterator[Fake]:
    app = create_fake_upstream_app(api_key=KEY)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield Fake(str(server.make_url("")).rstrip("/"), app[FAKE_UPSTREAM_KEY])
    await server.close()


def _config(url: str, **overrides: Any) -> WorkerConfig:
    values: dict[str, Any] = {
        "base_url": url,
        "api_key": KEY,
        "timeout_s": 5.0,
        "concurrency": 8,
        "event_loop": "asyncio",
        "log_level": "WARNING",
    }
    values.update(overrides)
    return WorkerConfig(**values)


@pytest.fixture
async def pool_for(fake: Fake) -> AsyncIterator[Callable[..., Awaitable[PollWorkerPool]]]:
    pools: list[PollWorkerPool] = []

    async def start(
        processes: int = 1,
        answer_timeout_s: float = 30.0,
        *,
        command: tuple[str, ...] | None = None,
        metrics: Metrics | None = None,
        **config: Any,
    ) -> PollWorkerPool:
        """A started pool, closed after the test (closing it twice is harmless)."""
        pool = PollWorkerPool(
            _config(fake.url, **config),
            processes=processes,
            answer_timeout_s=answer_timeout_s,
            metrics=metrics or Metrics(CollectorRegistry()),
            **({} if command is None else {"command": command}),
        )
        pools.append(pool)
        await pool.start()
        return pool

    yield start
    for pool in pools:
        await pool.close()


async def _until(condition: Callable[[], bool]) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), BOUND_S)


SCRIPTS: dict[str, list[dict[str, Any]]] = {
    "ok": [],
    "rate-limited": [{"status": 429, "retryAfter": 7}],
    "server-error": [{"status": 503}],
    "not-found": [{"status": 404}],
    "not-json": [{"body": "<html>proxy</html>"}],
    "wrong-task": [{"json": {"code": 200, "data": {"taskId": "someone-else", "status": "queued"}}}],
    "dropped-once": [{"reset": True}, {"reset": True}],
    "dropped-always": [{"reset": True}] * 6,
}


@pytest.mark.parametrize("case", sorted(SCRIPTS))
async def test_a_poll_through_a_worker_is_classified_exactly_like_one_made_in_process(
    fake: Fake, pool_for: Callable[..., Awaitable[PollWorkerPool]], case: str
) -> None:
    pool = await pool_for()
    session = make_upstream_session(concurrency=4)
    in_process = UpstreamClient(session, base_url=fake.url, api_key=KEY, timeout_s=5.0)
    results: list[PollResult] = []
    tokens = 0

    async def gate() -> None:
        nonlocal tokens
        tokens += 1

    try:
        for fetcher in (in_process, pool):
            task_id = f"tk-hiapi-{case}"
            if SCRIPTS[case]:
                await fake.script(task_id, *SCRIPTS[case])
            results.append(await fetcher.fetch(task_id, now=1_000.0, before_retry=gate))
    finally:
        await session.close()
    assert results[0] == results[1]
    expected_tokens = {"dropped-once": 2, "dropped-always": 5}.get(case, 0)
    assert tokens == 2 * expected_tokens  # each retry, in either process, waited for the budget


async def test_a_retry_in_a_worker_waits_until_the_relay_grants_its_token(
    fake: Fake, pool_for: Callable[..., Awaitable[PollWorkerPool]]
) -> None:
    """The rate budget lives in the relay: a child's immediate retry goes out only once paid."""
    pool = await pool_for()
    await fake.script("tk-hiapi-gated", {"reset": True}, {"reset": True})
    asked = asyncio.Event()
    paid = asyncio.Event()

    async def gate() -> None:
        asked.set()
        await paid.wait()

    poll = asyncio.create_task(pool.fetch("tk-hiapi-gated", now=0.0, before_retry=gate))
    await asyncio.wait_for(asked.wait(), BOUND_S)
    sent_before = fake.fake.stats()["perTask"]["tk-hiapi-gated"]
    await asyncio.sleep(0.2)  # time the child would need to retry on its own (it must not)
    assert fake.fake.stats()["perTask"]["tk-hiapi-gated"] == sent_before
    assert not poll.done()
    paid.set()
    result = await asyncio.wait_for(poll, BOUND_S)
    assert result.outcome is PollOutcome.OK


async def test_a_worker_killed_mid_poll_fails_that_poll_and_is_replaced(
    fake: Fake, pool_for: Callable[..., Awaitable[PollWorkerPool]]
) -> None:
    pool = await pool_for()
    (child,) = pool.children
    await fake.script("tk-hiapi-slow", {"delayS": 30})
    poll = asyncio.create_task(pool.fetch("tk-hiapi-slow", now=0.0))
    await _until(lambda: fake.fake.stats()["perTask"].get("tk-hiapi-slow", 0) >= 1)
    assert child.pid is not None
    os.kill(child.pid, signal.SIGKILL)
    result = await asyncio.wait_for(poll, BOUND_S)
    assert (result.outcome, result.detail) == (PollOutcome.NETWORK_ERROR, "poll worker exited")
    await _until(lambda: pool.available)  # a new child has taken its CONFIG
    assert pool.children[0].pid != child.pid
    after = await asyncio.wait_for(pool.fetch("tk-hiapi-after", now=0.0), BOUND_S)
    assert after.outcome is PollOutcome.OK


async def test_a_worker_that_stops_answering_is_killed_at_the_answer_deadline(
    fake: Fake, pool_for: Callable[..., Awaitable[PollWorkerPool]]
) -> None:
    pool = await pool_for(answer_timeout_s=0.5)
    (child,) = pool.children
    assert child.pid is not None
    os.kill(child.pid, signal.SIGSTOP)  # alive, and answering nothing
    result = await asyncio.wait_for(pool.fetch("tk-hiapi-stuck", now=0.0), BOUND_S)
    assert result.outcome is PollOutcome.TIMEOUT  # settled at the deadline, before its lease ends
    await _until(lambda: pool.available and pool.children[0] is not child)  # silent: replaced
    after = await asyncio.wait_for(pool.fetch("tk-hiapi-after", now=0.0), BOUND_S)
    assert after.outcome is PollOutcome.OK


async def test_polls_spread_over_the_workers_and_close_waits_for_those_in_flight(
    fake: Fake, pool_for: Callable[..., Awaitable[PollWorkerPool]]
) -> None:
    pool = await pool_for(processes=2)
    for i in range(6):
        await fake.script(f"tk-hiapi-busy-{i}", {"delayS": 0.3})
    polls = [asyncio.create_task(pool.fetch(f"tk-hiapi-busy-{i}", now=0.0)) for i in range(6)]
    await _until(lambda: sum(fake.fake.stats()["perTask"].values()) >= 6)
    assert sorted(len(c.pending) for c in pool.children) == [3, 3]
    children = pool.children
    await asyncio.wait_for(pool.close(), BOUND_S)
    results = await asyncio.gather(*polls)
    assert {r.outcome for r in results} == {PollOutcome.OK}  # answered, not cut short
    for child in children:
        assert child.transport is not None
        assert child.transport.get_returncode() == 0


async def test_no_worker_running_is_a_network_error_not_a_hang(
    pool_for: Callable[..., Awaitable[PollWorkerPool]],
) -> None:
    pool = await pool_for(command=("/bin/false",))  # exits at once: every start fails
    await _until(lambda: not pool.children)
    result = await asyncio.wait_for(pool.fetch("tk-hiapi-1", now=0.0), BOUND_S)
    assert (result.outcome, result.detail) == (PollOutcome.NETWORK_ERROR, "no poll worker running")


# A child that reads its CONFIG, then answers every FETCH with a FAILURE the relay cannot read
# (an outcome no PollOutcome has): what a child of other code would do.
_GARBLING_CHILD = """
import os, struct, sys
HEADER = struct.Struct("<BIHI")
def read(n):
    data = b""
    while len(data) < n:
        chunk = os.read(0, n - len(data))
        if not chunk:
            sys.exit(0)
        data += chunk
    return data
kind, rid, small, length = HEADER.unpack(read(HEADER.size)); read(length)
os.write(1, HEADER.pack(8, 0, 0, 0))  # READY
while True:
    kind, rid, small, length = HEADER.unpack(read(HEADER.size)); read(length)
    payload = b'["no-such-outcome", "?"]'
    os.write(1, HEADER.pack(6, rid, 0, len(payload)) + payload)
"""


async def test_a_frame_the_relay_cannot_read_fails_that_poll_and_replaces_the_child(
    pool_for: Callable[..., Awaitable[PollWorkerPool]],
) -> None:
    pool = await pool_for(command=(sys.executable, "-c", _GARBLING_CHILD))
    (child,) = pool.children
    result = await asyncio.wait_for(pool.fetch("tk-hiapi-1", now=0.0), BOUND_S)
    assert (result.outcome, result.detail) == (
        PollOutcome.NETWORK_ERROR,
        "poll worker sent a frame the relay cannot read",
    )
    assert not child.pending  # nothing left behind for a watchdog that would never come
    await _until(lambda: pool.available and pool.children[0] is not child)


async def test_a_child_gets_no_relay_setting_in_its_environment(
    fake: Fake,
    pool_for: Callable[..., Awaitable[PollWorkerPool]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Secrets reach a child only as its CONFIG frame on stdin, never in /proc/<pid>/environ."""
    monkeypatch.setenv("RELAY_UPSTREAM_API_KEY", "sk-should-not-be-inherited")
    monkeypatch.setenv("RELAY_STORE_URL", "postgresql://relay:pw-should-not@127.0.0.1/x")
    monkeypatch.setenv("PGPASSWORD", "pw-should-not-be-inherited")  # asyncpg reads it too
    pool = await pool_for()
    (child,) = pool.children
    environ = Path(f"/proc/{child.pid}/environ").read_bytes().split(b"\0")
    assert [] == [v for v in environ if v.startswith((b"RELAY_", b"PG"))]
    assert "sk-" not in repr(pool._config)  # the dataclass repr leaves the key out
    result = await asyncio.wait_for(pool.fetch("tk-hiapi-env", now=0.0), BOUND_S)
    assert result.outcome is PollOutcome.OK  # the key it got over stdin works


def test_a_child_of_another_frame_protocol_refuses_to_start() -> None:
    """An in-place upgrade: the relay's frames and the code on disk disagree; the child says so."""
    config = orjson.dumps(
        {
            "base_url": "http://127.0.0.1:9",
            "api_key": None,
            "timeout_s": 1.0,
            "concurrency": 1,
            "event_loop": "asyncio",
            "log_level": "WARNING",
            "protocol": PROTOCOL_VERSION + 1,
        }
    )
    done = subprocess.run(
        [sys.executable, "-m", "relay", "poll-worker"],
        input=encode(CONFIG, 0, config),
        capture_output=True,
        timeout=BOUND_S,
        check=False,
    )
    assert done.returncode == 2
    assert b"frame protocol" in done.stderr
    assert done.stdout == b""


@pytest.mark.parametrize("case", ["ok", "dropped-once", "rate-limited"])
async def test_a_child_on_uvloop_answers_as_one_on_asyncio(
    fake: Fake, pool_for: Callable[..., Awaitable[PollWorkerPool]], case: str
) -> None:
    """The relay's default loop is uvloop: its pipes and subprocess transports, in the child."""
    results = []
    for event_loop in ("asyncio", "uvloop"):
        pool = await pool_for(event_loop=event_loop)
        task_id = f"tk-hiapi-{case}-{event_loop}"
        if SCRIPTS[case]:
            await fake.script(task_id, *SCRIPTS[case])
        result = await asyncio.wait_for(pool.fetch(task_id, now=1_000.0), BOUND_S)
        results.append((result.outcome, result.http_status, result.retry_after))
    assert results[0] == results[1]


_REFUSING_CHILD = """
import os, struct, sys
HEADER = struct.Struct("<BIHI")
kind, rid, small, length = HEADER.unpack(os.read(0, HEADER.size))
sys.exit(2)  # as a child of another frame protocol does, after reading its CONFIG
"""


async def test_a_child_that_never_takes_its_config_never_counts_as_available(
    fake: Fake, pool_for: Callable[..., Awaitable[PollWorkerPool]]
) -> None:
    """The poller holds its claims on `available`: a child restarting in a loop must not flip it."""
    metrics = Metrics(CollectorRegistry())
    pool = await pool_for(command=(sys.executable, "-c", _REFUSING_CHILD), metrics=metrics)
    seen_available = False

    def exits() -> float:
        return metrics.registry.get_sample_value("relay_poll_worker_exits_total") or 0.0

    async def watch_until_two_exits() -> None:
        nonlocal seen_available
        while exits() < 2:
            seen_available |= pool.available
            await asyncio.sleep(0.005)

    await asyncio.wait_for(watch_until_two_exits(), BOUND_S)
    assert not seen_available
    result = await pool.fetch("tk-hiapi-1", now=0.0)
    assert result.detail == "no poll worker running"
    assert fake.fake.stats()["perTask"].get("tk-hiapi-1", 0) == 0


async def test_an_overdue_poll_times_out_alone_while_its_child_keeps_answering(
    fake: Fake, pool_for: Callable[..., Awaitable[PollWorkerPool]]
) -> None:
    """A poll past the answer deadline ends as a timeout; a child that still talks is not killed."""
    pool = await pool_for(answer_timeout_s=0.5, timeout_s=5.0)
    (child,) = pool.children
    await fake.script("tk-hiapi-late", {"delayS": 3})
    late = asyncio.create_task(pool.fetch("tk-hiapi-late", now=0.0))
    answered = 0
    while not late.done():
        fast = await asyncio.wait_for(pool.fetch(f"tk-hiapi-f{answered}", now=0.0), BOUND_S)
        assert fast.outcome is PollOutcome.OK
        answered += 1
    result = late.result()
    assert (result.outcome, result.detail) == (
        PollOutcome.TIMEOUT,
        "no answer from the poll worker in time",
    )
    assert pool.children == (child,)
    assert not child.dying


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
async def test_close_delivers_every_answer_in_flight_even_large_ones(
    fake: Fake, pool_for: Callable[..., Awaitable[PollWorkerPool]], event_loop: str
) -> None:
    pool = await pool_for(event_loop=event_loop)
    blob = "x" * 700_000
    for i in range(4):
        task_id = f"tk-hiapi-big-{event_loop}-{i}"
        data = {"taskId": task_id, "status": "queued", "blob": blob}
        await fake.script(task_id, {"delayS": 0.3, "json": {"code": 200, "data": data}})
    polls = [
        asyncio.create_task(pool.fetch(f"tk-hiapi-big-{event_loop}-{i}", now=0.0)) for i in range(4)
    ]
    await _until(
        lambda: (
            sum(
                fake.fake.stats()["perTask"].get(f"tk-hiapi-big-{event_loop}-{i}", 0)
                for i in range(4)
            )
            == 4
        )
    )
    await asyncio.wait_for(pool.close(), BOUND_S)
    results = await asyncio.gather(*polls)
    assert [r.outcome for r in results] == [PollOutcome.OK] * 4
    assert all(r.snapshot is not None and r.snapshot.data["blob"] == blob for r in results)


async def test_a_poll_that_ends_while_waiting_for_its_retry_token_takes_no_token(
    fake: Fake, pool_for: Callable[..., Awaitable[PollWorkerPool]]
) -> None:
    pool = await pool_for(timeout_s=0.5)
    await fake.script("tk-hiapi-unpaid", {"reset": True}, {"reset": True})
    budget_open = asyncio.Event()
    taken = []

    async def gate() -> None:
        await budget_open.wait()
        taken.append(1)

    result = await asyncio.wait_for(
        pool.fetch("tk-hiapi-unpaid", now=0.0, before_retry=gate), BOUND_S
    )
    assert result.outcome is PollOutcome.TIMEOUT  # the child's own timeout ran out waiting
    budget_open.set()
    for _ in range(20):
        await asyncio.sleep(0)
    assert taken == []


async def test_a_batch_submitted_at_once_is_answered_once_per_poll_across_the_children(
    pool_for: Callable[..., Awaitable[PollWorkerPool]],
) -> None:
    pool = await pool_for(processes=2)
    answers: dict[int, Answer | PollResult] = {}
    twice: list[int] = []  # recorded, not asserted here: the pipe's callback would swallow it

    def deliver(batch: list[tuple[int, Answer | PollResult]]) -> None:
        for key, answer in batch:
            if key in answers:
                twice.append(key)
            answers[key] = answer

    async def gate() -> None:
        pass

    polls = [(key, f"tk-hiapi-batch-{key}") for key in range(40)]
    pool.submit(polls, before_retry=gate, deliver=deliver)
    assert {len(c.pending) for c in pool.children} == {20}  # spread evenly over both
    await _until(lambda: len(answers) == 40)
    await _until(lambda: not any(c.pending for c in pool.children))
    assert [] == twice
    assert all(isinstance(a, Answer) and a.http_status == 200 for a in answers.values())
