"""Each PostgreSQL store call, timed at a large number of watches: a query plan that walks every
watch shows up here as milliseconds turned into hundreds (the SQLite store's plans are checked by
tests/integration/test_sqlite_plans.py; PostgreSQL's planner picks its own from statistics).

    python -m bench.store_calls [--watches N] [--dsn DSN]

Seeds N watches into a fresh schema with one INSERT ... SELECT (half watching, with their poll
streams; a quarter delivered, a quarter cancelled), runs ANALYZE as autovacuum would, then times
each call the relay makes, three times where the first may differ. The schema is dropped at the
end. The DSN comes from --dsn, else BENCH_POSTGRES_DSN or RELAY_TEST_POSTGRES_DSN. One line per
call; it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import time
from collections.abc import Awaitable
from typing import Any

import asyncpg

from relay.models import EventType, NewWatch, TaskFinish
from relay.store.postgres import PostgresStore

T0 = 1_700_000_000.0
HOOK = "http://127.0.0.1:9/hook"
DSN_ENVS = ("BENCH_POSTGRES_DSN", "RELAY_TEST_POSTGRES_DSN")


def watch_id(n: int) -> str:
    return f"wt_{n:032d}"


async def timed(name: str, call: Awaitable[Any]) -> None:
    started = time.perf_counter()
    result = await call
    elapsed_ms = 1000 * (time.perf_counter() - started)
    shown = len(result) if isinstance(result, (list, dict)) else result
    if not isinstance(shown, (int, float, type(None))):
        shown = type(result).__name__
    print(f"{elapsed_ms:9.2f} ms  {name} -> {shown}", flush=True)


async def seed(dsn: str, schema: str, watches: int) -> float:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'SET search_path TO "{schema}"')
        started = time.perf_counter()
        await conn.execute(
            "INSERT INTO watches (watch_id, task_id, callback_url, state, created_at,"
            " updated_at, deadline_at)"
            " SELECT 'wt_' || lpad(i::text, 32, '0'), 'tk-hiapi-' || i, $1,"
            " CASE WHEN i % 2 = 0 THEN 'watching' WHEN i % 4 = 1 THEN 'delivered'"
            " ELSE 'cancelled' END, $2::float8, $2::float8 + i % 1000, $2::float8 + 86400 + i"
            " FROM generate_series(1, $3) i",
            HOOK,
            T0,
            watches,
        )
        await conn.execute(
            "INSERT INTO tasks (task_id, next_poll_at, updated_at)"
            " SELECT 'tk-hiapi-' || i, $1::float8 + 600 + i % 600, $1::float8 FROM generate_series(2, $2, 2) i",
            T0,
            watches,
        )
        await conn.execute("ANALYZE")
        return time.perf_counter() - started
    finally:
        await conn.close()


async def run(dsn: str, watches: int) -> None:
    schema = f"bench_store_calls_{secrets.token_hex(4)}"
    store = PostgresStore(dsn, schema=schema)
    await store.open()
    try:
        seconds = await seed(dsn, schema, watches)
        print(f"seeded {watches:,} watches in {seconds:.1f} s (schema {schema})", flush=True)
        new = NewWatch(task_id="tk-hiapi-new", callback_url=HOOK, metadata=None)
        await timed("register, a new pair", store.register(
            new, watch_id="wt_new", now=T0 + 1, deadline_at=T0 + 90_000))  # fmt: skip
        known = NewWatch(task_id="tk-hiapi-2", callback_url=HOOK, metadata=None)
        await timed("register, a watching pair", store.register(
            known, watch_id="wt_known", now=T0 + 1, deadline_at=T0 + 90_000))  # fmt: skip
        await timed("claim_due_tasks (64)",
                    store.claim_due_tasks(now=T0 + 700, limit=64, lease_s=30))  # fmt: skip
        for n in (4, 6, 8):
            finish = TaskFinish(
                task_id=f"tk-hiapi-{n}", event_type=EventType.SUCCESS, task_data={}, status="ok"
            )
            await timed("apply_poll_results, a task ended",
                        store.apply_poll_results([finish], now=T0 + 2))  # fmt: skip
        await timed("cancel_watch, watching", store.cancel_watch(watch_id(10), now=T0 + 3))
        await timed("expire_watches (none due)", store.expire_watches(now=T0 + 100, limit=500))
        await timed("claim_due_deliveries (32)",
                    store.claim_due_deliveries(now=T0 + 5, limit=32, lease_s=30))  # fmt: skip
        await timed("next_poll_due_at", store.next_poll_due_at())
        await timed("next_deadline_at", store.next_deadline_at())
        await timed("next_delivery_due_at", store.next_delivery_due_at())
        await timed("count_by_state (the gauges, every 5 s)", store.count_by_state())
        await timed("get_watch", store.get_watch(watch_id(12)))
        await timed("list_watches, first page",
                    store.list_watches(state=None, task_id=None, limit=100, after=None))  # fmt: skip
        await timed("list_watches, by task",
                    store.list_watches(state=None, task_id="tk-hiapi-12", limit=100, after=None))  # fmt: skip
        for _ in range(3):
            await timed("purge_finished (500)", store.purge_finished(before=T0 + 2000, limit=500))
    finally:
        await store.close()
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.store_calls", description=__doc__)
    parser.add_argument("--watches", type=int, default=1_000_000)
    parser.add_argument("--dsn", default=next(filter(None, map(os.environ.get, DSN_ENVS)), None))
    args = parser.parse_args(argv)
    if not args.dsn:
        parser.error(f"set --dsn or {DSN_ENVS[0]}")
    asyncio.run(run(args.dsn, args.watches))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
