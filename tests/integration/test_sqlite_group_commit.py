"""SQLite group commit: writes that wait together commit together, and a failing one fails alone.

Writes queued during one turn of the event loop are one batch: the flush runs after that turn.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import pytest

from relay.models import NewWatch, WatchState
from relay.store import StoreConflict
from relay.store.sqlite import SQLiteStore

T0 = 1_700_000_000.0
HOUR = 3600.0
HOOK = "http://127.0.0.1:9/hook"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    opened = SQLiteStore(str(tmp_path / "relay.db"))
    await opened.open()
    yield opened
    await opened.close()


def register(store: SQLiteStore, watch_id: str, task_id: str) -> Awaitable[Any]:
    return store.register(
        NewWatch(task_id=task_id, callback_url=HOOK, metadata=None),
        watch_id=watch_id,
        now=T0,
        deadline_at=T0 + HOUR,
    )


async def one_batch(store: SQLiteStore, *writes: Awaitable[Any]) -> list[Any]:
    """Queue every write in one turn of the loop; the flush after that turn commits them."""
    tasks = [asyncio.ensure_future(w) for w in writes]
    await asyncio.sleep(0)  # each task runs up to its first await: its write is queued
    assert len(writes) == len(store._pending), "the writes must wait as one batch"
    return await asyncio.gather(*tasks, return_exceptions=True)


async def test_writes_queued_together_each_get_their_own_result(store: SQLiteStore) -> None:
    outcomes = await one_batch(store, *(register(store, f"wt_{i}", f"tk-{i}") for i in range(5)))

    assert [f"wt_{i}" for i in range(5)] == [watch.watch_id for watch, _ in outcomes]
    assert all(created for _, created in outcomes)
    for i in range(5):
        found = await store.get_watch(f"wt_{i}")
        assert found is not None
        assert WatchState.WATCHING == found.state


async def test_a_failing_write_undoes_only_its_own_changes_and_the_rest_commit(
    store: SQLiteStore,
) -> None:
    await register(store, "wt_taken", "tk-0")

    def half_done_then_fails(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO tasks (task_id, next_poll_at, updated_at) VALUES ('tk-half', 0, 0)"
        )
        raise ValueError("failed after its first statement")

    outcomes = await one_batch(
        store,
        register(store, "wt_1", "tk-1"),
        store._write(half_done_then_fails),
        register(store, "wt_taken", "tk-2"),  # the id is taken: a conflict
        store.redeliver("wt_1", now=T0 + 1),  # watching, not delivered: a conflict
        register(store, "wt_3", "tk-3"),
    )

    first, failed, taken, redelivered, last = outcomes
    assert isinstance(failed, ValueError)
    assert isinstance(taken, StoreConflict)
    assert isinstance(redelivered, StoreConflict)
    assert ("wt_1", True) == (first[0].watch_id, first[1])
    assert ("wt_3", True) == (last[0].watch_id, last[1])
    # Committed: a new connection sees both registrations and none of the failed writes.
    with sqlite3.connect(store._path) as conn:
        tasks = {row[0] for row in conn.execute("SELECT task_id FROM tasks")}
        watches = dict(conn.execute("SELECT watch_id, task_id FROM watches").fetchall())
    assert {"tk-0", "tk-1", "tk-3"} == tasks
    assert {"wt_taken": "tk-0", "wt_1": "tk-1", "wt_3": "tk-3"} == watches


async def test_a_write_raising_stopiteration_fails_alone_and_leaves_no_caller_waiting(
    store: SQLiteStore,
) -> None:
    """A future refuses StopIteration as its exception (TypeError): settling the batch used to
    stop there, and every caller after that one waited forever."""

    def stops(conn: sqlite3.Connection) -> None:
        raise StopIteration

    outcomes = await asyncio.wait_for(
        one_batch(store, store._write(stops), register(store, "wt_1", "tk-1")), 5
    )

    failed, registered = outcomes
    assert isinstance(failed, RuntimeError)
    assert isinstance(failed.__cause__, StopIteration)
    assert ("wt_1", True) == (registered[0].watch_id, registered[1])
