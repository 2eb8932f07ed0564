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
from relay.store.sqlite import SQLiteStore, rows_since
from tests.processes import locked

T0 = 1_700_000_000.0
HOUR = 3600.0
HOOK = "http://127.0.0.1:9/hook"


def new_watch(task_id: str) -> NewWatch:
    return NewWatch(task_id=task_id, callback_url=HOOK, metadata=None)


async def register(store: SQLiteStore, n: int) -> None:
    await store.register(
        new_watch(f"tk-{n}"), watch_id=f"wt_{n:06d}", now=T0, deadline_at=T0 + HOUR
    )


def count_thread_flushes(store: SQLiteStore) -> list[object]:
    """A list that grows by one each time a batch is handed to the writer thread."""
    handed: list[object] = []
    flush_on_thread = store._flush_on_thread

    def counting(loop: asyncio.AbstractEventLoop) -> None:
        handed.append(loop)
        flush_on_thread(loop)

    store._flush_on_thread = counting  # type: ignore[method-assign]
    return handed


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

    Were the loop to wait for the lock itself (busy_timeout 30 s), a tick of the ticker below
    would take 30 s, and the coroutine that releases the lock could not run meanwhile.
    """
    handed_to_thread = count_thread_flushes(store)
    loop = asyncio.get_running_loop()
    async with locked(tmp_path / "relay.db"):
        write = asyncio.create_task(register(store, 1))
        longest_tick = 0.0
        for _ in range(20):  # the write is tried on the loop, handed over, and waits
            before = loop.time()
            await asyncio.sleep(0.01)
            longest_tick = max(longest_tick, loop.time() - before)
        assert longest_tick < 5.0  # far below the 30 s a waiting loop would take
        assert 1 == len(handed_to_thread)
        assert not write.done()
        assert await store.get_watch("wt_000001") is None
    await asyncio.wait_for(write, 20)  # lock released: the thread's BEGIN goes through

    found = await store.get_watch("wt_000001")
    assert found is not None
    assert WatchState.WATCHING == found.state
    # And the next write commits on the loop again.
    await register(store, 2)
    assert 1 == len(handed_to_thread)
    assert await store.get_watch("wt_000002") is not None


async def wal_bytes_after_writes(path: Path) -> int:
    """The WAL file's size (its largest extent: SQLite reuses it, never shrinks it) after 80
    batches of 20 registrations (40 rows each)."""
    store = SQLiteStore(str(path))
    await store.open()
    try:
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
    checkpointed = await wal_bytes_after_writes(tmp_path / "a.db")
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY_ROWS", 10**9)
    never = await wal_bytes_after_writes(tmp_path / "b.db")

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


async def test_the_first_write_after_a_checkpoint_runs_on_the_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It may start the WAL over, which syncs the WAL's header even with synchronous=NORMAL;
    the writes after it are the loop's again."""
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY_ROWS", 10)
    store = SQLiteStore(str(tmp_path / "relay.db"))
    await store.open()
    try:
        handed_to_thread = count_thread_flushes(store)
        await asyncio.gather(*(register(store, n) for n in range(10)))  # 20 rows: one is due
        await store._run(lambda conn: None)  # behind the checkpoint on the thread
        assert store._wal_may_restart
        assert [] == handed_to_thread

        await register(store, 10)
        assert 1 == len(handed_to_thread)
        assert not store._wal_may_restart
        await register(store, 11)
        assert 1 == len(handed_to_thread)
    finally:
        await store.close()


async def test_with_synchronous_full_every_commit_runs_on_the_thread(tmp_path: Path) -> None:
    """FULL syncs the WAL at each commit: on the loop, every batch would stall it for a flush."""
    store = SQLiteStore(str(tmp_path / "relay.db"), synchronous="FULL")
    await store.open()
    try:
        handed_to_thread = count_thread_flushes(store)
        for n in range(3):
            await register(store, n)
        assert 3 == len(handed_to_thread)
        assert 3 == (await store.count_by_state())[WatchState.WATCHING]
    finally:
        await store.close()


def test_rows_since_the_last_checkpoint_survive_total_changes_wrapping() -> None:
    """sqlite3_total_changes() is a C int: past 2**31 rows it goes negative, and a plain
    difference would never reach the next checkpoint again (the WAL would grow without end)."""
    assert 1_000 == rows_since(1_500, 500)
    top = 2**31 - 1
    assert 1_000 == rows_since(-(2**31) + 499, top - 500)  # wrapped between the two
    assert 0 == rows_since(-5, -5)


async def test_a_file_that_cannot_take_wal_is_said_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The store works without WAL, but slower and with reads blocking commits: say so. (An
    in-memory database stands in for a file system without shared memory: neither takes WAL.)"""
    store = SQLiteStore(":memory:")
    with caplog.at_level("WARNING", logger="relay.store.sqlite"):
        await store.open()
    try:
        [record] = [r for r in caplog.records if r.getMessage() == "sqlite_not_wal"]
        assert "memory" == record.journal_mode
        await register(store, 1)  # and it still commits
    finally:
        await store.close()


async def test_a_wal_file_logs_no_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="relay.store.sqlite"):
        store = SQLiteStore(str(tmp_path / "relay.db"))
        await store.open()
        await store.close()
    assert [] == [r for r in caplog.records if r.getMessage() == "sqlite_not_wal"]
