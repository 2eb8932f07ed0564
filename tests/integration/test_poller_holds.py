"""While no poll can be made at all (every poll worker down), the poller claims nothing: the
streams stay due, unharmed by backoff, and are polled once a worker is back."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from relay.config import Settings
from relay.metrics import Metrics
from relay.models import NewWatch, PollOutcome, PollResult, TaskSnapshot, TaskStatus
from relay.policy import PollPolicy
from relay.poller import Poller
from relay.store.sqlite import SQLiteStore
from relay.upstream import RetryGate

T0 = 1_700_000_000.0


class Switchable:
    """A TaskFetcher whose availability the test sets; it answers `queued` when asked."""

    def __init__(self) -> None:
        self.available = False
        self.fetched: list[str] = []

    async def fetch(
        self, task_id: str, *, now: float, before_retry: RetryGate | None = None
    ) -> PollResult:
        assert self.available, "fetch() while unavailable"
        self.fetched.append(task_id)
        data = {"taskId": task_id, "status": "queued"}
        snapshot = TaskSnapshot(
            task_id=task_id, status=TaskStatus.QUEUED, raw_status="queued", data=data
        )
        return PollResult(outcome=PollOutcome.OK, snapshot=snapshot, http_status=200)


async def test_no_claim_while_the_fetcher_is_unavailable(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "relay.db"))
    await store.open()
    try:
        fetcher = Switchable()
        poller = Poller(
            store=store,
            fetcher=fetcher,
            metrics=Metrics(CollectorRegistry()),
            policy=PollPolicy.from_settings(Settings()),
            rps=100.0,
            concurrency=4,
            lease_s=60.0,
            clock=lambda: T0,
        )
        new = NewWatch(task_id="tk-hiapi-held", callback_url="http://127.0.0.1:9/x", metadata=None)
        await store.register(new, watch_id="wt_held", now=T0, deadline_at=T0 + 3600)

        assert 0 == await poller.tick(T0 + 1)
        assert T0 == await store.next_poll_due_at()  # still due, not leased, not backed off
        assert T0 + 1 + 0.25 == await poller._next_due_at(T0 + 1)  # it looks again soon

        fetcher.available = True
        assert 1 == await poller.tick(T0 + 2)
        assert ["tk-hiapi-held"] == fetcher.fetched
    finally:
        await store.close()
