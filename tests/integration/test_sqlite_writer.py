"""Where the SQLite store's writes run: on the event loop, and on the writer thread for whatever
could block (another process's lock, WAL checkpoints, a close with writes still queued)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.models import NewWatch, WatchState
from relay.store import StoreUnavailable
from relay.store import sqlite as sqlite_store
from relay.store.sqlite import SQLiteStore
from tests.processes import locked, settle

T0 = 1_700_000_000.0
HOUR = 3600.0
HOOK = "http://127.0.0.1:9/hook"


def new_watch(task_id: str) -> NewWatch:
    return NewWatch(task_id=task_id, callback_url=HOOK, metadata=None)


async def register(store: SQLiteStore, n: int) -> None:
    await store.register(
        new_watch(f"tk-{n}"), watch_id=f"wt_{n:06d}", now=T0, deadline_at=T0 + HOUR
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    # A lock not given up within 30 s fails the write: far beyond this test's waits.
    opened = SQLiteStore(str(tmp_path / "relay.db"), busy_timeout_ms=30_000)
    await opened.open()
    yield opened
    await opened.close()


async def test_a_write_waits_out_another_processes_lock_while_the_loop_runs_on(
    store: SQLiteStore, tmp_path: Path
) -> None:
    """The loop's attempt gives up at once; the writer thread waits for the lock; it commits.

    Were the loop to wait for the lock itself, this coroutine could not go on to release it:
    the write would fail after 30 s, and the test with it.
    """
    async with locked(tmp_path / "relay.db"):
        write = asyncio.create_task(register(store, 1))

        async def handed_to_thread() -> bool:
            return store._thread_jobs > 0

        assert await settle(handed_to_thread, True, timeout=10)
        await asyncio.sleep(0.2)  # the loop turns meanwhile; the write still waits
        assert not write.done()
        assert await store.get_watch("wt_000001") is None
    await asyncio.wait_for(write, 20)  # lock released: the thread's BEGIN goes through

    found = await store.get_watch("wt_000001")
    assert found is not None
    assert WatchState.WATCHING == found.state
    # And the next write is the loop's again.
    await register(store, 2)
    assert 0 == store._thread_jobs


async def wal_bytes_after_writes(path: Path, checkpoint_every_rows: int) -> int:
    """The WAL file's size (its largest extent: SQLite reuses it, never shrinks it) after 80
    batches of 20 registrations (40 rows each)."""
    store = SQLiteStore(str(path))
    await store.open()
    try:
        store._checkpoint_at_changes = checkpoint_every_rows
        for batch in range(80):
            await asyncio.gather(*(register(store, batch * 20 + i) for i in range(20)))
        await store._run(lambda conn: None)  # behind any checkpoint still on the thread
        return Path(f"{path}-wal").stat().st_size
    finally:
        await store.close()


async def test_checkpoints_on_the_writer_thread_keep_the_wal_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection checkpoints nothing at commit (that would stall the loop): without the
    thread's checkpoints, the WAL would hold every batch ever written."""
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY_ROWS", 100)
    checkpointed = await wal_bytes_after_writes(tmp_path / "a.db", 100)
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY_ROWS", 10**9)
    never = await wal_bytes_after_writes(tmp_path / "b.db", 10**9)

    assert checkpointed * 8 < never, (checkpointed, never)


async def test_writes_queued_when_close_begins_still_commit(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "relay.db"))
    await store.open()
    writes = [asyncio.ensure_future(register(store, n)) for n in range(5)]
    await asyncio.sleep(0)  # queued, their flush not run yet
    assert 5 == len(store._pending)

    await store.close()
    await asyncio.gather(*writes)
    with pytest.raises(StoreUnavailable):
        await register(store, 6)

    reopened = SQLiteStore(str(tmp_path / "relay.db"))
    await reopened.open()
    try:
        assert 5 == (await reopened.count_by_state())[WatchState.WATCHING]
    finally:
        await reopened.close()
