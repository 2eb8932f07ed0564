"""While no poll can be made at all (every poll worker down), the poller claims nothing: the
streams stay due, unharmed by backoff, and are polled once a worker is back."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from relay.models import NewWatch, PollOutcome, PollResult, TaskSnapshot, TaskStatus
from relay.store.sqlite import SQLiteStore
from relay.upstream import Answer, Deliver, RetryGate
from tests.pollers import make_poller

T0 = 1_700_000_000.0


class Switchable:
    """A PollTransport whose availability the test sets; it answers `queued` when asked."""

    def __init__(self) -> None:
        self.available = False
        self.fetched: list[str] = []

    def submit(
        self, polls: Sequence[tuple[int, str]], *, before_retry: RetryGate, deliver: Deliver
    ) -> None:
        assert self.available, "submit() while unavailable"
        answers: list[tuple[int, Answer | PollResult]] = []
        for key, task_id in polls:
            self.fetched.append(task_id)
            data = {"taskId": task_id, "status": "queued"}
            snapshot = TaskSnapshot(
                task_id=task_id, status=TaskStatus.QUEUED, raw_status="queued", data=data
            )
            answers.append((key, PollResult(outcome=PollOutcome.OK, snapshot=snapshot)))
        asyncio.get_running_loop().call_soon(deliver, answers)

    async def cancel_all(self) -> None:
        pass  # every poll is answered on the next loop turn


async def test_no_claim_while_the_transport_is_unavailable(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "relay.db"))
    await store.open()
    try:
        transport = Switchable()
        poller = make_poller(store, transport, clock=lambda: T0)
        new = NewWatch(task_id="tk-hiapi-held", callback_url="http://127.0.0.1:9/x", metadata=None)
        await store.register(new, watch_id="wt_held", now=T0, deadline_at=T0 + 3600)

        assert 0 == await poller.tick(T0 + 1)
        assert T0 == await store.next_poll_due_at()  # still due, not leased, not backed off
        assert T0 + 1 + 0.25 == await poller._next_due_at(T0 + 1)  # it looks again soon

        transport.available = True
        assert 1 == await poller.tick(T0 + 2)
        assert ["tk-hiapi-held"] == transport.fetched
    finally:
        await store.close()
