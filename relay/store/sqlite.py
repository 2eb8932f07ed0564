"""The embedded store: one SQLite file in WAL mode, one writer connection, one reader connection.

Writes run on the event loop itself: those queued during one turn of the loop share one
`BEGIN IMMEDIATE` transaction (group commit), and each caller resumes only after that COMMIT (a
201 means committed). A commit in WAL mode with `synchronous=NORMAL` is a write to the WAL, no
fsync: tens of microseconds, less than handing it to a thread and back (5 us of CPU per poll,
measured; see BENCHMARKS.md). What could block for long goes to the writer thread instead:
opening and migrating; the WAL checkpoints (the connection does none at commit), and the first
write after each, which may start the WAL over and so syncs its header; waiting out another
process's write lock (the loop's attempt gives up at once and hands the batch over); and with
`synchronous=FULL`, which syncs at every commit, every write.
Reads go to the reader thread's own connection; WAL lets it answer while a write commits.
`synchronous=NORMAL` survives a process crash (kill -9); `FULL` also survives power loss at a
write cost (`RELAY_SQLITE_SYNCHRONOUS`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from relay import logs
from relay.models import (
    ACTIVE_STATES,
    DeliveryJob,
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
from relay.store.rows import (
    claim_from_row,
    delivery_record_params,
    dumps_or_none,
    fresh_watch,
    job_from_row,
    task_update_params,
    watch_from_row,
)

T = TypeVar("T")

log = logging.getLogger("relay.store.sqlite")
# A write waiting for the next flush, and what its caller is told once the batch is done.
_Queued = tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]
_Outcome = tuple[asyncio.Future[Any], Any, BaseException | None]

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
    # One row that /readyz rewrites: ready means a commit goes through now.
    """
    CREATE TABLE readiness_probe (
        id        INTEGER PRIMARY KEY CHECK (id = 1),
        probed_at REAL NOT NULL
    );
    """,
    # Finished watches by age, for the retention sweep (purge_finished).
    """
    CREATE INDEX watches_finished_age ON watches (updated_at)
        WHERE state IN ('delivered', 'failed', 'cancelled');
    """,
)

# Rows written between two WAL checkpoints: about 2,000 pages of WAL (8 MiB) in the poll loop's
# writes, the scale of SQLite's own default (a checkpoint at every commit past 1,000 pages).
CHECKPOINT_EVERY_ROWS = 1_000

# Queries on watching deadlines name watches_watching_deadline (INDEXED BY): SQLite's planner
# would otherwise take watches_state and walk every active watch (~1 s at 1M watches). Those on
# due callbacks name watches_delivery_due for the same reason: through watches_state, the
# delivery claim and the next-due query each walked and sorted every waiting callback (2.1 ms
# with 5,000 waiting; a third of the relay's time each, behind a hanging receiver). Statements
# on one task's watching watches name watches_watching_pair: through watches_state, a finished
# task's UPDATE and the check whether a stream is still watched walked every watching watch
# (17 ms per task at 100k watches: an expiry batch of 500 took 8 s).

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
    def __init__(
        self, path: str, *, synchronous: str = "NORMAL", busy_timeout_ms: int = 5_000
    ) -> None:
        self._path = path
        self._synchronous = synchronous
        self._busy_timeout_ms = busy_timeout_ms
        # The writer connection's thread (see the module's docstring), and the reader's.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-sqlite-write")
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-sqlite-read")
        self._conn: sqlite3.Connection | None = None
        self._read_conn: sqlite3.Connection | None = None
        # Set when the writer connection was dropped as stale; see _connection.
        self._reader_stale = False
        # Group commit: writes queue here and the next flush commits all that waited in one
        # transaction (see _commit); every caller resumes only after that COMMIT.
        self._pending: deque[_Queued] = deque()
        self._flush_scheduled = False
        # Jobs handed to the writer thread and not yet over (counted on the loop): while there
        # are any, the thread has the writer connection, and flushes queue behind them there.
        self._thread_jobs = 0
        # FULL syncs the WAL at every commit: its commits would stall the loop for a disk flush.
        self._commits_on_loop = synchronous.upper() == "NORMAL"
        # The writer connection's total_changes when the last checkpoint was asked for.
        self._changes_at_checkpoint = 0
        # Set by a checkpoint: the next write may start the WAL over, and that syncs its header
        # (with NORMAL too), so it runs on the thread.
        self._wal_may_restart = False
        # Set by close(): every call after it fails at once. (A write then reached a shut-down
        # executor, left the flush flag set, and every later write waited forever.)
        self._closed = False

    # --- plumbing ---------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable("sqlite: the store is closed")

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` on the writer connection, on the writer thread, outside any transaction."""
        self._check_open()
        return await self._on_thread(self._call, fn)

    async def _on_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the writer thread; no flush runs on the loop until it is over
        (over on the thread: a caller that stops waiting does not end it)."""
        loop = asyncio.get_running_loop()
        self._thread_jobs += 1
        job = self._writer.submit(fn, *args)
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(self._thread_job_over, []))
        return await asyncio.wrap_future(job)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read on the reader connection; it sees every committed write."""
        self._check_open()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reader, self._call_reader, fn)

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` in a write transaction; return once it is committed.

        `fn` must touch nothing but the connection: when another write of its batch fails, the
        batch is rolled back and `fn` runs a second time (see _commit).
        """
        self._check_open()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._pending.append((fn, future))
        # Append, then look at the flag; a flusher clears the flag, then drains: no write can
        # be left queued with no flush coming.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush_on_loop, loop)
        return await future

    def _flush_on_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        conn = self._conn
        if (
            self._thread_jobs
            or conn is None
            or self._closed
            or self._wal_may_restart
            or not self._commits_on_loop
        ):
            # The thread has the connection (a checkpoint, a lock being waited out), or it must
            # (re)open it, or this commit may sync: the batch queues behind on the thread. After
            # close(), the thread's flush fails it.
            self._flush_on_thread(loop)
            return
        self._flush_scheduled = False
        batch = self._drain()
        if not batch:
            return
        try:
            outcomes = self._commit(conn, batch)
        except _LockedElsewhere:
            # The batch was rolled back, or never began: it waits for the lock on the thread,
            # up to busy_timeout, and runs again there (a write does the same thing twice).
            self._pending.extendleft(reversed(batch))
            self._flush_scheduled = True
            self._flush_on_thread(loop)
            return
        except Exception as exc:  # whatever went wrong, no caller may be left waiting
            outcomes = self._failed(batch, exc)
        _settle_all(outcomes)
        if self._conn is conn and self._checkpoint_due(conn):
            self._thread_jobs += 1
            self._writer.submit(self._checkpoint, loop)

    def _flush_on_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand the queued writes to the writer thread (the flag stays set until it drains)."""
        self._thread_jobs += 1
        try:
            self._writer.submit(self._flush, loop)
        except RuntimeError:  # the executor is shut down: close() is over
            self._thread_jobs -= 1
            self._flush_scheduled = False
            closed = StoreUnavailable("sqlite: the store is closed")
            _settle_all([(future, None, closed) for _, future in self._drain()])

    def _drain(self) -> list[_Queued]:
        batch = []
        while self._pending:
            batch.append(self._pending.popleft())
        return batch

    def _failed(self, batch: list[_Queued], exc: BaseException) -> list[_Outcome]:
        self._after_error(exc)
        failure = _unavailable(exc) if isinstance(exc, sqlite3.Error) else exc
        return [(future, None, failure) for _, future in batch]

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the writer thread: commit what is queued, waiting out another process's lock."""
        self._flush_scheduled = False
        batch = self._drain()
        outcomes: list[_Outcome] = []
        if batch:
            try:
                conn = self._connection()
                conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
                try:
                    outcomes = self._commit(conn, batch)
                finally:
                    conn.execute("PRAGMA busy_timeout = 0")
            except Exception as exc:  # whatever went wrong, no caller may be left waiting
                outcomes = self._failed(batch, exc)
            else:
                self._wal_may_restart = False  # if this write started the WAL over, it is done
                try:
                    if self._checkpoint_due(conn):
                        self._checkpoint_now(conn)
                except Exception as exc:  # committed all the same; the next write meets it
                    self._after_error(exc)
        # One wake-up of the event loop for the whole batch, not one per caller.
        loop.call_soon_threadsafe(self._thread_job_over, outcomes)

    def _checkpoint(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the writer thread, between transactions: copy the WAL back into the database file.

        The next write then starts the WAL over from its beginning (unless a read still uses
        it), so the WAL stays about CHECKPOINT_EVERY_ROWS rows' worth of pages long.
        """
        try:
            self._checkpoint_now(self._connection())
        except Exception as exc:  # the next write meets the same trouble and reports it
            self._after_error(exc)
        loop.call_soon_threadsafe(self._thread_job_over, [])

    def _checkpoint_now(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        self._wal_may_restart = True

    def _checkpoint_due(self, conn: sqlite3.Connection) -> bool:
        """Whether CHECKPOINT_EVERY_ROWS rows were written since the last checkpoint; if so, the
        count starts over (the caller runs the checkpoint)."""
        total = conn.total_changes
        if rows_since(total, self._changes_at_checkpoint) < CHECKPOINT_EVERY_ROWS:
            return False
        self._changes_at_checkpoint = total
        return True

    def _thread_job_over(self, outcomes: list[_Outcome]) -> None:
        self._thread_jobs -= 1
        _settle_all(outcomes)

    def _commit(self, conn: sqlite3.Connection, batch: list[_Queued]) -> list[_Outcome]:
        """Run the batch in one transaction; each caller's outcome, or all fail together.

        Almost every write succeeds, so the batch first runs without a savepoint per write (they
        cost a third of a registration's SQLite time). If any write raises, the whole transaction
        is undone and the batch runs again with one savepoint per write, so that the failure
        stays with its own caller. Writes are functions of the connection alone: running one
        again after a rollback does the same thing.
        """
        _begin(conn)
        try:
            results = [fn(conn) for fn, _ in batch]
        except Exception:
            if conn.in_transaction:  # else SQLite has already rolled everything back
                conn.execute("ROLLBACK")
            return self._commit_isolated(conn, batch)
        conn.execute("COMMIT")  # disk full or read-only here: nothing of the batch was kept
        return [(future, result, None) for (_, future), result in zip(batch, results, strict=True)]

    def _commit_isolated(self, conn: sqlite3.Connection, batch: list[_Queued]) -> list[_Outcome]:
        """Run the batch in one transaction, each write in its own savepoint."""
        _begin(conn)
        outcomes: list[_Outcome] = []
        for fn, future in batch:
            result, error = self._in_savepoint(conn, fn)
            if not conn.in_transaction or _stale(error):
                # SQLite rolled the whole transaction back (disk full or an I/O error inside a
                # statement), or the connection cannot write at all: nothing of the batch is
                # kept, the writes that succeeded included.
                raise error if error is not None else StoreUnavailable("sqlite: rolled back")
            outcomes.append((future, result, error))
        conn.execute("COMMIT")  # disk full or read-only here: nothing of the batch was kept
        return outcomes

    @staticmethod
    def _in_savepoint(
        conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], Any]
    ) -> tuple[Any, BaseException | None]:
        """Run one queued write; its failure undoes only its own changes."""
        conn.execute("SAVEPOINT write")
        try:
            result = fn(conn)
        except Exception as exc:  # handed to the caller that queued it, never lost here
            if conn.in_transaction:  # else SQLite has already rolled everything back
                conn.execute("ROLLBACK TO write")
                conn.execute("RELEASE write")
            if isinstance(exc, sqlite3.IntegrityError):
                return None, StoreConflict("the change conflicts with another watch")
            if isinstance(exc, sqlite3.Error):
                return None, _unavailable(exc)
            return None, exc
        conn.execute("RELEASE write")
        return result, None

    def _after_error(self, exc: BaseException) -> None:
        """Roll back what is left open; drop a connection the error shows to be stale."""
        conn = self._conn
        if conn is None:
            return
        with contextlib.suppress(sqlite3.Error):
            if conn.in_transaction:
                conn.rollback()
        if _stale(exc):
            # Opened read-only, or on a volume since remounted: a new connection is how the
            # store comes back by itself once the file is writable again.
            with contextlib.suppress(sqlite3.Error):
                conn.close()
            self._conn = None
            self._reader_stale = True

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            if self._closed:  # a flush queued behind close(): never open it again
                raise StoreUnavailable("sqlite: the store is closed")
            if self._reader_stale:
                # SQLite shares one file handle and one WAL index per file among a process's
                # connections: while the reader's stays open, a new writer inherits its
                # read-only view. Close it first (on its own thread); it reopens on next read.
                self._reader.submit(self._close_reader).result()
                self._reader_stale = False
            try:
                self._conn = self._connect()
            except sqlite3.Error as exc:
                raise _unavailable(exc) from exc
        return self._conn

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._connection()
        try:
            return fn(conn)
        except sqlite3.Error as exc:
            self._after_error(exc)
            raise _unavailable(exc) from exc

    def _call_reader(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            if self._read_conn is None:
                conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
                try:
                    conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
                    conn.execute("PRAGMA query_only = ON")
                except sqlite3.Error:
                    conn.close()
                    raise
                self._read_conn = conn
            return fn(self._read_conn)
        except sqlite3.Error as exc:
            if _stale(exc):
                self._close_reader()
            raise _unavailable(exc) from exc

    def _close_reader(self) -> None:
        """Close the reader connection; only ever on the reader thread."""
        if self._read_conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._read_conn.close()
            self._read_conn = None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                # A file system without shared memory (some network mounts) keeps the rollback
                # journal: every read then blocks commits, and commits wait on the thread.
                logs.event(log, "sqlite_not_wal", logging.WARNING, journal_mode=str(mode))
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            conn.execute("PRAGMA foreign_keys = ON")
            self._migrate(conn)
            # Checkpoints run on the writer thread (_checkpoint), never inside a commit on the
            # loop; and a write on the loop never waits for a lock (see _flush_on_loop).
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            conn.execute("PRAGMA busy_timeout = 0")
        except sqlite3.Error:
            conn.close()  # tried again on the next call, from scratch
            raise
        # A new connection counts from 0, and its first write runs on the thread (it opened it).
        self._changes_at_checkpoint = 0
        self._wal_may_restart = False
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
            if conn.in_transaction:  # a full disk may have rolled it back already
                conn.execute("ROLLBACK")
            raise

    async def open(self) -> None:
        await self._run(lambda conn: None)

    async def close(self) -> None:
        def close_writer() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        if self._pending:  # the writes accepted before close() still commit, before it closes
            self._flush_on_thread(loop)
        await self._on_thread(close_writer)
        await loop.run_in_executor(self._reader, self._close_reader)
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)

    async def ping(self) -> None:
        """Commit a one-row write: a full, read-only or locked file fails it like a registration.

        `SELECT 1` would pass in all three: it never touches the file.
        """

        def probe(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO readiness_probe (id, probed_at) VALUES (1, ?)"
                " ON CONFLICT (id) DO UPDATE SET probed_at = excluded.probed_at",
                (time.time(),),
            )

        await self._write(probe)

    # --- the API's calls --------------------------------------------------------------------------

    async def register(
        self, new: NewWatch, *, watch_id: str, now: float, deadline_at: float
    ) -> tuple[Watch, bool]:
        def register(conn: sqlite3.Connection) -> tuple[Watch, bool]:
            row = conn.execute(
                "SELECT watch_id FROM watches WHERE task_id = ? AND callback_url = ?"
                " AND state IN ('watching', 'delivering')"
                # The watching one if any (a redelivered watch may be delivering beside it),
                # else the newest: the same answer the PostgreSQL store gives.
                " ORDER BY state = 'watching' DESC, watch_id DESC LIMIT 1",
                (new.task_id, new.callback_url),
            ).fetchone()
            if row is not None:
                found = self._get(conn, row[0])
                assert found is not None
                return found, False
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
            stream = conn.execute(
                "INSERT INTO tasks (task_id, next_poll_at, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (task_id) DO NOTHING",
                (new.task_id, now, now),
            )
            if stream.rowcount == 1:  # a new stream: what a read-back would say is known
                return fresh_watch(new, watch_id=watch_id, now=now, deadline_at=deadline_at), True
            joined = self._get(conn, watch_id)  # it shares a stream: show the stream's state
            assert joined is not None
            return joined, True

        return await self._write(register)

    @staticmethod
    def _get(conn: sqlite3.Connection, watch_id: str) -> Watch | None:
        row = conn.execute(f"{_SELECT_WATCH} WHERE w.watch_id = ?", (watch_id,)).fetchone()
        return None if row is None else watch_from_row(row)

    async def get_watch(self, watch_id: str) -> Watch | None:
        return await self._read(lambda conn: self._get(conn, watch_id))

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

        return await self._read(run)

    @staticmethod
    def _drop_unwatched_tasks(conn: sqlite3.Connection, task_ids: Sequence[str]) -> None:
        conn.executemany(
            "DELETE FROM tasks WHERE task_id = ? AND NOT EXISTS"
            " (SELECT 1 FROM watches INDEXED BY watches_watching_pair"
            " WHERE task_id = ? AND state = 'watching')",
            [(t, t) for t in task_ids],
        )

    async def cancel_watch(self, watch_id: str, *, now: float) -> tuple[Watch, bool] | None:
        def cancel(conn: sqlite3.Connection) -> bool | None:
            row = conn.execute(
                "SELECT state, task_id FROM watches WHERE watch_id = ?", (watch_id,)
            ).fetchone()
            if row is None:
                return None
            state = WatchState(row[0])
            if state is WatchState.CANCELLED:
                return False
            if state not in ACTIVE_STATES:
                raise StoreConflict(f"the watch is already {state.value}")
            # A watching watch keeps what its stream knew, so the cancelled watch still shows
            # it; a delivering one already shows its task's end (a stream under that task id
            # now is another URL's). SET reads the row as it was: `state` is the old state.
            conn.execute(
                "UPDATE watches SET state = 'cancelled', next_delivery_at = NULL, updated_at = ?,"
                " task_status = CASE WHEN state = 'watching' THEN"
                " COALESCE((SELECT status FROM tasks WHERE task_id = ?), task_status)"
                " ELSE task_status END,"
                " polls = CASE WHEN state = 'watching' THEN"
                " COALESCE((SELECT polls FROM tasks WHERE task_id = ?), polls) ELSE polls END"
                " WHERE watch_id = ?",
                (now, row[1], row[1], watch_id),
            )
            self._drop_unwatched_tasks(conn, [row[1]])
            return True

        def run(conn: sqlite3.Connection) -> tuple[Watch, bool] | None:
            cancelled_now = cancel(conn)
            if cancelled_now is None:
                return None
            watch = self._get(conn, watch_id)
            assert watch is not None
            return watch, cancelled_now

        return await self._write(run)

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
            return self._get(conn, watch_id) if redeliver(conn) else None

        return await self._write(run)

    # --- the poller's calls -----------------------------------------------------------------------

    async def claim_due_tasks(self, *, now: float, limit: int, lease_s: float) -> list[TaskClaim]:
        def claim(conn: sqlite3.Connection) -> list[TaskClaim]:
            rows = conn.execute(
                "SELECT task_id, polls, interval_s, error_streak, first_not_found_at,"
                " next_poll_at FROM tasks WHERE next_poll_at <= ? ORDER BY next_poll_at LIMIT ?",
                (now, limit),
            ).fetchall()
            lease_until = now + lease_s
            conn.executemany(
                "UPDATE tasks SET next_poll_at = ? WHERE task_id = ?",
                [(lease_until, r[0]) for r in rows],
            )
            return [claim_from_row(r, lease_until) for r in rows]

        return await self._write(claim)

    async def apply_poll_results(
        self, plans: Sequence[TaskUpdate | TaskFinish], *, now: float
    ) -> int:
        updates = [p for p in plans if isinstance(p, TaskUpdate)]
        finishes = [p for p in plans if isinstance(p, TaskFinish)]

        def apply(conn: sqlite3.Connection) -> int:
            conn.executemany(
                "UPDATE tasks SET status = COALESCE(?, status), polls = polls + 1,"
                " next_poll_at = ?, interval_s = ?, error_streak = ?, first_not_found_at = ?,"
                " last_error = ?, updated_at = ? WHERE task_id = ? AND next_poll_at = ?",
                [task_update_params(u, now) for u in updates],
            )
            moved = 0
            for f in finishes:
                cursor = conn.execute(
                    "UPDATE watches INDEXED BY watches_watching_pair"
                    " SET state = 'delivering', event_type = ?, event_at = ?,"
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

        return await self._write(apply)

    async def expire_watches(self, *, now: float, limit: int) -> int:
        def expire(conn: sqlite3.Connection) -> int:
            rows = conn.execute(
                "SELECT watch_id, task_id FROM watches INDEXED BY watches_watching_deadline"
                " WHERE state = 'watching'"
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

        return await self._write(expire)

    async def purge_finished(self, *, before: float, limit: int) -> int:
        def purge(conn: sqlite3.Connection) -> int:
            # Finished watches have no poll stream left (a watch's end drops an unwatched one).
            cursor = conn.execute(
                "DELETE FROM watches WHERE watch_id IN (SELECT watch_id FROM watches"
                " INDEXED BY watches_finished_age"
                " WHERE state IN ('delivered', 'failed', 'cancelled') AND updated_at < ?"
                " ORDER BY updated_at LIMIT ?)",
                (before, limit),
            )
            return cursor.rowcount

        return await self._write(purge)

    # --- the deliverer's calls --------------------------------------------------------------------

    async def claim_due_deliveries(
        self, *, now: float, limit: int, lease_s: float
    ) -> list[DeliveryJob]:
        def claim(conn: sqlite3.Connection) -> list[DeliveryJob]:
            rows = conn.execute(
                "SELECT watch_id, task_id, callback_url, metadata, event_type, task_data,"
                " event_at, delivery_attempts, next_delivery_at"
                " FROM watches INDEXED BY watches_delivery_due WHERE state = 'delivering'"
                " AND next_delivery_at <= ? ORDER BY next_delivery_at LIMIT ?",
                (now, limit),
            ).fetchall()
            lease_until = now + lease_s
            conn.executemany(
                "UPDATE watches SET next_delivery_at = ? WHERE watch_id = ?",
                [(lease_until, r[0]) for r in rows],
            )
            return [job_from_row(r, lease_until) for r in rows]

        return await self._write(claim)

    async def record_deliveries(self, records: Sequence[DeliveryRecord], *, now: float) -> set[str]:
        def record(conn: sqlite3.Connection) -> set[str]:
            applied = set()
            for r in records:
                # `state = 'delivering'` fences out a watch cancelled while its attempt was out;
                # the lease, the outcome of a claim another claimer has taken over since (or a
                # redelivery queued after that other claim delivered it).
                updated = conn.execute(
                    "UPDATE watches SET state = ?, delivery_attempts = delivery_attempts + 1,"
                    " next_delivery_at = ?, last_error = ?, updated_at = ?"
                    " WHERE watch_id = ? AND state = 'delivering' AND next_delivery_at = ?",
                    delivery_record_params(r, now),
                )
                if updated.rowcount:
                    applied.add(r.watch_id)
            return applied

        return await self._write(record)

    async def release_tasks(self, held: Sequence[tuple[str, float]], *, due_at: float) -> None:
        def release(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE tasks SET next_poll_at = ? WHERE task_id = ? AND next_poll_at = ?",
                [(due_at, task_id, lease_until) for task_id, lease_until in held],
            )

        if held:
            await self._write(release)

    async def defer_deliveries(self, held: Sequence[tuple[str, float]], *, due_at: float) -> None:
        def defer(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE watches SET next_delivery_at = ?"
                " WHERE watch_id = ? AND state = 'delivering' AND next_delivery_at = ?",
                [(due_at, watch_id, held_until) for watch_id, held_until in held],
            )

        if held:
            await self._write(defer)

    async def hasten_deliveries(
        self, watch_ids: Sequence[str], *, deferred_to: float, due_at: float
    ) -> None:
        def hasten(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE watches SET next_delivery_at = ? WHERE watch_id = ?"
                " AND state = 'delivering' AND next_delivery_at = ?",
                [(due_at, watch_id, deferred_to) for watch_id in watch_ids],
            )

        if watch_ids:
            await self._write(hasten)

    # --- schedule and gauges ----------------------------------------------------------------------

    async def next_poll_due_at(self) -> float | None:
        return await self._earliest("SELECT MIN(next_poll_at) FROM tasks")

    async def next_deadline_at(self) -> float | None:
        return await self._earliest(
            "SELECT MIN(deadline_at) FROM watches INDEXED BY watches_watching_deadline"
            " WHERE state = 'watching'"
        )

    async def next_delivery_due_at(self) -> float | None:
        return await self._earliest(
            "SELECT MIN(next_delivery_at) FROM watches INDEXED BY watches_delivery_due"
            " WHERE state = 'delivering'"
        )

    async def _earliest(self, query: str) -> float | None:
        """The value of a `SELECT MIN(...)` query, on the reader connection."""

        def run(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(query).fetchone()
            return None if row is None else row[0]

        return await self._read(run)

    async def count_by_state(self) -> dict[WatchState, int]:
        def run(conn: sqlite3.Connection) -> dict[WatchState, int]:
            counts = dict.fromkeys(WatchState, 0)
            for state, count in conn.execute("SELECT state, COUNT(*) FROM watches GROUP BY state"):
                counts[WatchState(state)] = count
            return counts

        return await self._read(run)

    # --- replicas ---------------------------------------------------------------------------------

    async def heartbeat(self, replica_id: str, *, now: float, stale_after_s: float) -> int:
        return 1  # one SQLite file has one relay process: it has the whole budget

    async def retire(self, replica_id: str) -> None:
        return None

    async def listen_registrations(self, wake: Callable[[], None], stopping: asyncio.Event) -> None:
        await stopping.wait()  # every registration comes through this process's own API


# Errors that leave the connection itself suspect (a file opened read-only, a volume remounted
# or failing): the store drops it and opens a new one on the next call. Busy, locked and full
# are conditions of the moment; the connection stays.
_STALE_CODES = frozenset(
    {
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_NOTADB,
    }
)


def _stale(exc: BaseException | None) -> bool:
    """Whether `exc`, or the SQLite error it stands for, is one of `_STALE_CODES`."""
    while exc is not None:
        code = getattr(exc, "sqlite_errorcode", None)
        if isinstance(code, int):
            return code & 0xFF in _STALE_CODES
        exc = exc.__cause__
    return False


def rows_since(total_changes: int, mark: int) -> int:
    """Rows written since `mark`: total_changes is sqlite3_total_changes(), a C int that wraps
    past 2**31 rows (days at a few thousand polls a second)."""
    return (total_changes - mark) % 2**32


class _LockedElsewhere(sqlite3.OperationalError):
    """BEGIN IMMEDIATE found the write lock taken by another process (SQLITE_BUSY)."""


def _begin(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY:
            raise _LockedElsewhere(str(exc)) from exc
        raise


def _unavailable(exc: BaseException) -> StoreUnavailable:
    # Disk full, read-only file, locked by another process: the caller answers 503.
    if isinstance(exc, StoreUnavailable):
        return exc
    unavailable = StoreUnavailable(f"sqlite: {exc}")
    unavailable.__cause__ = exc  # kept for _stale, whoever raises it
    return unavailable


def _settle_all(outcomes: list[_Outcome]) -> None:
    for future, result, error in outcomes:
        if future.done():  # its caller was cancelled; the write itself stands
            continue
        if error is None:
            future.set_result(result)
        elif isinstance(error, StopIteration):
            # A future refuses it (TypeError), and the callers after this one would wait forever.
            failure = RuntimeError("a store write raised StopIteration")
            failure.__cause__ = error
            future.set_exception(failure)
        else:
            future.set_exception(error)
