"""UpdateBatch: concurrent poll results share one store write, each caller resumes once stored."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from relay.batching import UpdateBatch
from relay.models import NewWatch, TaskFinish, TaskUpdate
from relay.store.base import StoreUnavailable
from relay.store.sqlite import SQLiteStore

T0 = 1_700_000_000.0


class CountingStore(SQLiteStore):
    """The real SQLite store, counting apply_poll_results calls and failing on request."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.calls: list[int] = []
        self.fail = False

    async def apply_poll_results(
        self, plans: Sequence[TaskUpdate | TaskFinish], *, now: float
    ) -> int:
        self.calls.append(len(plans))
        if self.fail:
            raise StoreUnavailable("sqlite: disk I/O error")
        return await super().apply_poll_results(plans, now=now)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[CountingStore]:
    opened = CountingStore(str(tmp_path / "relay.db"))
    await opened.open()
    for n in range(10):
        await opened.register(
            NewWatch(task_id=f"tk-hiapi-{n}", callback_url="http://127.0.0.1:9/", metadata=None),
            watch_id=f"wt_{n}",
            now=T0,
            deadline_at=T0 + 3600,
        )
    yield opened
    await opened.close()


def update(n: int) -> TaskUpdate:
    return TaskUpdate(
        task_id=f"tk-hiapi-{n}",
        status="handling",
        next_poll_at=T0 + 100 + n,
        interval=2.0,
        error_streak=0,
        first_not_found_at=None,
        last_error=None,
    )


async def test_ten_concurrent_results_are_written_in_one_call(store: CountingStore) -> None:
    """Ten polls finishing in one loop turn cost one store write, and every update is kept."""
    batch = UpdateBatch(store)
    await asyncio.gather(*(batch.apply(update(n), now=T0 + 1) for n in range(10)))

    assert [10] == store.calls
    claims = await store.claim_due_tasks(now=T0 + 200, limit=20, lease_s=30)
    assert [T0 + 100 + n for n in range(10)] == [c.due_at for c in claims]
    assert {1} == {c.polls for c in claims}


async def test_results_arriving_during_a_write_go_in_the_next_one(store: CountingStore) -> None:
    """A result that comes while a write is in flight is written next, by a new leader."""
    batch = UpdateBatch(store)
    first = asyncio.ensure_future(batch.apply(update(0), now=T0 + 1))
    await asyncio.sleep(0.01)  # the first write is under way on the store's thread
    await asyncio.gather(first, *(batch.apply(update(n), now=T0 + 1) for n in range(1, 4)))

    assert [1, 3] == store.calls


async def test_a_failed_write_fails_every_caller_of_it(store: CountingStore) -> None:
    """If the store cannot take the batch, each caller gets the error (its lease brings it back)."""
    store.fail = True
    batch = UpdateBatch(store)
    results = await asyncio.gather(
        *(batch.apply(update(n), now=T0 + 1) for n in range(5)), return_exceptions=True
    )
    assert 5 * [StoreUnavailable] == [type(r) for r in results]
    store.fail = False
    await batch.apply(update(0), now=T0 + 2)  # the batch works again afterwards
    assert [5, 1] == store.calls
