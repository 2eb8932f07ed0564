"""The loop shape both the poller and the deliverer share."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from relay.metrics import Metrics
from relay.workloop import DUE_BATCH_WINDOW_S, IDLE_WAIT_S, WorkLoop


class WokenWhileLooking(WorkLoop[int]):
    """Finds nothing due; the first time, new work is announced while it reads the store."""

    name = "test"
    log = logging.getLogger("test.workloop")

    def __init__(self) -> None:
        super().__init__(metrics=Metrics(CollectorRegistry()), concurrency=4, clock=time.time)
        self.claims: list[float] = []
        self.second_claim = asyncio.Event()

    async def _claim(self, now: float, free: int) -> list[int]:
        self.claims.append(time.monotonic())
        if len(self.claims) == 2:
            self.second_claim.set()
        return []

    async def _next_due_at(self, now: float) -> float | None:
        if len(self.claims) == 1:
            self.wake()  # a registration committed just now, after the claim found nothing
        return None  # nothing scheduled: the loop would idle a whole IDLE_WAIT_S

    async def _handle(self, item: int) -> None:
        raise AssertionError("nothing is ever claimed")

    async def _hand_back(self, items: list[int], now: float) -> None:
        raise AssertionError("nothing is ever claimed")


async def test_a_wake_that_lands_while_the_loop_reads_the_store_is_not_lost() -> None:
    """wake() during an iteration's store reads starts the next iteration at once, not 1 s on."""
    loop = WokenWhileLooking()
    stopping = asyncio.Event()
    runner = asyncio.create_task(loop.run(stopping))
    try:
        # Bounded well under the idle wait: a lost wake would only be noticed after IDLE_WAIT_S.
        await asyncio.wait_for(loop.second_claim.wait(), IDLE_WAIT_S / 2)
    finally:
        stopping.set()
        await runner
    assert loop.claims[1] - loop.claims[0] < IDLE_WAIT_S / 2


class DueAt(WorkLoop[int]):
    """Nothing due now; the next item falls due `due_in` seconds after a fixed clock."""

    name = "test"
    log = logging.getLogger("test.workloop")

    def __init__(self, due_in: float) -> None:
        super().__init__(metrics=Metrics(CollectorRegistry()), concurrency=4, clock=lambda: 100.0)
        self.due_in = due_in

    async def _claim(self, now: float, free: int) -> list[int]:
        return []

    async def _next_due_at(self, now: float) -> float | None:
        return now + self.due_in

    async def _handle(self, item: int) -> None:
        raise AssertionError("nothing is ever claimed")

    async def _hand_back(self, items: list[int], now: float) -> None:
        raise AssertionError("nothing is ever claimed")


async def test_an_idle_loop_sleeps_past_the_next_due_time_to_claim_what_falls_due_with_it() -> None:
    """Items falling due within DUE_BATCH_WINDOW_S of each other are claimed in one go."""
    assert 0.25 + DUE_BATCH_WINDOW_S == await DueAt(0.25)._run_once()


async def test_work_already_overdue_is_claimed_without_waiting_for_the_window() -> None:
    assert -0.5 == await DueAt(-0.5)._run_once()


async def test_the_batching_window_never_stretches_the_idle_wait() -> None:
    assert IDLE_WAIT_S == await DueAt(5.0)._run_once()


class SlowItemsThenOneMore(WorkLoop[int]):
    """Claims 30 items that hang until released, then (after wake()) one more that is due."""

    name = "test"
    log = logging.getLogger("test.workloop")

    def __init__(self) -> None:
        super().__init__(metrics=Metrics(CollectorRegistry()), concurrency=32, clock=time.time)
        self.release = asyncio.Event()
        self.late_item_started = asyncio.Event()
        self.batches: list[list[int]] = [list(range(30)), [99]]

    async def _claim(self, now: float, free: int) -> list[int]:
        return self.batches.pop(0)[:free] if self.batches else []

    async def _next_due_at(self, now: float) -> float | None:
        return None

    async def _handle(self, item: int) -> None:
        if item == 99:
            self.late_item_started.set()
        await self.release.wait()

    async def _hand_back(self, items: list[int], now: float) -> None:
        pass


async def test_slow_items_in_flight_do_not_hold_back_work_due_for_the_free_slots() -> None:
    """30 of 32 slots hang; a new item (2 free slots, under a claim batch of 4) still starts
    within the batching window, not when the slow items end."""
    loop = SlowItemsThenOneMore()
    stopping = asyncio.Event()
    runner = asyncio.create_task(loop.run(stopping))
    try:
        while loop.in_flight < 30:
            await asyncio.sleep(0)
        loop.wake()  # the new item is registered
        # Bounded well under IDLE_WAIT_S: before the fix it waited for the slow items.
        await asyncio.wait_for(loop.late_item_started.wait(), IDLE_WAIT_S / 2)
    finally:
        loop.release.set()
        stopping.set()
        await runner


class HeldOpen(WorkLoop[int]):
    """Items 0..9 always due; each runs until the test releases it."""

    name = "test"
    log = logging.getLogger("test.workloop")

    def __init__(self, *, concurrency: int):
        super().__init__(
            metrics=Metrics(CollectorRegistry()), concurrency=concurrency, clock=time.time
        )
        self.due = list(range(10))
        self.asked: list[int] = []
        self.started: dict[int, int] = {}  # item -> claims made before it started
        self.release = {i: asyncio.Event() for i in self.due}
        self.handed_back: list[int] = []

    async def _claim(self, now: float, free: int) -> list[int]:
        self.asked.append(free)
        claimed, self.due = self.due[:free], self.due[free:]
        return claimed

    async def _next_due_at(self, now: float) -> float | None:
        return now if self.due else None

    async def _handle(self, item: int) -> None:
        self.started[item] = len(self.asked)
        await self.release[item].wait()

    async def _hand_back(self, items: list[int], now: float) -> None:
        self.handed_back += items


async def _until(condition: Callable[[], bool]) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0)

    await asyncio.wait_for(poll(), IDLE_WAIT_S / 2)


async def test_cancel_in_flight_hands_back_what_it_cut_short_and_ends_the_drain() -> None:
    loop = HeldOpen(concurrency=3)
    stopping = asyncio.Event()
    runner = asyncio.create_task(loop.run(stopping))
    await _until(lambda: len(loop.started) == 3)
    stopping.set()  # run() now waits for the three items, which never end by themselves
    await loop.cancel_in_flight()
    await asyncio.wait_for(runner, IDLE_WAIT_S / 2)
    assert [0, 1, 2] == sorted(loop.handed_back)
    assert 0 == loop.in_flight


async def test_items_cancelled_before_they_started_are_handed_back_too() -> None:
    """A claim launched in the same loop turn as the stop: its tasks never ran a step."""
    loop = HeldOpen(concurrency=3)
    await loop._start([0, 1, 2])  # launched; none has started yet
    await loop.cancel_in_flight()
    assert ([0, 1, 2], {}) == (sorted(loop.handed_back), loop.started)
    assert (0, 0) == (loop.in_flight, loop._active)


async def test_a_claim_back_after_the_stop_began_is_handed_back_not_started() -> None:
    loop = HeldOpen(concurrency=3)
    await loop.cancel_in_flight()
    assert False is await loop._start([4, 5])
    assert ([4, 5], {}, 0) == (loop.handed_back, loop.started, loop.in_flight)
