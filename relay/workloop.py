"""The shape both background loops share: claim due work, keep it in a bounded pool, idle until due.

`ClaimLoop` is the schedule: it claims up to `concurrency` items, hands them to `_launch`, and
sleeps until the next item falls due, a slot frees or `wake()` is called; it never holds an
asyncio task per idle watch. A subclass says how to claim (`_claim`), when work is next due
(`_next_due_at`), how to start items (`_launch`) and how to give back what a stop cut short.
`WorkLoop` runs each item in an asyncio task of its own (`_handle`): the deliverer's way. The
poller starts its polls in batches and handles their answers in batches (relay/poller.py).
`tick(now)` runs one whole iteration and waits for it, for tests.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from relay import logs
from relay.metrics import Metrics
from relay.store.base import StoreUnavailable

J = TypeVar("J")

IDLE_WAIT_S = 1.0
CLAIM_BATCH_DIVISOR = 8
# Idling until work falls due, the loop sleeps this much longer, so the items falling due meanwhile
# are claimed together: one claim transaction, and results written together, for many items
# instead of one each. Items run at most this late (the lag target is 100 ms).
DUE_BATCH_WINDOW_S = 0.01


class ClaimLoop(abc.ABC, Generic[J]):
    name: str
    log: logging.Logger

    def __init__(self, *, metrics: Metrics, concurrency: int, clock: Callable[[], float]) -> None:
        self._metrics = metrics
        self._concurrency = concurrency
        self._clock = clock
        # The wake-up: a flag, and the future the idle loop waits on (if it is idle). Cheaper per
        # finished item than an asyncio.Event raced against `stopping` with asyncio.wait.
        self._woken = False
        self._waiter: asyncio.Future[None] | None = None
        # Slots taken: items claimed whose part the concurrency bounds is not over yet.
        self._active = 0
        # A busy pool claims again once this many slots are free, not at every finished item:
        # one claim transaction per few items instead of one per item (half the store's work at
        # full speed). Fewer free slots are claimed for after DUE_BATCH_WINDOW_S at the latest,
        # so slow items never hold due work back for longer.
        self._claim_batch = max(1, concurrency // CLAIM_BATCH_DIVISOR)
        self._short_since: float | None = None
        # Set by cancel_in_flight: a claim still in progress then is handed back when it
        # returns, never launched after the work in flight was stopped.
        self._cutting_short = False

    @abc.abstractmethod
    async def _claim(self, now: float, free: int) -> list[J]:
        """Claim up to `free` items due by `now` (fewer if a budget says so)."""

    @abc.abstractmethod
    async def _next_due_at(self, now: float) -> float | None:
        """When the next item falls due (None: nothing scheduled)."""

    @abc.abstractmethod
    async def _hand_back(self, items: list[J], now: float) -> None:
        """Make items whose work a stop cut short due again at once, not when their lease ends."""

    @abc.abstractmethod
    def _launch(self, items: list[J]) -> None:
        """Start the claimed items; each slot is given back through `_slots_freed`."""

    @abc.abstractmethod
    async def _wait_in_flight(self) -> None:
        """Return once every item started has ended (its result recorded)."""

    @abc.abstractmethod
    async def _cancel_in_flight(self) -> None:
        """Stop what is still running and hand it back to the store."""

    async def cancel_in_flight(self) -> None:
        """Past the drain bound: stop what is still running and hand it back to the store; a
        claim that returns from now on is handed back too, not started.

        If the store cannot take it back now, the leases bring it back later: nothing is lost.
        """
        self._cutting_short = True
        await self._cancel_in_flight()

    @property
    @abc.abstractmethod
    def in_flight(self) -> int:
        """Items started and not yet ended."""

    def wake(self) -> None:
        """New work may be due now: stop idling."""
        self._woken = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def tick(self, now: float) -> int:
        """One iteration at `now`: claim what is due and wait for all of it; return the count."""
        items = await self._claim(now, self._concurrency)
        await self._start(items)
        await self._wait_in_flight()
        return len(items)

    async def run(self, stopping: asyncio.Event) -> None:
        """Work until `stopping` is set, then wait for in-flight items (the caller bounds that)."""
        stop_watch = asyncio.create_task(self._wake_on(stopping))
        try:
            while not stopping.is_set():
                # Cleared before looking for work, never after: a wake() that lands while this
                # iteration reads the store (a task just finished, a watch just registered) must
                # cut the coming sleep short, not be lost to it.
                self._woken = False
                try:
                    wait = await self._run_once()
                except StoreUnavailable as exc:
                    self._store_unavailable(exc)
                    wait = IDLE_WAIT_S
                await self._sleep(wait)
        finally:
            stop_watch.cancel()
        await self._wait_in_flight()

    async def _wake_on(self, stopping: asyncio.Event) -> None:
        await stopping.wait()
        self.wake()

    async def _run_once(self) -> float:
        now = self._clock()
        free = self._concurrency - self._active
        if free <= 0:
            return IDLE_WAIT_S  # a finishing item wakes this loop
        if self._active and free < self._claim_batch:
            if self._short_since is None:
                self._short_since = now
            wait = self._short_since + DUE_BATCH_WINDOW_S - now
            if wait > 0:
                return wait  # or sooner: a batch's worth of finishing items wakes this loop
        self._short_since = None
        items = await self._claim(now, free)
        if not await self._start(items):
            return IDLE_WAIT_S  # stopping: the run task is about to be cancelled
        if items and len(items) == free:
            return 0.0  # the pool is full; go round, and wait for a finishing item there
        if self._active >= self._concurrency:
            return IDLE_WAIT_S  # a finishing item wakes this loop
        due = await self._next_due_at(now)
        if due is None:
            return IDLE_WAIT_S
        wait = due - self._clock()
        return min(IDLE_WAIT_S, wait + DUE_BATCH_WINDOW_S if wait > 0 else wait)

    async def _start(self, items: list[J]) -> bool:
        """Launch claimed items; False if a stop is cutting work short (they went back)."""
        if self._cutting_short:
            await self._hand_back_cut_short(items)
            return False
        if items:
            self._active += len(items)
            self._launch(items)
        return True

    async def _sleep(self, seconds: float) -> None:
        """Idle up to `seconds`, or until wake()."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        if self._woken:
            return
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(seconds, _resolve, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _slots_freed(self, count: int = 1) -> None:
        before = self._concurrency - self._active
        self._active -= count
        free = before + count
        # A busy pool claims once a batch's worth of slots is free (see _run_once): waking it
        # for less would only send it back to sleep. A full pool's first free slot does wake
        # it, to start the DUE_BATCH_WINDOW_S it waits at most for the rest of the batch.
        if free >= self._claim_batch or before <= 0:
            self.wake()

    def _store_unavailable(self, exc: StoreUnavailable) -> None:
        self._metrics.store_errors.inc()
        logs.event(self.log, "store_unavailable", logging.ERROR, loop=self.name, detail=str(exc))

    def _item_crashed(self) -> None:
        """Log the exception being handled: a bug, counted, and the loop goes on."""
        self._metrics.loop_errors.labels(self.name).inc()
        self.log.exception("work_item_crashed", extra={"loop": self.name})

    async def _hand_back_cut_short(self, items: list[J]) -> None:
        if not items:
            return
        try:
            await self._hand_back(items, self._clock())
        except StoreUnavailable as exc:
            self._store_unavailable(exc)
        logs.event(self.log, "work_handed_back", logging.WARNING, count=len(items))


class WorkLoop(ClaimLoop[J]):
    """A ClaimLoop that runs each item in an asyncio task of its own."""

    def __init__(self, *, metrics: Metrics, concurrency: int, clock: Callable[[], float]) -> None:
        super().__init__(metrics=metrics, concurrency=concurrency, clock=clock)
        self._in_flight: dict[asyncio.Task[None], J] = {}
        self._cut_short: list[J] = []

    @abc.abstractmethod
    async def _handle(self, item: J) -> None:
        """Do one item and record its result."""

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def _launch(self, items: list[J]) -> None:
        for item in items:
            task = asyncio.create_task(self._handle_guarded(item))
            self._in_flight[task] = item
            task.add_done_callback(self._item_done)

    async def _wait_in_flight(self) -> None:
        while self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)

    async def _cancel_in_flight(self) -> None:
        for task in self._in_flight:
            task.cancel()
        await self._wait_in_flight()
        cut_short, self._cut_short = self._cut_short, []  # filled in as each task ended
        await self._hand_back_cut_short(cut_short)

    async def _handle_guarded(self, item: J) -> None:
        try:
            await self._handle(item)
        except StoreUnavailable as exc:
            # The item's lease runs out and it falls due again: nothing is lost.
            self._store_unavailable(exc)
        except Exception:
            self._item_crashed()

    def _item_done(self, task: asyncio.Task[None]) -> None:
        # A done-callback, not a finally: it also runs for a task cancelled before it started,
        # whose item must go back to the store as surely as one cut short halfway.
        item = self._in_flight.pop(task)
        if task.cancelled():
            self._cut_short.append(item)
        self._slots_freed()


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
