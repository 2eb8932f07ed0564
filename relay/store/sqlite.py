"""The embedded store: one SQLite file in WAL mode, one connection, one writer thread.

Every call runs on a single dedicated thread, so there is exactly one writer and no lock contention
inside the process; each write is its own `BEGIN IMMEDIATE` transaction, committed before the call
returns (a 201 means committed). `synchronous=NORMAL` survives a process crash (kill -9); `FULL`
also survives power loss at a write cost (`RELAY_SQLITE_SYNCHRONOUS`).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from relay.models import (
    ACTIVE_STATES,
    DeliveryJob,
    DeliveryOutcome,
    DeliveryRecord,
    EventType,
    NewWatch,
    TaskClaim,
    TaskFinish,
    TaskUpdate,
    Watch,
    WatchState,
)
from relay.store.base import StoreConflict, StoreUnavailable
from relay.store.rows import dumps_or_none, loads_or_none, watch_from_row

T = TypeVar("T")

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE watches (
        watch_id          TEXT PRIMARY KEY,
        task_id           TEXT NOT NULL,
        callback_url      TEXT NOT NULL,
        metadata          TEXT,
        state             TEXT NOT NULL,
        created_at        REAL NOT NULL,
        updated_at        REAL NOT NULL,
        deadline_at       REAL NOT NULL,
        task_status       TEXT,
        polls             INTEGER NOT NULL DEFAULT 0,
        event_type        TEXT,
        event_at          REAL,
        task_data         TEXT,
        delivery_attempts INTEGER NOT NULL DEFAULT 0,
        next_delivery_at  REAL,
        last_error        TEXT
    ) WITHOUT ROWID;
    CREATE UNIQUE INDEX watches_watching_pair ON watches (task_id, callback_url)
        WHERE state = 'watching';
    CREATE INDEX watches_watching_deadline ON watches (deadline_at) WHERE state = 'watching';
    CREATE INDEX watches_delivery_due ON watches (next_delivery_at) WHERE state = 'delivering';
    CREATE INDEX watches_task ON watches (task_id);
    CREATE INDEX watches_state ON watches (state, watch_id);
    CREATE TABLE tasks (
        task_id            TEXT PRIMARY KEY,
        status             TEXT,
        polls              INTEGER NOT NULL DEFAULT 0,
        interval_s         REAL NOT NULL DEFAULT 0,
        error_streak       INTEGER NOT NULL DEFAULT 0,
        first_not_found_at REAL,
        next_poll_at       REAL NOT NULL,
        last_error         TEXT,
        updated_at         REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX tasks_due ON tasks (next_poll_at);
    """,
)

_WATCH_COLUMNS = """
    w.watch_id, w.task_id, w.callback_url, w.metadata, w.state, w.created_at, w.updated_at,
    w.deadline_at, COALESCE(t.status, w.task_status), COALESCE(t.polls, w.polls),
    CASE WHEN w.state = 'watching' THEN t.next_poll_at END, w.delivery_attempts,
    COALESCE(w.last_error, CASE WHEN w.state = 'watching' THEN t.last_error END)
"""
_SELECT_WATCH = f"""
    SELECT {_WATCH_COLUMNS} FROM watches w
    LEFT JOIN tasks t ON t.task_id = w.task_id AND w.state = 'watching'
"""


class SQLiteStore:
    def __init__(self, path: str, *, synchronous: str = "NORMAL") -> None:
        self._path = path
        self._synchronous = synchronous
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-sqlite")
        self._conn: sqlite3.Connection | None = None

    # --- plumbing ---------------------------------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            try:
                self._conn = self._connect()
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"sqlite: {exc}") from exc
        try:
            return fn(self._conn)
        except sqlite3.IntegrityError as exc:
            if self._conn.in_transaction:
                self._conn.rollback()
            raise StoreConflict("the change conflicts with another watch") from exc
        except sqlite3.Error as exc:
            # Disk full, read-only file, locked by another process: the caller answers 503.
            if self._conn.in_transaction:
                self._conn.rollback()
            raise StoreUnavailable(f"sqlite: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        self._migrate(conn)
        return conn

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
            )
            applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
            for version, script in enumerate(MIGRATIONS, start=1):
                if version in applied:
                    continue
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, time.time()))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _write(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    async def open(self) -> None:
        await self._run(lambda conn: None)

    async def close(self) -> None:
        def close(conn: sqlite3.Connection) -> None:
            conn.close()
            self._conn = None

        if self._conn is not None:
            await self._run(close)
        self._executor.shutdown(wait=True)

    async def ping(self) -> None:
        await self._run(lambda conn: conn.execute("SELECT 1").fetchone())

    # --- the API's calls --------------------------------------------------------------------------

    async def register(
        self, new: NewWatch, *, watch_id: str, now: float, deadline_at: float
    ) -> tuple[Watch, bool]:
        def register(conn: sqlite3.Connection) -> tuple[str, bool]:
            row = conn.execute(
                "SELECT watch_id FROM watches WHERE task_id = ? AND callback_url = ?"
                " AND state IN ('watching', 'delivering')",
                (new.task_id, new.callback_url),
            ).fetchone()
            if row is not None:
                return row[0], False
            conn.execute(
                "INSERT INTO watches (watch_id, task_id, callback_url, metadata, state,"
                " created_at, updated_at, deadline_at) VALUES (?, ?, ?, ?, 'watching', ?, ?, ?)",
                (
                    watch_id,
                    new.task_id,
                    new.callback_url,
                    dumps_or_none(new.metadata),
                    now,
                    now,
                    deadline_at,
                ),
            )
            # The first poll of a new stream is due at once; an existing stream keeps its pace.
            conn.execute(
                "INSERT INTO tasks (task_id, next_poll_at, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (task_id) DO NOTHING",
                (new.task_id, now, now),
            )
            return watch_id, True

        def run(conn: sqlite3.Connection) -> tuple[Watch, bool]:
            found_id, created = self._write(conn, register)
            watch = self._get(conn, found_id)
            assert watch is not None
            return watch, created

        return await self._run(run)

    @staticmethod
    def _get(conn: sqlite3.Connection, watch_id: str) -> Watch | None:
        row = conn.execute(f"{_SELECT_WATCH} WHERE w.watch_id = ?", (watch_id,)).fetchone()
        return None if row is None else watch_from_row(row)

    async def get_watch(self, watch_id: str) -> Watch | None:
        return await self._run(lambda conn: self._get(conn, watch_id))

    async def list_watches(
        self, *, state: WatchState | None, task_id: str | None, limit: int, after: str | None
    ) -> list[Watch]:
        clauses, params = [], []
        if state is not None:
            clauses.append("w.state = ?")
            params.append(state.value)
        if task_id is not None:
            clauses.append("w.task_id = ?")
            params.append(task_id)
        if after is not None:
            clauses.append("w.watch_id > ?")
            params.append(after)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"{_SELECT_WATCH} {where} ORDER BY w.watch_id LIMIT ?"

        def run(conn: sqlite3.Connection) -> list[Watch]:
            return [watch_from_row(r) for r in conn.execute(sql, (*params, limit))]

        return await self._run(run)

    @staticmethod
    def _drop_unwatched_tasks(conn: sqlite3.Connection, task_ids: Sequence[str]) -> None:
        conn.executemany(
            "DELETE FROM tasks WHERE task_id = ? AND NOT EXISTS"
            " (SELECT 1 FROM watches WHERE task_id = ? AND state = 'watching')",
            [(t, t) for t in task_ids],
        )

    async def cancel_watch(self, watch_id: str, *, now: float) -> Watch | None:
        def cancel(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT state, task_id FROM watches WHERE watch_id = ?", (watch_id,)
            ).fetchone()
            if row is None:
                return False
            state = WatchState(row[0])
            if state is WatchState.CANCELLED:
                return True
            if state not in ACTIVE_STATES:
                raise StoreConflict(f"the watch is already {state.value}")
            # Keep what the stream knew, so the cancelled watch still shows it.
            conn.execute(
                "UPDATE watches SET state = 'cancelled', next_delivery_at = NULL, updated_at = ?,"
                " task_status = COALESCE((SELECT status FROM tasks WHERE task_id = ?), task_status),"
                " polls = COALESCE((SELECT polls FROM tasks WHERE task_id = ?), polls)"
                " WHERE watch_id = ?",
                (now, row[1], row[1], watch_id),
            )
            self._drop_unwatched_tasks(conn, [row[1]])
            return True

        def run(conn: sqlite3.Connection) -> Watch | None:
            return self._get(conn, watch_id) if self._write(conn, cancel) else None

        return await self._run(run)

    async def redeliver(self, watch_id: str, *, now: float) -> Watch | None:
        def redeliver(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT state FROM watches WHERE watch_id = ?", (watch_id,)
            ).fetchone()
            if row is None:
                return False
            state = WatchState(row[0])
            if state not in (WatchState.DELIVERED, WatchState.FAILED):
                raise StoreConflict(
                    f"only a delivered or failed watch can be redelivered; this one is {state.value}"
                )
            conn.execute(
                "UPDATE watches SET state = 'delivering', next_delivery_at = ?,"
                " delivery_attempts = 0, last_error = NULL, updated_at = ? WHERE watch_id = ?",
                (now, now, watch_id),
            )
            return True

        def run(conn: sqlite3.Connection) -> Watch | None:
            return self._get(conn, watch_id) if self._write(conn, redeliver) else None

        return await self._run(run)

    # --- the poller's calls -----------------------------------------------------------------------

    async def claim_due_tasks(self, *, now: float, limit: int, lease_s: float) -> list[TaskClaim]:
        def claim(conn: sqlite3.Connection) -> list[TaskClaim]:
            rows = conn.execute(
                "SELECT task_id, polls, interval_s, error_streak, first_not_found_at,"
                " next_poll_at FROM tasks WHERE next_poll_at <= ? ORDER BY next_poll_at LIMIT ?",
                (now, limit),
            ).fetchall()
            conn.executemany(
                "UPDATE tasks SET next_poll_at = ? WHERE task_id = ?",
                [(now + lease_s, r[0]) for r in rows],
            )
            return [
                TaskClaim(
                    task_id=r[0],
                    polls=r[1],
                    interval=r[2],
                    error_streak=r[3],
                    first_not_found_at=r[4],
                    due_at=r[5],
                )
                for r in rows
            ]

        return await self._run(lambda conn: self._write(conn, claim))

    async def apply_poll_results(
        self, plans: Sequence[TaskUpdate | TaskFinish], *, now: float
    ) -> int:
        updates = [p for p in plans if isinstance(p, TaskUpdate)]
        finishes = [p for p in plans if isinstance(p, TaskFinish)]

        def apply(conn: sqlite3.Connection) -> int:
            conn.executemany(
                "UPDATE tasks SET status = COALESCE(?, status), polls = polls + 1,"
                " next_poll_at = ?, interval_s = ?, error_streak = ?, first_not_found_at = ?,"
                " last_error = ?, updated_at = ? WHERE task_id = ?",
                [
                    (
                        u.status,
                        u.next_poll_at,
                        u.interval,
                        u.error_streak,
                        u.first_not_found_at,
                        u.last_error,
                        now,
                        u.task_id,
                    )
                    for u in updates
                ],
            )
            moved = 0
            for f in finishes:
                cursor = conn.execute(
                    "UPDATE watches SET state = 'delivering', event_type = ?, event_at = ?,"
                    " task_data = ?, next_delivery_at = ?, delivery_attempts = 0,"
                    " task_status = COALESCE(?, (SELECT status FROM tasks WHERE task_id = ?)),"
                    " polls = COALESCE((SELECT polls + 1 FROM tasks WHERE task_id = ?), polls),"
                    " last_error = NULL, updated_at = ? WHERE task_id = ? AND state = 'watching'",
                    (
                        f.event_type.value,
                        now,
                        dumps_or_none(f.task_data),
                        now,
                        f.status,
                        f.task_id,
                        f.task_id,
                        now,
                        f.task_id,
                    ),
                )
                moved += cursor.rowcount
                conn.execute("DELETE FROM tasks WHERE task_id = ?", (f.task_id,))
            return moved

        return await self._run(lambda conn: self._write(conn, apply))

    async def expire_watches(self, *, now: float, limit: int) -> int:
        def expire(conn: sqlite3.Connection) -> int:
            rows = conn.execute(
                "SELECT watch_id, task_id FROM watches WHERE state = 'watching'"
                " AND deadline_at <= ? ORDER BY deadline_at LIMIT ?",
                (now, limit),
            ).fetchall()
            conn.executemany(
                "UPDATE watches SET state = 'delivering', event_type = ?, event_at = ?,"
                " task_data = NULL, next_delivery_at = ?, delivery_attempts = 0, updated_at = ?,"
                " task_status = COALESCE((SELECT status FROM tasks WHERE task_id = ?), task_status),"
                " polls = COALESCE((SELECT polls FROM tasks WHERE task_id = ?), polls)"
                " WHERE watch_id = ?",
                [(EventType.TIMEOUT.value, now, now, now, r[1], r[1], r[0]) for r in rows],
            )
            self._drop_unwatched_tasks(conn, sorted({r[1] for r in rows}))
            return len(rows)

        return await self._run(lambda conn: self._write(conn, expire))

    # --- the deliverer's calls --------------------------------------------------------------------

    async def claim_due_deliveries(
        self, *, now: float, limit: int, lease_s: float
    ) -> list[DeliveryJob]:
        def claim(conn: sqlite3.Connection) -> list[DeliveryJob]:
            rows = conn.execute(
                "SELECT watch_id, task_id, callback_url, metadata, event_type, task_data,"
                " event_at, delivery_attempts, next_delivery_at"
                " FROM watches WHERE state = 'delivering'"
                " AND next_delivery_at <= ? ORDER BY next_delivery_at LIMIT ?",
                (now, limit),
            ).fetchall()
            conn.executemany(
                "UPDATE watches SET next_delivery_at = ? WHERE watch_id = ?",
                [(now + lease_s, r[0]) for r in rows],
            )
            return [
                DeliveryJob(
                    watch_id=r[0],
                    task_id=r[1],
                    callback_url=r[2],
                    metadata=loads_or_none(r[3]),
                    event_type=EventType(r[4]),
                    task_data=loads_or_none(r[5]),
                    event_at=r[6],
                    attempts=r[7],
                    due_at=r[8],
                )
                for r in rows
            ]

        return await self._run(lambda conn: self._write(conn, claim))

    async def record_deliveries(self, records: Sequence[DeliveryRecord], *, now: float) -> None:
        new_state = {
            DeliveryOutcome.DELIVERED: WatchState.DELIVERED,
            DeliveryOutcome.RETRY: WatchState.DELIVERING,
            DeliveryOutcome.GAVE_UP: WatchState.FAILED,
        }

        def record(conn: sqlite3.Connection) -> None:
            # `state = 'delivering'` fences out a watch cancelled while its attempt was in flight.
            conn.executemany(
                "UPDATE watches SET state = ?, delivery_attempts = delivery_attempts + 1,"
                " next_delivery_at = ?, last_error = ?, updated_at = ?"
                " WHERE watch_id = ? AND state = 'delivering'",
                [
                    (
                        new_state[r.outcome].value,
                        r.next_attempt_at,
                        r.last_error,
                        now,
                        r.watch_id,
                    )
                    for r in records
                ],
            )

        await self._run(lambda conn: self._write(conn, record))

    async def release_tasks(self, task_ids: Sequence[str], *, due_at: float) -> None:
        def release(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE tasks SET next_poll_at = ? WHERE task_id = ?",
                [(due_at, task_id) for task_id in task_ids],
            )

        if task_ids:
            await self._run(lambda conn: self._write(conn, release))

    async def defer_deliveries(self, watch_ids: Sequence[str], *, due_at: float) -> None:
        def defer(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE watches SET next_delivery_at = ? WHERE watch_id = ? AND state = 'delivering'",
                [(due_at, watch_id) for watch_id in watch_ids],
            )

        if watch_ids:
            await self._run(lambda conn: self._write(conn, defer))

    # --- schedule and gauges ----------------------------------------------------------------------

    async def next_poll_due_at(self) -> float | None:
        def run(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(
                "SELECT MIN(due) FROM (SELECT MIN(next_poll_at) AS due FROM tasks"
                " UNION ALL SELECT MIN(deadline_at) FROM watches WHERE state = 'watching')"
            ).fetchone()
            return None if row is None else row[0]

        return await self._run(run)

    async def next_delivery_due_at(self) -> float | None:
        def run(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(
                "SELECT MIN(next_delivery_at) FROM watches WHERE state = 'delivering'"
            ).fetchone()
            return None if row is None else row[0]

        return await self._run(run)

    async def count_by_state(self) -> dict[WatchState, int]:
        def run(conn: sqlite3.Connection) -> dict[WatchState, int]:
            counts = dict.fromkeys(WatchState, 0)
            for state, count in conn.execute("SELECT state, COUNT(*) FROM watches GROUP BY state"):
                counts[WatchState(state)] = count
            return counts

        return await self._run(run)

    # --- replicas ---------------------------------------------------------------------------------

    async def heartbeat(self, replica_id: str, *, now: float, stale_after_s: float) -> int:
        return 1  # one SQLite file has one relay process: it has the whole budget

    async def retire(self, replica_id: str) -> None:
        return None

    async def listen_registrations(self, wake: Callable[[], None], stopping: asyncio.Event) -> None:
        await stopping.wait()  # every registration comes through this process's own API
