"""The loop shape both the poller and the deliverer share."""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import CollectorRegistry

from relay.metrics import Metrics
from relay.workloop import IDLE_WAIT_S, WorkLoop


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
