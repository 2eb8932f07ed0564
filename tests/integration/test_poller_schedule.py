"""The poller's schedule against a real SQLite file: a passed watch deadline waits for the next
expiry turn instead of sending the loop round without a pause, and a claim that returns while a
stop cuts work short goes back to the store instead of being polled."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from relay.models import (
    NewWatch,
    PollOutcome,
    PollResult,
    TaskClaim,
    TaskSnapshot,
    TaskStatus,
    WatchState,
)
from relay.poller import EXPIRY_EVERY_S
from relay.store.sqlite import SQLiteStore
from relay.upstream import Answer, Deliver, RetryGate
from relay.workloop import DUE_BATCH_WINDOW_S
from tests.pollers import make_poller

T0 = 1_700_000_000.0
LEASE_S = 60.0
HOOK = "http://127.0.0.1:9/hook"


class Queued:
    """A PollTransport that answers `queued` on the next loop turn and remembers what it got."""

    available = True

    def __init__(self) -> None:
        self.fetched: list[str] = []

    def submit(
        self, polls: Sequence[tuple[int, str]], *, before_retry: RetryGate, deliver: Deliver
    ) -> None:
        answers: list[tuple[int, Answer | PollResult]] = []
        for key, task_id in polls:
            self.fetched.append(task_id)
            snapshot = TaskSnapshot(
                task_id=task_id,
                status=TaskStatus.QUEUED,
                raw_status="queued",
                data={"taskId": task_id, "status": "queued"},
            )
            answers.append((key, PollResult(outcome=PollOutcome.OK, snapshot=snapshot)))
        asyncio.get_running_loop().call_soon(deliver, answers)

    async def cancel_all(self) -> None:
        pass  # every poll is answered on the next loop turn


class GatedClaims(SQLiteStore):
    """A real SQLite store whose claims wait for the test to let them through."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.gate = asyncio.Event()
        self.claiming = asyncio.Event()

    async def claim_due_tasks(self, *, now: float, limit: int, lease_s: float) -> list[TaskClaim]:
        self.claiming.set()
        await self.gate.wait()
        return await super().claim_due_tasks(now=now, limit=limit, lease_s=lease_s)


async def register(store: SQLiteStore, task_id: str, *, deadline_at: float) -> None:
    new = NewWatch(task_id=task_id, callback_url=HOOK, metadata=None)
    await store.register(new, watch_id=f"wt_{task_id[-1]}", now=T0, deadline_at=deadline_at)


@pytest.fixture
async def store(tmp_path: Path) -> SQLiteStore:
    opened = SQLiteStore(str(tmp_path / "relay.db"))
    await opened.open()
    yield opened  # type: ignore[misc]
    await opened.close()


async def test_a_passed_deadline_waits_for_the_next_expiry_turn_then_expires(
    store: SQLiteStore,
) -> None:
    """Between a deadline and the next expiry turn the loop sleeps; the turn expires the watch.

    Before the fix the deadline counted as due now: a negative wait, and the loop went round
    with no pause until the turn (~3,000 empty claims in 0.8 s, measured).
    """
    clock = [T0]
    transport = Queued()
    poller = make_poller(store, transport, clock=lambda: clock[0], lease_s=LEASE_S)
    await register(store, "tk-hiapi-late-1", deadline_at=T0 + 0.2)
    await store.claim_due_tasks(now=T0, limit=10, lease_s=LEASE_S)  # its stream is leased
    assert 0 == await poller.expire(T0)  # nothing past its deadline yet

    clock[0] = T0 + 0.5  # past the deadline, before the next turn at T0 + EXPIRY_EVERY_S
    wait = await poller._run_once()

    assert pytest.approx(EXPIRY_EVERY_S - 0.5 + DUE_BATCH_WINDOW_S) == wait
    assert WatchState.WATCHING == (await store.get_watch("wt_1")).state  # type: ignore[union-attr]

    clock[0] = T0 + EXPIRY_EVERY_S
    await poller._run_once()

    expired = await store.get_watch("wt_1")
    assert expired is not None
    # Delivering with nothing polled: only the expiry can have moved it (task.timeout).
    assert (WatchState.DELIVERING, []) == (expired.state, transport.fetched)


@pytest.mark.parametrize(
    ("lease_s", "deadline_in_s", "wakes_in_s"),
    [
        (0.5, 3600.0, 0.5),  # the next poll first
        (2.5, 1.5, 1.5),  # a deadline after the next expiry turn: at the deadline
        (2.5, 0.2, EXPIRY_EVERY_S),  # a deadline before it: at the turn
        (2.5, 3600.0, 2.5),  # no deadline near: at the next poll
    ],
)
async def test_the_loop_wakes_for_the_next_poll_or_the_expiry_turn_a_deadline_needs(
    store: SQLiteStore, lease_s: float, deadline_in_s: float, wakes_in_s: float
) -> None:
    clock = [T0]
    poller = make_poller(store, Queued(), clock=lambda: clock[0], lease_s=LEASE_S)
    await register(store, "tk-hiapi-soon-1", deadline_at=T0 + deadline_in_s)
    await store.claim_due_tasks(now=T0, limit=10, lease_s=lease_s)  # next poll at T0 + lease_s
    await poller.expire(T0)

    assert T0 + wakes_in_s == await poller._next_due_at(T0 + 0.3)


async def test_a_claim_that_returns_while_a_stop_cuts_work_short_goes_back_unpolled(
    tmp_path: Path,
) -> None:
    """cancel_in_flight while the loop waits on its claim: the claim, once back, is handed back
    (due at once), never polled after the polls in flight were stopped."""
    gated = GatedClaims(str(tmp_path / "relay.db"))
    await gated.open()
    try:
        clock = [T0]
        transport = Queued()
        poller = make_poller(gated, transport, clock=lambda: clock[0], lease_s=LEASE_S)
        await register(gated, "tk-hiapi-cut-1", deadline_at=T0 + 3600)
        stopping = asyncio.Event()
        runner = asyncio.create_task(poller.run(stopping))
        await gated.claiming.wait()  # the loop is inside its claim

        await poller.cancel_in_flight()
        clock[0] = T0 + 1
        gated.gate.set()  # the claim goes through: the stream is leased...
        stopping.set()
        await asyncio.wait_for(runner, timeout=5)

        assert [] == transport.fetched  # ...and never polled
        assert T0 + 1 == await gated.next_poll_due_at()  # handed back: due now, not at T0 + 60
        assert 0 == poller.in_flight
    finally:
        await gated.close()


async def test_a_retry_during_a_claim_waits_for_a_token_the_claim_has_reserved(
    tmp_path: Path,
) -> None:
    """The claim reserves its budget before it reads the store: a retry asking for a token
    meanwhile waits for a later one, and the bucket never goes below zero."""
    gated = GatedClaims(str(tmp_path / "relay.db"))
    await gated.open()
    try:
        poller = make_poller(gated, Queued(), clock=lambda: T0, rps=20.0)  # a burst of 2 tokens
        for n in range(3):
            await register(gated, f"tk-hiapi-r{n}", deadline_at=T0 + 3600)
        claiming = asyncio.ensure_future(poller._claim(T0, 4))
        await gated.claiming.wait()  # the claim is reading the store

        retry = asyncio.ensure_future(poller._retry_token())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not retry.done()  # both tokens are the claim's
        gated.gate.set()
        claims = await claiming

        assert 2 == len(claims)
        assert 0 == poller._bucket.available(T0)
        assert poller._bucket.wait_s(T0) <= 1 / 20  # at zero, not below it
        retry.cancel()
    finally:
        await gated.close()
