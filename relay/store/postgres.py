"""The shared store: PostgreSQL through an asyncpg pool, for one or many replicas on one database.

Same semantics as the SQLite store. Claims take rows with `FOR UPDATE SKIP LOCKED`, so replicas
claiming at once never get the same row, and the lease is still the due column. Every transaction
that touches a task's poll stream and its watches locks the `tasks` rows first, in task_id order,
then the watches; with per-statement snapshots (READ COMMITTED) that ordering is what keeps a
concurrent registration from being left watching a stream that a finish, cancel or expiry deleted.
A registration inserts its watch before it locks the stream, which is safe: nobody else can see,
and so wait on, an uncommitted row except a registration of the same pair, which holds nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, TypeAlias, TypeVar

import asyncpg

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
    job_from_row,
    task_update_params,
    watch_from_row,
)

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn: TypeAlias = PoolConnectionProxy[asyncpg.Record]

T = TypeVar("T")

# pg_advisory_xact_lock key ("hiapirly"): one key for every relay on the database, so replicas
# starting at once apply migrations one after another.
MIGRATION_LOCK_KEY = 0x6869_6170_6972_6C79
# A migration may build an index over every watch (tens of millions of rows on a store without
# retention until 276e6b3): past the pool's command timeout it would be cancelled and rolled
# back at every start. Replicas waiting for the migration lock wait as long.
MIGRATION_TIMEOUT_S = 3600.0

# A deadlock or serialization failure rolls the whole transaction back; it is safe to run again.
_TX_ATTEMPTS = 3

# Errors that mean "not now" rather than "wrong": the caller answers 503 or retries next tick.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.OperatorInterventionError,  # admin shutdown, crash recovery, statement timeout
    asyncpg.InsufficientResourcesError,  # disk full, out of memory, too many connections
    asyncpg.ReadOnlySQLTransactionError,  # connected to a standby after a failover
    # A server shutting down mid-query leaves the protocol half-way ("cannot switch to state ...;
    # another operation is in progress"); the pool terminates that connection on release.
    asyncpg.InternalClientError,
)

# Opening also fails on a bad password or an unknown database: the relay cannot start on this store.
_OPEN_ERRORS: tuple[type[BaseException], ...] = (*_UNAVAILABLE, asyncpg.PostgresError)

_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_MAX_IDENTIFIER_BYTES = 63  # NAMEDATALEN - 1: schema names and LISTEN/NOTIFY channels alike


def _channel_for(schema: str) -> str:
    """The LISTEN/NOTIFY channel of one schema, so relays on other schemas stay apart.

    PostgreSQL refuses channel names over 63 bytes ("channel name too long"): a schema name
    that would make it longer (47 characters or more) is replaced by a digest of itself.
    """
    channel = f"relay_registered_{schema}"
    if len(channel.encode()) <= _MAX_IDENTIFIER_BYTES:
        return channel  # what every relay so far has used: a rolling upgrade keeps it
    return f"relay_registered_{hashlib.sha256(schema.encode()).hexdigest()[:16]}"


MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE watches (
        watch_id          text COLLATE "C" PRIMARY KEY,
        task_id           text COLLATE "C" NOT NULL,
        callback_url      text NOT NULL,
        metadata          text,
        state             text NOT NULL CHECK (state IN
                              ('watching', 'delivering', 'delivered', 'failed', 'cancelled')),
        created_at        double precision NOT NULL,
        updated_at        double precision NOT NULL,
        deadline_at       double precision NOT NULL,
        task_status       text,
        polls             integer NOT NULL DEFAULT 0,
        event_type        text,
        event_at          double precision,
        task_data         text,
        delivery_attempts integer NOT NULL DEFAULT 0,
        next_delivery_at  double precision,
        last_error        text
    );
    CREATE UNIQUE INDEX watches_watching_pair ON watches (task_id, callback_url)
        WHERE state = 'watching';
    CREATE INDEX watches_watching_deadline ON watches (deadline_at) WHERE state = 'watching';
    CREATE INDEX watches_delivery_due ON watches (next_delivery_at) WHERE state = 'delivering';
    CREATE INDEX watches_task ON watches (task_id);
    CREATE INDEX watches_state ON watches (state, watch_id);
    CREATE TABLE tasks (
        task_id            text COLLATE "C" PRIMARY KEY,
        status             text,
        polls              integer NOT NULL DEFAULT 0,
        interval_s         double precision NOT NULL DEFAULT 0,
        error_streak       integer NOT NULL DEFAULT 0,
        first_not_found_at double precision,
        next_poll_at       double precision NOT NULL,
        last_error         text,
        updated_at         double precision NOT NULL
    );
    CREATE INDEX tasks_due ON tasks (next_poll_at);
    """,
    """
    CREATE TABLE relay_replicas (
        replica_id   text PRIMARY KEY,
        heartbeat_at double precision NOT NULL
    );
    """,
    # Finished watches by age, for the retention sweep (purge_finished).
    """
    CREATE INDEX watches_finished_age ON watches (updated_at)
        WHERE state IN ('delivered', 'failed', 'cancelled');
    """,
)

# How long a lost LISTEN connection waits before it tries again.
LISTEN_RETRY_S = 2.0

# JSON travels as text holding orjson's bytes: jsonb would reorder keys, and the callback must carry
# the upstream data verbatim.
_SELECT_WATCH = """
    SELECT w.watch_id, w.task_id, w.callback_url, w.metadata, w.state, w.created_at, w.updated_at,
        w.deadline_at, COALESCE(t.status, w.task_status), COALESCE(t.polls, w.polls),
        CASE WHEN w.state = 'watching' THEN t.next_poll_at END, w.delivery_attempts,
        COALESCE(w.last_error, CASE WHEN w.state = 'watching' THEN t.last_error END)
    FROM watches w
    LEFT JOIN tasks t ON t.task_id = w.task_id AND w.state = 'watching'
"""

# The CTE reads the due time before the UPDATE moves it to the lease's end: that is `due_at`.
_CLAIM_TASKS = """
    WITH due AS (
        SELECT task_id, next_poll_at FROM tasks
        WHERE next_poll_at <= $1
        ORDER BY next_poll_at
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    )
    UPDATE tasks t SET next_poll_at = $3
    FROM due WHERE t.task_id = due.task_id
    RETURNING t.task_id, t.polls, t.interval_s, t.error_streak, t.first_not_found_at,
        due.next_poll_at AS due_at
"""

_CLAIM_DELIVERIES = """
    WITH due AS (
        SELECT watch_id, next_delivery_at FROM watches
        WHERE state = 'delivering' AND next_delivery_at <= $1
        ORDER BY next_delivery_at
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    )
    UPDATE watches w SET next_delivery_at = $3
    FROM due WHERE w.watch_id = due.watch_id
    RETURNING w.watch_id, w.task_id, w.callback_url, w.metadata, w.event_type, w.task_data,
        w.event_at, w.delivery_attempts, due.next_delivery_at AS due_at
"""

_LOCK_TASKS = """
    SELECT task_id FROM tasks WHERE task_id = ANY($1::text[]) ORDER BY task_id FOR UPDATE
"""

_DROP_UNWATCHED_TASKS = """
    DELETE FROM tasks t WHERE t.task_id = ANY($1::text[]) AND NOT EXISTS
        (SELECT 1 FROM watches w WHERE w.task_id = t.task_id AND w.state = 'watching')
"""


def _row_count(status: str) -> int:
    """`UPDATE 3` -> 3."""
    return int(status.rsplit(" ", 1)[-1])


async def _lock_tasks(conn: Conn, task_ids: Sequence[str]) -> None:
    """Lock these poll streams (those that exist) in task_id order, before touching their watches."""
    await conn.fetch(_LOCK_TASKS, sorted(set(task_ids)))


async def _get(conn: Conn, watch_id: str) -> Watch | None:
    row = await conn.fetchrow(f"{_SELECT_WATCH} WHERE w.watch_id = $1", watch_id)
    return None if row is None else watch_from_row(row)


async def _found(conn: Conn, watch_id: str) -> Watch:
    """A watch this transaction holds the row lock of: it is there."""
    watch = await _get(conn, watch_id)
    assert watch is not None
    return watch


class PostgresStore:
    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "public",
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout_s: float = 10.0,
        command_timeout_s: float = 30.0,
    ) -> None:
        if not _SCHEMA_NAME.fullmatch(schema):
            raise ValueError(f"schema must be a plain identifier, got {schema!r}")
        self._dsn = dsn
        self._schema = schema
        self._min_size = min_size
        self._max_size = max_size
        self._connect_timeout_s = connect_timeout_s
        self._command_timeout_s = command_timeout_s
        self._secrets = _dsn_secrets(dsn)
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._channel = _channel_for(schema)

    # --- plumbing ---------------------------------------------------------------------------------

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        detail = f"postgresql: {type(exc).__name__}: {exc}"
        for secret in self._secrets:
            detail = detail.replace(secret, "***")
        return StoreUnavailable(detail)

    async def _run(self, fn: Callable[[Conn], Awaitable[T]], *, tx: bool = False) -> T:
        """Run `fn` on a pooled connection (in one transaction if `tx`), mapping outages."""
        pool = self._pool
        if pool is None:
            raise StoreUnavailable("postgresql: the store is not open")
        for attempt in range(1, _TX_ATTEMPTS + 1):
            try:
                async with pool.acquire(timeout=self._command_timeout_s) as conn:
                    if not tx:
                        return await fn(conn)
                    async with conn.transaction():
                        return await fn(conn)
            except asyncpg.TransactionRollbackError as exc:
                if attempt == _TX_ATTEMPTS:
                    raise self._unavailable(exc) from exc
            except asyncpg.IntegrityConstraintViolationError as exc:
                # Never the driver's text: it quotes the row.
                raise StoreConflict("the change conflicts with another watch") from exc
            except _UNAVAILABLE as exc:
                raise self._unavailable(exc) from exc
        raise AssertionError("unreachable")

    async def open(self) -> None:
        if self._pool is not None:
            return
        quoted = f'"{self._schema}"'
        try:
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._min_size,
                max_size=self._max_size,
                timeout=self._connect_timeout_s,
                command_timeout=self._command_timeout_s,
                server_settings={"search_path": quoted, "application_name": "hiapi-relay"},
            )
        except _OPEN_ERRORS as exc:
            raise self._unavailable(exc) from exc
        except ValueError:
            # Never echo the URL: it may carry a password.
            raise StoreUnavailable("postgresql: the store URL is not a valid DSN") from None
        self._pool = pool
        try:
            await self._run(self._migrate, tx=True)
        except asyncpg.PostgresError as exc:
            # No CREATE privilege for the schema, a newer schema than this build: cannot start.
            self._pool = None
            pool.terminate()
            raise self._unavailable(exc) from exc
        except BaseException:
            self._pool = None
            pool.terminate()
            raise

    async def _migrate(self, conn: Conn) -> None:
        await conn.execute(
            "SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY, timeout=MIGRATION_TIMEOUT_S
        )
        # Look before creating: CREATE SCHEMA IF NOT EXISTS still needs the CREATE privilege,
        # which a least-privilege role given a ready schema does not have.
        found = await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", self._schema)
        if found is None:
            await conn.execute(f'CREATE SCHEMA "{self._schema}"')
        await conn.execute(f'SET LOCAL search_path TO "{self._schema}"')
        # Same for the table: CREATE TABLE IF NOT EXISTS needs CREATE even when the table exists.
        if await conn.fetchval("SELECT to_regclass('relay_schema_migrations')") is None:
            await conn.execute(
                "CREATE TABLE relay_schema_migrations"
                " (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
        applied = {r[0] for r in await conn.fetch("SELECT version FROM relay_schema_migrations")}
        for version, script in enumerate(MIGRATIONS, start=1):
            if version in applied:
                continue
            await conn.execute(script, timeout=MIGRATION_TIMEOUT_S)
            await conn.execute("INSERT INTO relay_schema_migrations (version) VALUES ($1)", version)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), timeout=self._command_timeout_s)
        except TimeoutError:
            pool.terminate()

    async def ping(self) -> None:
        async def ping(conn: Conn) -> None:
            # Ready means a registration would commit: a standby after a failover, or a role
            # whose transactions default to read-only, answers SELECT 1 and refuses every write.
            read_only = await conn.fetchval("SELECT current_setting('transaction_read_only')")
            if read_only == "on":
                raise StoreUnavailable("postgresql: the database accepts no writes (read-only)")

        await self._run(ping)

    # --- the API's calls --------------------------------------------------------------------------

    async def register(
        self, new: NewWatch, *, watch_id: str, now: float, deadline_at: float
    ) -> tuple[Watch, bool]:
        async def register(conn: Conn) -> tuple[Watch, bool]:
            for _ in range(_TX_ATTEMPTS):
                # The watching one if any (a redelivered watch may be delivering beside it; ids
                # come from each replica's clock, so the newest id need not be the watching
                # one), else the newest.
                found_id = await conn.fetchval(
                    "SELECT watch_id FROM watches WHERE task_id = $1 AND callback_url = $2"
                    " AND state IN ('watching', 'delivering')"
                    " ORDER BY state = 'watching' DESC, watch_id DESC LIMIT 1",
                    new.task_id,
                    new.callback_url,
                )
                if found_id is not None:
                    existing = await _get(conn, found_id)
                    assert existing is not None
                    return existing, False
                # The unique index on watching pairs decides a race between replicas: the loser
                # waits for the winner's commit, inserts nothing, and finds its watch next round.
                inserted = await conn.fetchval(
                    "INSERT INTO watches (watch_id, task_id, callback_url, metadata, state,"
                    " created_at, updated_at, deadline_at)"
                    " VALUES ($1, $2, $3, $4, 'watching', $5, $5, $6)"
                    " ON CONFLICT (task_id, callback_url) WHERE state = 'watching'"
                    " DO NOTHING RETURNING watch_id",
                    watch_id,
                    new.task_id,
                    new.callback_url,
                    dumps_or_none(new.metadata),
                    now,
                    deadline_at,
                )
                if inserted is None:
                    continue
                # The first poll of a new stream is due at once; an existing stream keeps its pace.
                # DO UPDATE (a no-op) rather than DO NOTHING so the row stays locked to commit: a
                # finish, cancel or expiry then waits for this watch instead of missing it.
                await conn.execute(
                    "INSERT INTO tasks (task_id, next_poll_at, updated_at) VALUES ($1, $2, $2)"
                    " ON CONFLICT (task_id) DO UPDATE SET updated_at = tasks.updated_at",
                    new.task_id,
                    now,
                )
                # Delivered at commit: every replica's poller wakes for the new stream at once.
                await conn.execute("SELECT pg_notify($1, '')", self._channel)
                created = await _get(conn, watch_id)
                assert created is not None
                return created, True
            raise StoreUnavailable("postgresql: the registration kept racing; try again")

        return await self._run(register, tx=True)

    async def get_watch(self, watch_id: str) -> Watch | None:
        return await self._run(lambda conn: _get(conn, watch_id))

    async def list_watches(
        self, *, state: WatchState | None, task_id: str | None, limit: int, after: str | None
    ) -> list[Watch]:
        clauses: list[str] = []
        params: list[object] = []
        for clause, value in (
            ("w.state = ${}", None if state is None else state.value),
            ("w.task_id = ${}", task_id),
            ("w.watch_id > ${}", after),
        ):
            if value is not None:
                params.append(value)
                clauses.append(clause.format(len(params)))
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"{_SELECT_WATCH} {where} ORDER BY w.watch_id LIMIT ${len(params) + 1}"

        async def run(conn: Conn) -> list[Watch]:
            return [watch_from_row(r) for r in await conn.fetch(sql, *params, limit)]

        return await self._run(run)

    async def cancel_watch(self, watch_id: str, *, now: float) -> tuple[Watch, bool] | None:
        async def cancel(conn: Conn) -> tuple[Watch, bool] | None:
            task_id = await conn.fetchval(
                "SELECT task_id FROM watches WHERE watch_id = $1", watch_id
            )
            if task_id is None:
                return None
            await _lock_tasks(conn, [task_id])
            raw_state = await conn.fetchval(
                "SELECT state FROM watches WHERE watch_id = $1 FOR UPDATE", watch_id
            )
            if raw_state is None:  # the retention sweep deleted it meanwhile
                return None
            state = WatchState(raw_state)
            if state is WatchState.CANCELLED:
                return await _found(conn, watch_id), False
            if state not in ACTIVE_STATES:
                raise StoreConflict(f"the watch is already {state.value}")
            # A watching watch keeps what its stream knew, so the cancelled watch still shows
            # it; a delivering one already shows its task's end (a stream under that task id
            # now is another URL's). SET reads the row as it was: `state` is the old state.
            await conn.execute(
                "UPDATE watches SET state = 'cancelled', next_delivery_at = NULL, updated_at = $2,"
                " task_status = CASE WHEN state = 'watching' THEN"
                " COALESCE((SELECT status FROM tasks WHERE task_id = $3), task_status)"
                " ELSE task_status END,"
                " polls = CASE WHEN state = 'watching' THEN"
                " COALESCE((SELECT polls FROM tasks WHERE task_id = $3), polls) ELSE polls END"
                " WHERE watch_id = $1",
                watch_id,
                now,
                task_id,
            )
            await conn.execute(_DROP_UNWATCHED_TASKS, [task_id])
            return await _found(conn, watch_id), True

        return await self._run(cancel, tx=True)

    async def redeliver(self, watch_id: str, *, now: float) -> Watch | None:
        async def redeliver(conn: Conn) -> Watch | None:
            raw_state = await conn.fetchval(
                "SELECT state FROM watches WHERE watch_id = $1 FOR UPDATE", watch_id
            )
            if raw_state is None:
                return None
            state = WatchState(raw_state)
            if state not in (WatchState.DELIVERED, WatchState.FAILED):
                raise StoreConflict(
                    f"only a delivered or failed watch can be redelivered; this one is {state.value}"
                )
            await conn.execute(
                "UPDATE watches SET state = 'delivering', next_delivery_at = $2,"
                " delivery_attempts = 0, last_error = NULL, updated_at = $2 WHERE watch_id = $1",
                watch_id,
                now,
            )
            return await _get(conn, watch_id)

        return await self._run(redeliver, tx=True)

    # --- the poller's calls -----------------------------------------------------------------------

    async def claim_due_tasks(self, *, now: float, limit: int, lease_s: float) -> list[TaskClaim]:
        async def claim(conn: Conn) -> list[TaskClaim]:
            lease_until = now + lease_s
            rows = await conn.fetch(_CLAIM_TASKS, now, limit, lease_until)
            claims = [claim_from_row(r, lease_until) for r in rows]
            # RETURNING has no order of its own.
            claims.sort(key=lambda c: (c.due_at, c.task_id))
            return claims

        return await self._run(claim)

    async def apply_poll_results(
        self, plans: Sequence[TaskUpdate | TaskFinish], *, now: float
    ) -> int:
        updates = [p for p in plans if isinstance(p, TaskUpdate)]
        finishes = [p for p in plans if isinstance(p, TaskFinish)]
        if not plans:
            return 0

        async def apply(conn: Conn) -> int:
            await _lock_tasks(conn, [p.task_id for p in plans])
            if updates:
                await conn.executemany(
                    "UPDATE tasks SET status = COALESCE($1, status), polls = polls + 1,"
                    " next_poll_at = $2, interval_s = $3, error_streak = $4,"
                    " first_not_found_at = $5, last_error = $6, updated_at = $7"
                    " WHERE task_id = $8 AND next_poll_at = $9",
                    [task_update_params(u, now) for u in updates],
                )
            moved = 0
            for f in finishes:
                status = await conn.execute(
                    "WITH gone AS (DELETE FROM tasks WHERE task_id = $1 RETURNING status, polls)"
                    " UPDATE watches SET state = 'delivering', event_type = $2, event_at = $3,"
                    " task_data = $4, next_delivery_at = $3, delivery_attempts = 0,"
                    " task_status = COALESCE($5, (SELECT status FROM gone)),"
                    " polls = COALESCE((SELECT polls + 1 FROM gone), polls),"
                    " last_error = NULL, updated_at = $3"
                    " WHERE task_id = $1 AND state = 'watching'",
                    f.task_id,
                    f.event_type.value,
                    now,
                    dumps_or_none(f.task_data),
                    f.status,
                )
                moved += _row_count(status)
            return moved

        return await self._run(apply, tx=True)

    async def expire_watches(self, *, now: float, limit: int) -> int:
        async def expire(conn: Conn) -> int:
            rows = await conn.fetch(
                "SELECT watch_id, task_id FROM watches WHERE state = 'watching'"
                " AND deadline_at <= $1 ORDER BY deadline_at LIMIT $2",
                now,
                limit,
            )
            if not rows:
                return 0
            task_ids = sorted({r[1] for r in rows})
            await _lock_tasks(conn, task_ids)
            # `state = 'watching'` again: another replica may have moved some since the SELECT.
            status = await conn.execute(
                "UPDATE watches w SET state = 'delivering', event_type = $2, event_at = $3,"
                " task_data = NULL, next_delivery_at = $3, delivery_attempts = 0, updated_at = $3,"
                " task_status = COALESCE((SELECT status FROM tasks t WHERE t.task_id = w.task_id),"
                " w.task_status),"
                " polls = COALESCE((SELECT polls FROM tasks t WHERE t.task_id = w.task_id),"
                " w.polls)"
                " WHERE w.watch_id = ANY($1::text[]) AND w.state = 'watching'",
                [r[0] for r in rows],
                EventType.TIMEOUT.value,
                now,
            )
            await conn.execute(_DROP_UNWATCHED_TASKS, task_ids)
            return _row_count(status)

        return await self._run(expire, tx=True)

    async def purge_finished(self, *, before: float, limit: int) -> int:
        async def purge(conn: Conn) -> int:
            # SKIP LOCKED: replicas sweeping at once take different rows. The outer WHERE is
            # checked again on the locked row: a watch redelivered meanwhile stays.
            status = await conn.execute(
                "DELETE FROM watches WHERE watch_id = ANY(ARRAY(SELECT watch_id FROM watches"
                " WHERE state IN ('delivered', 'failed', 'cancelled') AND updated_at < $1"
                " ORDER BY updated_at LIMIT $2 FOR UPDATE SKIP LOCKED))"
                " AND state IN ('delivered', 'failed', 'cancelled') AND updated_at < $1",
                before,
                limit,
            )
            return _row_count(status)

        return await self._run(purge, tx=True)

    # --- the deliverer's calls --------------------------------------------------------------------

    async def claim_due_deliveries(
        self, *, now: float, limit: int, lease_s: float
    ) -> list[DeliveryJob]:
        async def claim(conn: Conn) -> list[DeliveryJob]:
            lease_until = now + lease_s
            rows = await conn.fetch(_CLAIM_DELIVERIES, now, limit, lease_until)
            jobs = [job_from_row(r, lease_until) for r in rows]
            # RETURNING has no order of its own.
            jobs.sort(key=lambda j: (j.due_at, j.watch_id))
            return jobs

        return await self._run(claim)

    async def record_deliveries(self, records: Sequence[DeliveryRecord], *, now: float) -> set[str]:
        if not records:
            return set()

        async def record(conn: Conn) -> set[str]:
            applied = set()
            # Watch id order, so two replicas recording overlapping batches cannot deadlock.
            for r in sorted(records, key=lambda r: r.watch_id):
                # `state = 'delivering'` fences out a watch cancelled while its attempt was out;
                # the lease, the outcome of a claim another claimer has taken over since (or a
                # redelivery queued after that other claim delivered it).
                found = await conn.fetchval(
                    "UPDATE watches SET state = $1, delivery_attempts = delivery_attempts + 1,"
                    " next_delivery_at = $2, last_error = $3, updated_at = $4"
                    " WHERE watch_id = $5 AND state = 'delivering' AND next_delivery_at = $6"
                    " RETURNING watch_id",
                    *delivery_record_params(r, now),
                )
                if found is not None:
                    applied.add(r.watch_id)
            return applied

        return await self._run(record, tx=True)

    async def release_tasks(self, held: Sequence[tuple[str, float]], *, due_at: float) -> None:
        async def release(conn: Conn) -> None:
            ordered = sorted(held)
            await conn.execute(
                "UPDATE tasks t SET next_poll_at = $1"
                " FROM unnest($2::text[], $3::float8[]) AS h(task_id, lease_until)"
                " WHERE t.task_id = h.task_id AND t.next_poll_at = h.lease_until",
                due_at,
                [task_id for task_id, _ in ordered],
                [lease_until for _, lease_until in ordered],
            )

        if held:
            await self._run(release)

    async def defer_deliveries(self, held: Sequence[tuple[str, float]], *, due_at: float) -> None:
        async def defer(conn: Conn) -> None:
            ordered = sorted(held)
            await conn.execute(
                "UPDATE watches w SET next_delivery_at = $1"
                " FROM unnest($2::text[], $3::float8[]) AS h(watch_id, held_until)"
                " WHERE w.watch_id = h.watch_id AND w.state = 'delivering'"
                " AND w.next_delivery_at = h.held_until",
                due_at,
                [watch_id for watch_id, _ in ordered],
                [held_until for _, held_until in ordered],
            )

        if held:
            await self._run(defer)

    async def hasten_deliveries(
        self, watch_ids: Sequence[str], *, deferred_to: float, due_at: float
    ) -> None:
        async def hasten(conn: Conn) -> None:
            await conn.execute(
                "UPDATE watches SET next_delivery_at = $1 WHERE watch_id = ANY($2::text[])"
                " AND state = 'delivering' AND next_delivery_at = $3",
                due_at,
                sorted(watch_ids),
                deferred_to,
            )

        if watch_ids:
            await self._run(hasten)

    # --- schedule and gauges ----------------------------------------------------------------------

    async def next_poll_due_at(self) -> float | None:
        return await self._earliest("SELECT min(next_poll_at) FROM tasks")

    async def next_deadline_at(self) -> float | None:
        return await self._earliest("SELECT min(deadline_at) FROM watches WHERE state = 'watching'")

    async def next_delivery_due_at(self) -> float | None:
        return await self._earliest(
            "SELECT min(next_delivery_at) FROM watches WHERE state = 'delivering'"
        )

    async def _earliest(self, query: str) -> float | None:
        """The value of a `SELECT min(...)` query."""

        async def run(conn: Conn) -> float | None:
            earliest: float | None = await conn.fetchval(query)
            return earliest

        return await self._run(run)

    async def count_by_state(self) -> dict[WatchState, int]:
        async def run(conn: Conn) -> dict[WatchState, int]:
            counts = dict.fromkeys(WatchState, 0)
            for state, count in await conn.fetch(
                "SELECT state, count(*) FROM watches GROUP BY state"
            ):
                counts[WatchState(state)] = count
            return counts

        return await self._run(run)

    # --- replicas ---------------------------------------------------------------------------------

    async def heartbeat(self, replica_id: str, *, now: float, stale_after_s: float) -> int:
        async def beat(conn: Conn) -> int:
            await conn.execute(
                "INSERT INTO relay_replicas (replica_id, heartbeat_at) VALUES ($1, $2)"
                " ON CONFLICT (replica_id) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at",
                replica_id,
                now,
            )
            await conn.execute(
                "DELETE FROM relay_replicas WHERE heartbeat_at < $1", now - stale_after_s
            )
            live: int = await conn.fetchval("SELECT count(*) FROM relay_replicas")
            return live

        return await self._run(beat, tx=True)

    async def retire(self, replica_id: str) -> None:
        async def retire(conn: Conn) -> None:
            await conn.execute("DELETE FROM relay_replicas WHERE replica_id = $1", replica_id)

        await self._run(retire)

    async def listen_registrations(self, wake: Callable[[], None], stopping: asyncio.Event) -> None:
        """LISTEN on a connection of its own (not the pool's), reconnecting after an outage."""

        def on_notify(*_: object) -> None:
            wake()

        while not stopping.is_set():
            conn: asyncpg.Connection[asyncpg.Record] | None = None
            try:
                conn = await asyncpg.connect(self._dsn, timeout=self._connect_timeout_s)
                await conn.add_listener(self._channel, on_notify)
                wake()  # registrations made while we were not listening
                closed = asyncio.Event()
                conn.add_termination_listener(partial(_set_event, closed))
                await _first_of(stopping.wait(), closed.wait())
            except _OPEN_ERRORS:
                pass
            finally:
                if conn is not None and not conn.is_closed():
                    await conn.close(timeout=self._command_timeout_s)
            if not stopping.is_set():
                await _first_of(stopping.wait(), asyncio.sleep(LISTEN_RETRY_S))


def _dsn_secrets(dsn: str) -> list[str]:
    """The password a DSN carries (in the authority or as `?password=`), to scrub from messages."""
    try:
        parts = urllib.parse.urlsplit(dsn)
        secrets = [parts.password or ""]
        secrets += urllib.parse.parse_qs(parts.query).get("password", [])
    except ValueError:
        return []
    secrets += [urllib.parse.unquote(s) for s in secrets]
    return sorted({s for s in secrets if s}, key=len, reverse=True)


async def _first_of(*aws: Awaitable[object]) -> None:
    """Wait until any of `aws` finishes; cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def _set_event(event: asyncio.Event, *_: object) -> None:
    event.set()
