"""Seed a relay SQLite file with N active watches directly: registering 1M through HTTP is too slow.

The schema comes from the relay itself (`SQLiteStore` runs its migrations on open); the rows are
what `register` plus one poll would have left: one `watching` watch and one `tasks` stream per
task id, status `queued`, interval at the cap, the next poll due uniformly over one interval.
Indexes are dropped during the load and rebuilt from their own SQL, so the file ends up with
exactly the relay's schema.
"""

from __future__ import annotations

import random
import sqlite3
import time
from dataclasses import dataclass

from relay.store.sqlite import SQLiteStore

BATCH = 50_000
WATCH_TIMEOUT_S = 86_400.0
TABLES = ("watches", "tasks")


@dataclass(frozen=True, slots=True, kw_only=True)
class Seeded:
    watches: int
    seconds: float
    due_from: float  # epoch seconds: the earliest next_poll_at
    due_until: float


def task_id(prefix: str, i: int) -> str:
    return f"{prefix}{i:08d}"  # fixed width, so insertion order is key order


async def create_schema(path: str) -> None:
    """Let the relay's own store create (or upgrade) the schema in `path`."""
    store = SQLiteStore(path)
    await store.open()
    await store.close()


def seed(
    path: str,
    *,
    count: int,
    interval_s: float,
    task_prefix: str,
    callback_url: str,
    start_in_s: float,
    seed_value: int = 1,
) -> Seeded:
    """Insert `count` watching watches and their tasks; polls fall due over
    [t, t + interval_s), t = `start_in_s` after the indexes are rebuilt."""
    started = time.time()
    rand = random.Random(seed_value)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        indexes = conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
            f" AND tbl_name IN ({', '.join('?' * len(TABLES))})",
            TABLES,
        ).fetchall()
        due_index = [(n, s) for n, s in indexes if "next_poll_at" in s]
        other_indexes = [(n, s) for n, s in indexes if "next_poll_at" not in s]
        # A bulk load: no journal to speak of, no fsync; the file is checkpointed back to WAL.
        conn.execute("PRAGMA journal_mode = DELETE")
        conn.execute("PRAGMA synchronous = OFF")
        for name, _ in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        created = time.time()
        deadline = created + WATCH_TIMEOUT_S
        millis = int(created * 1000)
        for low in range(0, count, BATCH):
            high = min(count, low + BATCH)
            tasks = [task_id(task_prefix, i) for i in range(low, high)]
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO watches (watch_id, task_id, callback_url, metadata, state,"
                " created_at, updated_at, deadline_at, task_status, polls)"
                " VALUES (?, ?, ?, NULL, 'watching', ?, ?, ?, 'queued', 1)",
                (
                    (f"wt_{millis:012x}{i:020x}", t, callback_url, created, created, deadline)
                    for i, t in zip(range(low, high), tasks, strict=True)
                ),
            )
            # Due times are offsets for now; they become absolute once the load is done.
            conn.executemany(
                "INSERT INTO tasks (task_id, status, polls, interval_s, error_streak,"
                " next_poll_at, updated_at) VALUES (?, 'queued', 1, ?, 0, ?, ?)",
                ((t, interval_s, rand.random() * interval_s, created) for t in tasks),
            )
            conn.execute("COMMIT")
        for _, sql in other_indexes:
            conn.execute(sql)
        due_from = time.time() + start_in_s
        conn.execute("BEGIN")
        conn.execute("UPDATE tasks SET next_poll_at = next_poll_at + ?", (due_from,))
        conn.execute("COMMIT")
        for _, sql in due_index:
            conn.execute(sql)
        conn.execute("PRAGMA journal_mode = WAL")
    finally:
        conn.close()
    return Seeded(
        watches=count,
        seconds=time.time() - started,
        due_from=due_from,
        due_until=due_from + interval_s,
    )
