"""SQLite picks the index these queries were written for: with watches_state instead, each one
walks every active watch, and its cost grows with the backlog (2.1 ms per query at 5,000
waiting callbacks; seconds at 1M watches). Checked on the statements the store really runs."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from relay.models import EventType, NewWatch, TaskFinish
from relay.store.sqlite import SQLiteStore

T0 = 1_700_000_000.0


async def _store_with_waiting_callbacks(path: Path, count: int) -> SQLiteStore:
    store = SQLiteStore(str(path))
    await store.open()
    for n in range(count):
        task = f"tk-hiapi-plan-{n}"
        new = NewWatch(task_id=task, callback_url="http://127.0.0.1:9/h", metadata=None)
        await store.register(new, watch_id=f"wt_{n:04d}", now=T0, deadline_at=T0 + 3600)
        if n % 2 == 0:  # half delivering, half still watching
            finish = TaskFinish(
                task_id=task, event_type=EventType.SUCCESS, task_data={}, status="success"
            )
            await store.apply_poll_results([finish], now=T0 + 1)
    return store


def _plans(path: Path, statements: list[str], needle: str) -> list[str]:
    """EXPLAIN QUERY PLAN of each traced SELECT that mentions `needle`."""
    conn = sqlite3.connect(path)
    try:
        return [
            " / ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
            for sql in statements
            if sql.lstrip().upper().startswith("SELECT") and needle in sql
        ]
    finally:
        conn.close()


async def test_the_delivery_claim_and_next_due_time_read_the_due_index(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    store = await _store_with_waiting_callbacks(path, 200)
    statements: list[str] = []
    try:
        await store.next_delivery_due_at()  # the reader connection exists from here on
        store._connection().set_trace_callback(statements.append)
        assert store._read_conn is not None
        store._read_conn.set_trace_callback(statements.append)
        assert await store.claim_due_deliveries(now=T0 + 2, limit=10, lease_s=30)
        assert await store.next_delivery_due_at() == T0 + 1
    finally:
        await store.close()

    plans = _plans(path, statements, "next_delivery_at")
    assert 2 == len(plans), statements
    for plan in plans:
        assert "watches_delivery_due" in plan, plan
        assert "TEMP B-TREE" not in plan, plan  # no sort of every waiting callback
