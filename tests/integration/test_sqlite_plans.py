"""SQLite picks the index these queries were written for: with watches_state instead, each one
walks every active watch, and its cost grows with the backlog (2.1 ms per query at 5,000
waiting callbacks; 17 ms per finished task at 100k watches, seconds at 1M). Checked on the
statements the store really runs."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from relay.models import (
    DeliveryOutcome,
    DeliveryRecord,
    EventType,
    NewWatch,
    TaskFinish,
    TaskUpdate,
)
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


def _explain_all(path: Path, statements: list[str]) -> dict[str, str]:
    """Each traced statement's EXPLAIN QUERY PLAN (transaction control and pragmas left out)."""
    skip = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "PRAGMA")
    conn = sqlite3.connect(path)
    try:
        return {
            sql: " / ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
            for sql in statements
            if not sql.lstrip().upper().startswith(skip)
        }
    finally:
        conn.close()


async def test_no_statement_of_a_watchs_life_walks_the_watches(tmp_path: Path) -> None:
    """Every statement the poller, the deliverer and the API's single-watch calls run finds its
    rows through an index on what it looks for: none walks watches_state (every watch in a
    state) or scans a table. Listing and counting watches by state are the API's and the
    gauges' business, and are left out."""
    path = tmp_path / "relay.db"
    store = SQLiteStore(str(path))
    await store.open()
    await store.next_delivery_due_at()  # the reader connection exists from here on
    statements: list[str] = []
    store._connection().set_trace_callback(statements.append)
    assert store._read_conn is not None
    store._read_conn.set_trace_callback(statements.append)
    hook = "http://127.0.0.1:9/h"
    try:
        for n in range(4):
            for url in (hook, f"{hook}{n}"):  # two watches share each task's stream
                new = NewWatch(task_id=f"tk-{n}", callback_url=url, metadata=None)
                await store.register(
                    new, watch_id=f"wt_{n}_{len(url)}", now=T0, deadline_at=T0 + 60
                )
        await store.register(
            NewWatch(task_id="tk-0", callback_url=hook, metadata=None),
            watch_id="wt_again",
            now=T0,
            deadline_at=T0 + 60,
        )
        claims = await store.claim_due_tasks(now=T0, limit=10, lease_s=30)
        assert 4 == len(claims)
        by_task = {c.task_id: c for c in claims}
        update = TaskUpdate(
            task_id="tk-1",
            status="running",
            next_poll_at=T0 + 5,
            interval=5,
            error_streak=0,
            first_not_found_at=None,
            last_error=None,
            lease_until=by_task["tk-1"].lease_until,
        )
        finish = TaskFinish(task_id="tk-0", event_type=EventType.SUCCESS, task_data={}, status="ok")
        assert 2 == await store.apply_poll_results([update, finish], now=T0 + 1)
        await store.release_tasks([("tk-2", by_task["tk-2"].lease_until)], due_at=T0 + 2)
        assert await store.cancel_watch(f"wt_3_{len(hook)}", now=T0 + 1) is not None
        assert 5 == await store.expire_watches(now=T0 + 61, limit=10)  # tk-1..3: 6, 1 cancelled

        jobs = await store.claim_due_deliveries(now=T0 + 62, limit=3, lease_s=30)
        assert 3 == len(jobs)
        first, second, third = jobs
        await store.record_deliveries(
            [
                DeliveryRecord(
                    watch_id=first.watch_id,
                    outcome=DeliveryOutcome.DELIVERED,
                    next_attempt_at=None,
                    last_error=None,
                    lease_until=first.lease_until,
                )
            ],
            now=T0 + 63,
        )
        await store.defer_deliveries([(second.watch_id, second.lease_until)], due_at=T0 + 70)
        await store.hasten_deliveries([second.watch_id], deferred_to=T0 + 70, due_at=T0 + 64)
        assert await store.redeliver(first.watch_id, now=T0 + 64) is not None
        assert await store.cancel_watch(third.watch_id, now=T0 + 64) is not None
        assert await store.get_watch(first.watch_id) is not None
        await store.next_poll_due_at()
        await store.next_deadline_at()
        await store.next_delivery_due_at()
        await store.ping()
        assert 1 <= await store.purge_finished(before=T0 + 100, limit=10)
    finally:
        await store.close()

    plans = _explain_all(path, statements)
    assert len(plans) >= 15, plans  # the trace saw the statements
    # "SCAN x" walks a whole table or index (under an alias too: "SCAN w"); "SEARCH" does not.
    walks = {
        sql: plan
        for sql, plan in plans.items()
        if "watches_state" in plan or any(step.startswith("SCAN") for step in plan.split(" / "))
    }
    assert not walks, walks
