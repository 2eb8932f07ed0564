"""The poller's batches: polls go to the transport together, answers come back together and are
written with one store call; a slot frees when its answer is in; a stop waits for answers and
their writes, and past its bound hands unanswered polls back. A real SQLite file throughout."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

from relay.models import (
    NewWatch,
    PollOutcome,
    PollResult,
    TaskFinish,
    TaskSnapshot,
    TaskStatus,
    TaskUpdate,
)
from relay.store.sqlite import SQLiteStore
from relay.upstream import Answer, Deliver, RetryGate
from tests.pollers import make_poller

T0 = 1_700_000_000.0
NOW = T0 + 1
BOUND_S = 5.0  # bounds every wait; none is needed for a passing test to pass


class HeldTransport:
    """A PollTransport that answers when the test says, all the answers it is told in one call."""

    available = True

    def __init__(self) -> None:
        self.polls: dict[int, str] = {}  # key -> task id, unanswered
        self.submitted: list[str] = []
        self.cancelled = 0
        self._deliver: Deliver | None = None

    def submit(
        self, polls: Sequence[tuple[int, str]], *, before_retry: RetryGate, deliver: Deliver
    ) -> None:
        for key, task_id in polls:
            self.polls[key] = task_id
            self.submitted.append(task_id)
        self._deliver = deliver

    def answer(self, status: str = "queued", *, first: str | None = None) -> None:
        """Answer every poll in one delivery: `status`, the oldest `first` if given."""
        assert self._deliver is not None
        answers = []
        for n, key in enumerate(list(self.polls)):
            said = first if n == 0 and first is not None else status
            answers.append((key, _answer(self.polls.pop(key), said)))
        self._deliver(answers)

    def deliver_late(self, keys: list[int]) -> None:
        """Answers for polls the poller no longer waits for."""
        assert self._deliver is not None
        self._deliver([(key, _answer("tk-hiapi-late", "queued")) for key in keys])

    async def cancel_all(self) -> None:
        self.cancelled += 1
        self.polls.clear()


def _answer(task_id: str, status: str) -> Answer | PollResult:
    data = {"taskId": task_id, "status": status}
    snapshot = TaskSnapshot(
        task_id=task_id, status=TaskStatus(status), raw_status=status, data=data
    )
    return PollResult(outcome=PollOutcome.OK, snapshot=snapshot, http_status=200)


class CountingStore(SQLiteStore):
    """The SQLite store, with each apply_poll_results call recorded and, when gated, held."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.applied: list[list[str]] = []
        self.gate: asyncio.Event | None = None

    async def apply_poll_results(
        self, plans: Sequence[TaskUpdate | TaskFinish], *, now: float
    ) -> int:
        self.applied.append([p.task_id for p in plans])
        if self.gate is not None:
            await self.gate.wait()
        return await super().apply_poll_results(plans, now=now)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[CountingStore]:
    store = CountingStore(str(tmp_path / "relay.db"))
    await store.open()
    yield store
    await store.close()


async def _watch(store: SQLiteStore, count: int) -> list[str]:
    task_ids = [f"tk-hiapi-batch-{n}" for n in range(count)]
    for n, task_id in enumerate(task_ids):
        new = NewWatch(task_id=task_id, callback_url="http://127.0.0.1:9/x", metadata=None)
        await store.register(new, watch_id=f"wt_{n}", now=T0, deadline_at=T0 + 3600)
    return task_ids


def _polls_made(path: str) -> dict[str, int]:
    with sqlite3.connect(path) as conn:
        return dict(conn.execute("SELECT task_id, polls FROM tasks").fetchall())


async def _until(condition: Callable[[], bool]) -> None:
    async def wait() -> None:
        while not condition():
            await asyncio.sleep(0)

    await asyncio.wait_for(wait(), BOUND_S)


async def test_answers_that_come_together_are_written_with_one_store_call(
    store: CountingStore, tmp_path: Path
) -> None:
    task_ids = await _watch(store, 10)
    transport = HeldTransport()
    poller = make_poller(store, transport, clock=lambda: NOW, concurrency=16, rps=1000.0)
    tick = asyncio.create_task(poller.tick(NOW))
    await _until(lambda: len(transport.polls) == 10)
    assert sorted(task_ids) == sorted(transport.submitted)  # one submit, all ten
    transport.answer()
    assert 10 == await asyncio.wait_for(tick, BOUND_S)
    assert [sorted(task_ids)] == [sorted(call) for call in store.applied]
    assert dict.fromkeys(task_ids, 1) == _polls_made(str(tmp_path / "relay.db"))


async def test_a_poll_frees_its_slot_when_its_answer_is_in_before_its_write(
    store: CountingStore,
) -> None:
    await _watch(store, 3)
    store.gate = asyncio.Event()  # no write completes until the test says
    transport = HeldTransport()
    poller = make_poller(store, transport, clock=lambda: NOW, concurrency=1, rps=1000.0)
    stopping = asyncio.Event()
    runner = asyncio.create_task(poller.run(stopping))
    try:
        await _until(lambda: len(transport.submitted) == 1)
        transport.answer()
        # The first write is held, and still the one slot takes the next poll.
        await _until(lambda: len(transport.submitted) == 2)
        assert 1 == len(store.applied)
        assert 2 == poller.in_flight  # one answered and not written, one on the wire
    finally:
        stopping.set()
        store.gate.set()
        transport.answer()
        await asyncio.wait_for(runner, BOUND_S)
    assert 0 == poller.in_flight


async def test_a_stop_waits_for_the_answers_and_their_writes(
    store: CountingStore, tmp_path: Path
) -> None:
    task_ids = await _watch(store, 4)
    transport = HeldTransport()
    poller = make_poller(store, transport, clock=lambda: NOW, concurrency=8, rps=1000.0)
    stopping = asyncio.Event()
    runner = asyncio.create_task(poller.run(stopping))
    await _until(lambda: len(transport.polls) == 4)
    stopping.set()
    await _until(lambda: bool(poller._idle_waiters))  # run() is waiting for the drain
    assert not runner.done()  # four polls are still on the wire
    transport.answer()
    await asyncio.wait_for(runner, BOUND_S)
    assert dict.fromkeys(task_ids, 1) == _polls_made(str(tmp_path / "relay.db"))


async def test_past_the_drain_bound_unanswered_polls_are_handed_back(
    store: CountingStore,
) -> None:
    await _watch(store, 3)
    transport = HeldTransport()
    poller = make_poller(store, transport, clock=lambda: NOW, concurrency=8, rps=1000.0)
    stopping = asyncio.Event()
    runner = asyncio.create_task(poller.run(stopping))
    await _until(lambda: len(transport.polls) == 3)
    keys = list(transport.polls)
    assert NOW + 60.0 == await store.next_poll_due_at()  # all three leased
    stopping.set()
    await _until(lambda: bool(poller._idle_waiters))  # run() is waiting for the drain
    await poller.cancel_in_flight()
    await asyncio.wait_for(runner, BOUND_S)
    assert 1 == transport.cancelled
    assert NOW == await store.next_poll_due_at()  # due again at once, not when the lease ends
    transport.deliver_late(keys)  # an answer that comes after all is ignored
    await asyncio.sleep(0)
    assert [] == store.applied
    assert (0, 0, 0) == (poller.in_flight, poller._active, poller._requests_in_flight)


async def test_a_finished_task_in_a_batch_moves_its_watch_and_the_others_are_updated(
    store: CountingStore, tmp_path: Path
) -> None:
    task_ids = await _watch(store, 3)
    transport = HeldTransport()
    finished: list[int] = []
    poller = make_poller(
        store,
        transport,
        clock=lambda: NOW,
        concurrency=8,
        rps=1000.0,
        on_finished=lambda: finished.append(1),
    )
    tick = asyncio.create_task(poller.tick(NOW))
    await _until(lambda: len(transport.polls) == 3)
    first = next(iter(transport.polls))
    finishing = transport.polls[first]
    transport.answer("handling", first="success")  # one batch: a finish and two updates
    assert 3 == await asyncio.wait_for(tick, BOUND_S)
    assert [1] == finished
    watch = await store.get_watch(f"wt_{task_ids.index(finishing)}")
    assert watch is not None
    assert "delivering" == watch.state.value
    left = _polls_made(str(tmp_path / "relay.db"))
    assert {t: 1 for t in task_ids if t != finishing} == left  # the finished task's row is gone


async def test_a_crash_after_a_finish_is_written_leaves_the_other_finishes_to_their_writes(
    store: CountingStore,
) -> None:
    """The bookkeeping after each finish (log, metric, the deliverer's wake) failing is a bug,
    counted; it does not keep the batch's other finishes from being written."""
    task_ids = await _watch(store, 3)
    transport = HeldTransport()

    def crash() -> None:
        raise RuntimeError("a bug in the deliverer's wake")

    poller = make_poller(
        store, transport, clock=lambda: NOW, concurrency=8, rps=1000.0, on_finished=crash
    )
    tick = asyncio.create_task(poller.tick(NOW))
    await _until(lambda: len(transport.polls) == 3)
    transport.answer("success")  # one batch, three finishes
    assert 3 == await asyncio.wait_for(tick, BOUND_S)

    states = [await store.get_watch(f"wt_{n}") for n in range(len(task_ids))]
    assert ["delivering"] * 3 == [w.state.value for w in states if w is not None]
    errors = poller._metrics.loop_errors.labels("poll")._value.get()
    assert 3 == errors


async def test_while_the_key_is_rejected_one_probe_is_out_at_a_time(
    store: CountingStore,
) -> None:
    """After the pause, the loop sends one probe and waits for its answer: not one more at each
    of its turns until the first 401 comes back."""
    await _watch(store, 5)
    transport = HeldTransport()
    clock = [NOW]
    poller = make_poller(store, transport, clock=lambda: clock[0], concurrency=8, rps=1000.0)
    stopping = asyncio.Event()
    runner = asyncio.create_task(poller.run(stopping))
    try:
        await _until(lambda: len(transport.polls) == 5)
        rejected = PollResult(outcome=PollOutcome.AUTH_ERROR, http_status=401, detail="HTTP 401")
        assert transport._deliver is not None
        transport._deliver([(key, rejected) for key in list(transport.polls)])
        transport.polls.clear()
        await _until(lambda: poller._waiter is not None and not poller.in_flight)  # paused

        clock[0] = NOW + 60  # past the pause and every stream's backoff: all five are due
        poller.wake()
        await _until(lambda: len(transport.submitted) == 6)  # the probe
        await _until(lambda: poller._waiter is not None)  # the loop idles, the probe out

        assert 6 == len(transport.submitted)
    finally:
        stopping.set()
        poller.wake()
        await poller.cancel_in_flight()
        await asyncio.wait_for(runner, BOUND_S)
