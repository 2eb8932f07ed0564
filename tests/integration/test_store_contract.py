"""The Store contract, run over every store; then what only the shared PostgreSQL store promises.

Every time is an explicit `now`: nothing here reads a clock or sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from relay.models import (
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
from relay.store import Store, StoreConflict, StoreUnavailable, open_store
from relay.store.postgres import MIGRATIONS, PostgresStore
from relay.store.sqlite import SQLiteStore
from tests.processes import settle

PG_DSN_ENV = "RELAY_TEST_POSTGRES_DSN"
PG_SKIP = (
    "set RELAY_TEST_POSTGRES_DSN=postgresql://postgres@127.0.0.1:5432/test"
    " to run the PostgreSQL tests"
)

T0 = 1_700_000_000.0
LEASE = 30.0
HOUR = 3600.0
TASK_A = "tk-hiapi-a"
TASK_B = "tk-hiapi-b"
TASK_C = "tk-hiapi-c"
HOOK = "http://127.0.0.1:9/hook"
OTHER_HOOK = "http://127.0.0.1:9/other"


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_schemas() -> Iterator[list[str]]:
    """Schemas this session made on the test database; every one is dropped at the end."""
    made: list[str] = []
    yield made
    dsn = os.environ.get(PG_DSN_ENV)
    if dsn and made:
        asyncio.run(_drop_schemas(dsn, made))


async def _drop_schemas(dsn: str, schemas: list[str]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for schema in schemas:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_prefix() -> str:
    return f"relay_test_{os.getpid()}_{secrets.token_hex(4)}"


@pytest.fixture
def pg_dsn() -> str:
    dsn = os.environ.get(PG_DSN_ENV)
    if not dsn:
        pytest.skip(PG_SKIP)
    return dsn


class Schemas:
    """Names schemas under this session's prefix and remembers them for the final drop."""

    def __init__(self, prefix: str, made: list[str]) -> None:
        self._prefix = prefix
        self._made = made

    def __call__(self, suffix: str) -> str:
        name = f"{self._prefix}_{suffix}"
        if name not in self._made:
            self._made.append(name)
        return name


@pytest.fixture
def schemas(pg_prefix: str, pg_schemas: list[str]) -> Schemas:
    return Schemas(pg_prefix, pg_schemas)


@pytest.fixture(params=["sqlite", "postgres"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, schemas: Schemas
) -> AsyncIterator[Store]:
    """A freshly opened, empty store of each kind."""
    opened: Store
    if request.param == "sqlite":
        opened = SQLiteStore(str(tmp_path / "relay.db"))
        await opened.open()
    else:
        dsn = os.environ.get(PG_DSN_ENV)
        if not dsn:
            pytest.skip(PG_SKIP)
        schema = schemas("contract")
        opened = PostgresStore(dsn, schema=schema, max_size=4)
        await opened.open()
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                f'TRUNCATE "{schema}".watches, "{schema}".tasks, "{schema}".relay_replicas'
            )
        finally:
            await conn.close()
    yield opened
    await opened.close()


# --- helpers --------------------------------------------------------------------------------------


async def register(
    store: Store,
    watch_id: str,
    task_id: str = TASK_A,
    callback_url: str = HOOK,
    *,
    now: float = T0,
    deadline_at: float = T0 + HOUR,
    metadata: dict[str, Any] | None = None,
) -> Watch:
    watch, created = await store.register(
        NewWatch(task_id=task_id, callback_url=callback_url, metadata=metadata),
        watch_id=watch_id,
        now=now,
        deadline_at=deadline_at,
    )
    assert created
    return watch


async def get(store: Store, watch_id: str) -> Watch:
    watch = await store.get_watch(watch_id)
    assert watch is not None
    return watch


def update(
    task_id: str = TASK_A,
    *,
    next_poll_at: float,
    status: str | None = "handling",
    interval: float = 2.0,
    error_streak: int = 0,
    first_not_found_at: float | None = None,
    last_error: str | None = None,
    lease_until: float = T0 + LEASE,
) -> TaskUpdate:
    """An update of the stream claimed at `lease_until` - LEASE (at T0 unless said)."""
    return TaskUpdate(
        task_id=task_id,
        status=status,
        next_poll_at=next_poll_at,
        interval=interval,
        error_streak=error_streak,
        first_not_found_at=first_not_found_at,
        last_error=last_error,
        lease_until=lease_until,
    )


def finish(
    task_id: str = TASK_A,
    data: dict[str, Any] | None = None,
    *,
    event_type: EventType = EventType.SUCCESS,
    status: str | None = "success",
) -> TaskFinish:
    return TaskFinish(
        task_id=task_id,
        event_type=event_type,
        task_data={"status": "success"} if data is None else data,
        status=status,
    )


async def deliver_now(store: Store, watch_id: str, now: float) -> None:
    """Claim the watch's callback at `now`; it must be the one due."""
    [job] = await store.claim_due_deliveries(now=now, limit=10, lease_s=LEASE)
    assert watch_id == job.watch_id


def record(
    watch_id: str,
    outcome: DeliveryOutcome,
    next_attempt_at: float | None = None,
    last_error: str | None = None,
    lease_until: float = T0 + 2 + LEASE,
) -> DeliveryRecord:
    """An attempt's outcome for the callback claimed at `lease_until` - LEASE (deliver_now's
    T0 + 2 unless said)."""
    return DeliveryRecord(
        watch_id=watch_id,
        outcome=outcome,
        next_attempt_at=next_attempt_at,
        last_error=last_error,
        lease_until=lease_until,
    )


async def delivered_watch(store: Store, watch_id: str, *, outcome: DeliveryOutcome) -> None:
    """Register, finish and attempt once with `outcome` (at T0, T0+1, T0+2)."""
    await register(store, watch_id)
    await store.apply_poll_results([finish()], now=T0 + 1)
    await deliver_now(store, watch_id, T0 + 2)
    await store.record_deliveries([record(watch_id, outcome, last_error="HTTP 500")], now=T0 + 2)


# --- registration ---------------------------------------------------------------------------------


async def test_register_commits_a_watching_watch_and_a_poll_stream_due_now(store: Store) -> None:
    """A new watch is watching, shows its stream's schedule, and its stream is due at once."""
    watch = await register(store, "wt_01", metadata={"order": 7})

    expected = Watch(
        watch_id="wt_01",
        task_id=TASK_A,
        callback_url=HOOK,
        metadata={"order": 7},
        state=WatchState.WATCHING,
        task_status=None,
        polls=0,
        next_poll_at=T0,
        delivery_attempts=0,
        last_error=None,
        created_at=T0,
        updated_at=T0,
        deadline_at=T0 + HOUR,
    )
    assert expected == watch
    assert expected == await store.get_watch("wt_01")
    assert T0 == await store.next_poll_due_at()
    assert [
        TaskClaim(
            task_id=TASK_A,
            polls=0,
            interval=0.0,
            error_streak=0,
            first_not_found_at=None,
            due_at=T0,
            lease_until=T0 + LEASE,
        )
    ] == await store.claim_due_tasks(now=T0, limit=10, lease_s=LEASE)


async def test_registering_an_active_pair_again_returns_the_existing_watch(store: Store) -> None:
    """The same task and callback URL while active: (existing, False), nothing new stored."""
    first = await register(store, "wt_01", metadata={"first": True})

    again, created = await store.register(
        NewWatch(task_id=TASK_A, callback_url=HOOK, metadata={"second": True}),
        watch_id="wt_02",
        now=T0 + 5,
        deadline_at=T0 + 2 * HOUR,
    )

    assert (first, False) == (again, created)
    assert None is await store.get_watch("wt_02")
    assert 1 == (await store.count_by_state())[WatchState.WATCHING]


async def test_registering_a_pair_whose_watch_is_delivering_returns_that_watch(
    store: Store,
) -> None:
    """A delivering watch still holds its pair: no second callback for the same task and URL."""
    await register(store, "wt_01")
    await store.apply_poll_results([finish()], now=T0 + 1)

    again, created = await store.register(
        NewWatch(task_id=TASK_A, callback_url=HOOK, metadata=None),
        watch_id="wt_02",
        now=T0 + 2,
        deadline_at=T0 + HOUR,
    )

    assert ("wt_01", WatchState.DELIVERING, False) == (again.watch_id, again.state, created)
    assert (None, None) == (await store.next_poll_due_at(), await store.next_deadline_at())


async def test_another_callback_url_on_the_same_task_shares_the_poll_stream(store: Store) -> None:
    """Two watches of one task: one stream, which keeps its pace when the second registers."""
    await register(store, "wt_01")
    await store.claim_due_tasks(now=T0, limit=10, lease_s=LEASE)
    await store.apply_poll_results([update(next_poll_at=T0 + 8)], now=T0 + 1)

    second = await register(store, "wt_02", callback_url=OTHER_HOOK, now=T0 + 2)

    assert (T0 + 8, 1, "handling") == (second.next_poll_at, second.polls, second.task_status)
    assert second == await store.get_watch("wt_02")
    assert [] == await store.claim_due_tasks(now=T0 + 7, limit=10, lease_s=LEASE)
    claims = await store.claim_due_tasks(now=T0 + 8, limit=10, lease_s=LEASE)
    assert [TASK_A] == [c.task_id for c in claims]


async def test_pair_registers_anew_once_its_watch_was_delivered(store: Store) -> None:
    """A delivered watch no longer holds its pair: registering it again makes a new watch."""
    await delivered_watch(store, "wt_01", outcome=DeliveryOutcome.DELIVERED)

    watch, created = await store.register(
        NewWatch(task_id=TASK_A, callback_url=HOOK, metadata=None),
        watch_id="wt_02",
        now=T0 + 10,
        deadline_at=T0 + HOUR,
    )

    assert (True, "wt_02", WatchState.WATCHING) == (created, watch.watch_id, watch.state)
    assert (0, T0 + 10) == (watch.polls, watch.next_poll_at)
    assert WatchState.DELIVERED == (await get(store, "wt_01")).state


async def test_pair_registers_anew_once_its_watch_was_cancelled(store: Store) -> None:
    """A cancelled watch no longer holds its pair either."""
    await register(store, "wt_01")
    await store.cancel_watch("wt_01", now=T0 + 1)

    _, created = await store.register(
        NewWatch(task_id=TASK_A, callback_url=HOOK, metadata=None),
        watch_id="wt_02",
        now=T0 + 2,
        deadline_at=T0 + HOUR,
    )

    assert created


async def test_registering_again_answers_the_watching_watch_beside_a_redelivered_one(
    store: Store,
) -> None:
    """A delivered watch redelivered while a newer watch of the same pair is watching: a new
    registration answers the watching one, whichever id sorts higher (ids come from each
    replica's clock)."""
    await delivered_watch(store, "wt_09", outcome=DeliveryOutcome.DELIVERED)
    await register(store, "wt_02", now=T0 + 5)
    await store.redeliver("wt_09", now=T0 + 6)

    watch, created = await store.register(
        NewWatch(task_id=TASK_A, callback_url=HOOK, metadata=None),
        watch_id="wt_10",
        now=T0 + 7,
        deadline_at=T0 + HOUR,
    )

    assert (False, "wt_02", WatchState.WATCHING) == (created, watch.watch_id, watch.state)


async def test_registering_with_a_taken_watch_id_conflicts(store: Store) -> None:
    """An id clash is a StoreConflict, and the first watch stays as it was."""
    first = await register(store, "wt_01")

    with pytest.raises(StoreConflict):
        await register(store, "wt_01", TASK_B)

    assert first == await store.get_watch("wt_01")
    assert [TASK_A] == [
        c.task_id for c in await store.claim_due_tasks(now=T0, limit=10, lease_s=LEASE)
    ]


async def test_metadata_keeps_its_key_order_and_none_stays_none(store: Store) -> None:
    """Metadata comes back exactly as given, key order included; absent metadata is None."""
    metadata = {"zulu": 1, "alpha": {"yankee": 2, "bravo": [3, {"x": None}]}, "mike": "é"}
    await register(store, "wt_01", metadata=metadata)
    await register(store, "wt_02", task_id=TASK_B)

    watch = await get(store, "wt_01")
    assert metadata == watch.metadata
    assert watch.metadata is not None
    assert ["zulu", "alpha", "mike"] == list(watch.metadata)
    assert ["yankee", "bravo"] == list(watch.metadata["alpha"])
    assert None is (await get(store, "wt_02")).metadata


# --- poll streams ---------------------------------------------------------------------------------


async def test_claim_returns_due_streams_earliest_first_with_their_original_due_time(
    store: Store,
) -> None:
    """Due streams come earliest first, each with the due time it had before the claim."""
    await register(store, "wt_01", TASK_A, now=T0 + 2)
    await register(store, "wt_02", TASK_B, now=T0)
    await register(store, "wt_03", TASK_C, now=T0 + 1)
    await register(store, "wt_04", "tk-hiapi-later", now=T0 + 10)

    claims = await store.claim_due_tasks(now=T0 + 5, limit=10, lease_s=LEASE)

    assert [(TASK_B, T0), (TASK_C, T0 + 1), (TASK_A, T0 + 2)] == [
        (c.task_id, c.due_at) for c in claims
    ]


async def test_claim_takes_at_most_limit_streams(store: Store) -> None:
    """A claim takes the `limit` earliest; the next claim takes the rest."""
    for n, task_id in enumerate((TASK_A, TASK_B, TASK_C)):
        await register(store, f"wt_{n}", task_id, now=T0 + n)

    first = await store.claim_due_tasks(now=T0 + 5, limit=2, lease_s=LEASE)
    second = await store.claim_due_tasks(now=T0 + 5, limit=2, lease_s=LEASE)

    assert [TASK_A, TASK_B] == [c.task_id for c in first]
    assert [TASK_C] == [c.task_id for c in second]


async def test_claimed_stream_falls_due_again_when_its_lease_expires(store: Store) -> None:
    """A claim is a lease: not claimable before now + lease, claimable again from then."""
    await register(store, "wt_01")
    await store.claim_due_tasks(now=T0 + 1, limit=10, lease_s=LEASE)

    assert [] == await store.claim_due_tasks(now=T0 + 1 + LEASE - 0.001, limit=10, lease_s=LEASE)
    assert T0 + 1 + LEASE == await store.next_poll_due_at()
    assert T0 + 1 + LEASE == (await get(store, "wt_01")).next_poll_at
    reclaimed = await store.claim_due_tasks(now=T0 + 1 + LEASE, limit=10, lease_s=LEASE)
    assert [(TASK_A, T0 + 1 + LEASE)] == [(c.task_id, c.due_at) for c in reclaimed]


async def test_task_update_reschedules_counts_the_poll_and_keeps_the_last_known_status(
    store: Store,
) -> None:
    """An update sets the schedule, adds a poll, and a None status keeps the one known before."""
    await register(store, "wt_01")
    await store.claim_due_tasks(now=T0, limit=10, lease_s=LEASE)

    moved = await store.apply_poll_results([update(next_poll_at=T0 + 4)], now=T0 + 1)
    await store.claim_due_tasks(now=T0 + 4, limit=10, lease_s=LEASE)
    await store.apply_poll_results(
        [
            update(
                status=None,
                next_poll_at=T0 + 20,
                interval=8.0,
                error_streak=2,
                first_not_found_at=T0 + 4,
                last_error="upstream answered 503",
                lease_until=T0 + 4 + LEASE,  # the second claim's
            )
        ],
        now=T0 + 5,
    )

    assert 0 == moved
    watch = await get(store, "wt_01")
    assert ("handling", 2, T0 + 20, "upstream answered 503") == (
        watch.task_status,
        watch.polls,
        watch.next_poll_at,
        watch.last_error,
    )
    assert [] == await store.claim_due_tasks(now=T0 + 19.9, limit=10, lease_s=LEASE)
    assert [
        TaskClaim(
            task_id=TASK_A,
            polls=2,
            interval=8.0,
            error_streak=2,
            first_not_found_at=T0 + 4,
            due_at=T0 + 20,
            lease_until=T0 + 20 + LEASE,
        )
    ] == await store.claim_due_tasks(now=T0 + 20, limit=10, lease_s=LEASE)


async def test_poll_result_for_a_dropped_stream_changes_nothing(store: Store) -> None:
    """A poll that lands after its only watch was cancelled neither revives nor moves anything."""
    await register(store, "wt_01")
    await store.claim_due_tasks(now=T0, limit=10, lease_s=LEASE)
    await store.cancel_watch("wt_01", now=T0 + 1)

    moved = await store.apply_poll_results(
        [update(next_poll_at=T0 + 4), finish(TASK_B)], now=T0 + 2
    )

    assert 0 == moved
    assert (None, None) == (await store.next_poll_due_at(), await store.next_deadline_at())
    assert WatchState.CANCELLED == (await get(store, "wt_01")).state


async def test_task_finish_moves_every_watching_watch_to_delivering_with_data_verbatim(
    store: Store,
) -> None:
    """A finish moves all the task's watching watches, drops its stream, and keeps data exact."""
    metadata = {"zz": 1, "aa": 2}
    data = {
        "taskId": TASK_A,
        "status": "success",
        "zeta": 1.5,
        "alpha": {"yankee": [3, 2, 1], "bravo": None},
        "mike": "ünïcode ✓",
    }
    await register(store, "wt_01", metadata=metadata)
    await register(store, "wt_02", callback_url=OTHER_HOOK)
    await register(store, "wt_03", TASK_B)
    await store.claim_due_tasks(now=T0, limit=10, lease_s=LEASE)

    moved = await store.apply_poll_results(
        [finish(TASK_A, data), update(TASK_B, next_poll_at=T0 + 4)], now=T0 + 1
    )

    assert 2 == moved
    for watch_id in ("wt_01", "wt_02"):
        watch = await get(store, watch_id)
        assert (WatchState.DELIVERING, "success", 1, None, None) == (
            watch.state,
            watch.task_status,
            watch.polls,
            watch.next_poll_at,
            watch.last_error,
        )
    assert WatchState.WATCHING == (await get(store, "wt_03")).state
    claims = await store.claim_due_tasks(now=T0 + 100, limit=10, lease_s=LEASE)
    assert [TASK_B] == [c.task_id for c in claims]

    jobs = await store.claim_due_deliveries(now=T0 + 1, limit=10, lease_s=LEASE)

    assert ["wt_01", "wt_02"] == sorted(j.watch_id for j in jobs)
    for job in jobs:
        assert (TASK_A, EventType.SUCCESS, T0 + 1, 0, T0 + 1) == (
            job.task_id,
            job.event_type,
            job.event_at,
            job.attempts,
            job.due_at,
        )
        assert data == job.task_data
        assert job.task_data is not None
        assert ["taskId", "status", "zeta", "alpha", "mike"] == list(job.task_data)
        assert ["yankee", "bravo"] == list(job.task_data["alpha"])
    by_id = {j.watch_id: j for j in jobs}
    assert (HOOK, metadata) == (by_id["wt_01"].callback_url, by_id["wt_01"].metadata)
    assert ["zz", "aa"] == list(by_id["wt_01"].metadata or {})
    assert (OTHER_HOOK, None) == (by_id["wt_02"].callback_url, by_id["wt_02"].metadata)


async def test_task_finish_with_no_status_keeps_the_last_known_one(store: Store) -> None:
    """A finish without a status (not found) shows the status the stream last knew."""
    await register(store, "wt_01")
    await store.claim_due_tasks(now=T0, limit=10, lease_s=LEASE)
    await store.apply_poll_results([update(next_poll_at=T0 + 2, status="queued")], now=T0 + 1)

    await store.apply_poll_results(
        [finish(event_type=EventType.NOT_FOUND, status=None, data={})], now=T0 + 2
    )

    watch = await get(store, "wt_01")
    assert (WatchState.DELIVERING, "queued", 2) == (watch.state, watch.task_status, watch.polls)


# --- deliveries -----------------------------------------------------------------------------------


async def test_claimed_delivery_is_leased_until_now_plus_lease(store: Store) -> None:
    """Deliveries come earliest first with their due time and are leased like poll streams."""
    await register(store, "wt_01", TASK_A)
    await register(store, "wt_02", TASK_B)
    await store.apply_poll_results([finish(TASK_B)], now=T0 + 1)
    await store.apply_poll_results([finish(TASK_A)], now=T0 + 2)

    limited = await store.claim_due_deliveries(now=T0 + 5, limit=1, lease_s=LEASE)
    rest = await store.claim_due_deliveries(now=T0 + 5, limit=10, lease_s=LEASE)

    assert [("wt_02", T0 + 1)] == [(j.watch_id, j.due_at) for j in limited]
    assert [("wt_01", T0 + 2)] == [(j.watch_id, j.due_at) for j in rest]
    assert T0 + 5 + LEASE == await store.next_delivery_due_at()
    assert [] == await store.claim_due_deliveries(
        now=T0 + 5 + LEASE - 0.001, limit=10, lease_s=LEASE
    )
    again = await store.claim_due_deliveries(now=T0 + 5 + LEASE, limit=10, lease_s=LEASE)
    assert [("wt_01", 0), ("wt_02", 0)] == sorted((j.watch_id, j.attempts) for j in again)


@pytest.mark.parametrize(
    ("outcome", "next_attempt_at", "state", "next_due"),
    [
        (DeliveryOutcome.DELIVERED, None, WatchState.DELIVERED, None),
        (DeliveryOutcome.RETRY, T0 + 60, WatchState.DELIVERING, T0 + 60),
        (DeliveryOutcome.GAVE_UP, None, WatchState.FAILED, None),
    ],
)
async def test_recorded_attempt_sets_state_attempts_next_time_and_error(
    store: Store,
    outcome: DeliveryOutcome,
    next_attempt_at: float | None,
    state: WatchState,
    next_due: float | None,
) -> None:
    """Each outcome moves the watch to its state, counts the attempt and keeps the error."""
    await register(store, "wt_01")
    await store.apply_poll_results([finish()], now=T0 + 1)
    await deliver_now(store, "wt_01", T0 + 2)

    recorded = await store.record_deliveries(
        [record("wt_01", outcome, next_attempt_at, "receiver answered 500")], now=T0 + 3
    )

    assert {"wt_01"} == recorded
    watch = await get(store, "wt_01")
    assert (state, 1, "receiver answered 500", T0 + 3) == (
        watch.state,
        watch.delivery_attempts,
        watch.last_error,
        watch.updated_at,
    )
    assert next_due == await store.next_delivery_due_at()


async def test_retried_delivery_comes_back_at_its_next_time_with_the_attempt_counted(
    store: Store,
) -> None:
    """A retry is claimable at its next time, carrying the attempts so far."""
    await register(store, "wt_01")
    await store.apply_poll_results([finish()], now=T0 + 1)
    await deliver_now(store, "wt_01", T0 + 2)
    await store.record_deliveries(
        [record("wt_01", DeliveryOutcome.RETRY, T0 + 60, "timeout")], now=T0 + 3
    )

    assert [] == await store.claim_due_deliveries(now=T0 + 59, limit=10, lease_s=LEASE)
    [job] = await store.claim_due_deliveries(now=T0 + 60, limit=10, lease_s=LEASE)
    assert ("wt_01", 1, T0 + 60) == (job.watch_id, job.attempts, job.due_at)


async def test_record_for_a_watch_cancelled_mid_attempt_is_ignored(store: Store) -> None:
    """An attempt that ends after its watch was cancelled does not revive or count."""
    await register(store, "wt_01")
    await store.apply_poll_results([finish()], now=T0 + 1)
    await deliver_now(store, "wt_01", T0 + 2)
    await store.cancel_watch("wt_01", now=T0 + 3)

    recorded = await store.record_deliveries(
        [record("wt_01", DeliveryOutcome.DELIVERED, last_error=None)], now=T0 + 4
    )

    assert set() == recorded  # the deliverer counts no delivered watch for it

    watch = await get(store, "wt_01")
    assert (WatchState.CANCELLED, 0, T0 + 3) == (
        watch.state,
        watch.delivery_attempts,
        watch.updated_at,
    )
    assert None is await store.next_delivery_due_at()


# --- cancel and redeliver -------------------------------------------------------------------------


async def test_cancelling_the_only_watcher_drops_the_stream_and_keeps_what_it_knew(
    store: Store,
) -> None:
    """Cancel ends a watching watch, drops its unwatched stream and keeps its last status."""
    await register(store, "wt_01")
    await store.claim_due_tasks(now=T0, limit=10, lease_s=LEASE)
    await store.apply_poll_results(
        [update(next_poll_at=T0 + 4, last_error="upstream answered 503")], now=T0 + 1
    )

    result = await store.cancel_watch("wt_01", now=T0 + 2)

    assert result is not None
    cancelled, cancelled_now = result
    assert cancelled_now
    assert (WatchState.CANCELLED, "handling", 1, None, None, T0 + 2) == (
        cancelled.state,
        cancelled.task_status,
        cancelled.polls,
        cancelled.next_poll_at,
        cancelled.last_error,
        cancelled.updated_at,
    )
    assert cancelled == await store.get_watch("wt_01")
    assert (None, None) == (await store.next_poll_due_at(), await store.next_deadline_at())
    assert [] == await store.claim_due_tasks(now=T0 + 100, limit=10, lease_s=LEASE)


async def test_cancelling_one_of_two_watchers_keeps_the_stream(store: Store) -> None:
    """The stream stays while another watch still watches the task."""
    await register(store, "wt_01")
    await register(store, "wt_02", callback_url=OTHER_HOOK)

    await store.cancel_watch("wt_01", now=T0 + 1)

    assert WatchState.WATCHING == (await get(store, "wt_02")).state
    claims = await store.claim_due_tasks(now=T0 + 1, limit=10, lease_s=LEASE)
    assert [TASK_A] == [c.task_id for c in claims]


async def test_cancelling_a_delivering_watch_stops_its_callback(store: Store) -> None:
    """A delivering watch can be cancelled; its callback is no longer due."""
    await register(store, "wt_01")
    await store.apply_poll_results([finish()], now=T0 + 1)

    result = await store.cancel_watch("wt_01", now=T0 + 2)

    assert result is not None
    cancelled, cancelled_now = result
    assert cancelled_now
    assert WatchState.CANCELLED == cancelled.state
    assert None is await store.next_delivery_due_at()
    assert [] == await store.claim_due_deliveries(now=T0 + 100, limit=10, lease_s=LEASE)


async def test_cancelling_a_delivering_watch_keeps_what_it_showed_beside_a_new_stream(
    store: Store,
) -> None:
    """Its task ended; another URL then watches the same task id (a new stream, not polled
    yet). Cancelling the delivering watch keeps its own status and polls, not the newcomer's."""
    await register(store, "wt_01")
    await store.claim_due_tasks(now=T0, limit=10, lease_s=LEASE)
    await store.apply_poll_results([update(next_poll_at=T0 + 2)], now=T0 + 1)
    await store.claim_due_tasks(now=T0 + 2, limit=10, lease_s=LEASE)
    await store.apply_poll_results([finish()], now=T0 + 3)
    before = await store.get_watch("wt_01")
    assert before is not None
    await register(store, "wt_02", callback_url=OTHER_HOOK, now=T0 + 4)

    result = await store.cancel_watch("wt_01", now=T0 + 5)

    assert result is not None
    cancelled, cancelled_now = result
    assert cancelled_now
    assert (WatchState.CANCELLED, before.task_status, before.polls) == (
        cancelled.state,
        cancelled.task_status,
        cancelled.polls,
    )


async def test_cancel_of_an_ended_watch_conflicts_and_of_an_unknown_one_is_none(
    store: Store,
) -> None:
    """Delivered cannot be cancelled; an unknown id gives None."""
    await delivered_watch(store, "wt_01", outcome=DeliveryOutcome.DELIVERED)

    with pytest.raises(StoreConflict):
        await store.cancel_watch("wt_01", now=T0 + 10)
    assert None is await store.cancel_watch("wt_missing", now=T0 + 10)
    assert WatchState.DELIVERED == (await get(store, "wt_01")).state


async def test_cancelling_twice_leaves_the_watch_cancelled_as_it_was(store: Store) -> None:
    """A second cancel answers the cancelled watch unchanged, and says it changed nothing."""
    await register(store, "wt_01")
    first = await store.cancel_watch("wt_01", now=T0 + 1)

    second = await store.cancel_watch("wt_01", now=T0 + 2)

    assert first is not None
    assert second is not None
    assert (first[0], True) == first
    assert (first[0], False) == second
    assert (WatchState.CANCELLED, T0 + 1) == (first[0].state, first[0].updated_at)


async def test_two_cancels_at_once_cancel_once(store: Store) -> None:
    """Concurrent cancels of one watch: exactly one of them is the one that cancelled it."""
    await register(store, "wt_01")

    results = await asyncio.gather(
        store.cancel_watch("wt_01", now=T0 + 1), store.cancel_watch("wt_01", now=T0 + 1)
    )

    assert [False, True] == sorted(r[1] for r in results if r is not None)


@pytest.mark.parametrize("outcome", [DeliveryOutcome.DELIVERED, DeliveryOutcome.GAVE_UP])
async def test_redeliver_queues_a_delivered_or_failed_callback_afresh(
    store: Store, outcome: DeliveryOutcome
) -> None:
    """Redeliver moves the watch back to delivering, attempts 0, error cleared, due now."""
    await delivered_watch(store, "wt_01", outcome=outcome)

    watch = await store.redeliver("wt_01", now=T0 + 10)

    assert watch is not None
    assert (WatchState.DELIVERING, 0, None, T0 + 10) == (
        watch.state,
        watch.delivery_attempts,
        watch.last_error,
        watch.updated_at,
    )
    assert T0 + 10 == await store.next_delivery_due_at()
    [job] = await store.claim_due_deliveries(now=T0 + 10, limit=10, lease_s=LEASE)
    assert ("wt_01", 0, EventType.SUCCESS, T0 + 1) == (
        job.watch_id,
        job.attempts,
        job.event_type,
        job.event_at,
    )


async def test_redeliver_of_an_active_watch_conflicts_and_of_an_unknown_one_is_none(
    store: Store,
) -> None:
    """Only delivered or failed watches can be redelivered."""
    await register(store, "wt_01")

    with pytest.raises(StoreConflict):
        await store.redeliver("wt_01", now=T0 + 1)
    assert None is await store.redeliver("wt_missing", now=T0 + 1)
    assert WatchState.WATCHING == (await get(store, "wt_01")).state


async def test_redeliver_works_while_a_newer_watch_of_the_pair_is_watching(store: Store) -> None:
    """Only one watching watch per pair is unique: an old one can be redelivered beside it."""
    await delivered_watch(store, "wt_01", outcome=DeliveryOutcome.DELIVERED)
    await register(store, "wt_02", now=T0 + 5)

    redelivered = await store.redeliver("wt_01", now=T0 + 6)

    assert redelivered is not None
    assert WatchState.DELIVERING == redelivered.state
    assert WatchState.WATCHING == (await get(store, "wt_02")).state
    _, created = await store.register(
        NewWatch(task_id=TASK_A, callback_url=HOOK, metadata=None),
        watch_id="wt_03",
        now=T0 + 7,
        deadline_at=T0 + HOUR,
    )
    assert not created


# --- deadlines ------------------------------------------------------------------------------------


async def test_expire_moves_watches_past_their_deadline_to_a_timeout_callback(
    store: Store,
) -> None:
    """Past-deadline watches go to delivering task.timeout, earliest first, `limit` at a time."""
    await register(store, "wt_01", TASK_A, deadline_at=T0 + 10)
    await register(store, "wt_02", TASK_A, OTHER_HOOK, deadline_at=T0 + 50)
    await register(store, "wt_03", TASK_B, deadline_at=T0 + 20)
    await register(store, "wt_04", TASK_C, deadline_at=T0 + 30)

    first = await store.expire_watches(now=T0 + 25, limit=1)
    second = await store.expire_watches(now=T0 + 25, limit=10)
    third = await store.expire_watches(now=T0 + 25, limit=10)

    assert (1, 1, 0) == (first, second, third)
    listed = await store.list_watches(state=None, task_id=None, limit=10, after=None)
    states = {w.watch_id: w.state for w in listed}
    assert {
        "wt_01": WatchState.DELIVERING,
        "wt_02": WatchState.WATCHING,
        "wt_03": WatchState.DELIVERING,
        "wt_04": WatchState.WATCHING,
    } == states
    claims = await store.claim_due_tasks(now=T0 + 25, limit=10, lease_s=LEASE)
    assert [TASK_A, TASK_C] == sorted(c.task_id for c in claims)
    jobs = await store.claim_due_deliveries(now=T0 + 25, limit=10, lease_s=LEASE)
    timeout = (EventType.TIMEOUT, None, T0 + 25)
    assert [("wt_01", *timeout), ("wt_03", *timeout)] == sorted(
        (j.watch_id, j.event_type, j.task_data, j.event_at) for j in jobs
    )


async def test_expired_watch_keeps_what_its_stream_knew(store: Store) -> None:
    """A timed-out watch shows the status and polls its dropped stream had."""
    await register(store, "wt_01", deadline_at=T0 + 10)
    await store.claim_due_tasks(now=T0, limit=10, lease_s=LEASE)
    await store.apply_poll_results([update(next_poll_at=T0 + 4, status="queued")], now=T0 + 1)

    assert 1 == await store.expire_watches(now=T0 + 10, limit=10)

    watch = await get(store, "wt_01")
    assert (WatchState.DELIVERING, "queued", 1, None) == (
        watch.state,
        watch.task_status,
        watch.polls,
        watch.next_poll_at,
    )
    assert (None, None) == (await store.next_poll_due_at(), await store.next_deadline_at())


# --- retention -----------------------------------------------------------------------------------


async def test_purge_deletes_finished_watches_changed_before_the_cutoff_oldest_first(
    store: Store,
) -> None:
    """Delivered, failed and cancelled watches go, `limit` at a time; active ones stay, and
    their streams still poll."""
    await delivered_watch(store, "wt_01", outcome=DeliveryOutcome.DELIVERED)  # changed at T0 + 2
    await register(store, "wt_02", TASK_B, now=T0 + 3)
    assert await store.cancel_watch("wt_02", now=T0 + 5) is not None
    await register(store, "wt_03", TASK_C, now=T0 + 3)  # watching
    await register(store, "wt_04", TASK_A, now=T0 + 6)  # the pair anew, watching
    await register(store, "wt_05", TASK_B, OTHER_HOOK, now=T0 + 6, deadline_at=T0 + 7)
    assert 1 == await store.expire_watches(now=T0 + 8, limit=10)  # wt_05 delivering

    assert 0 == await store.purge_finished(before=T0 + 2, limit=10)  # strictly before
    assert 1 == await store.purge_finished(before=T0 + 100, limit=1)
    assert None is await store.get_watch("wt_01")  # the oldest went first
    assert 1 == await store.purge_finished(before=T0 + 100, limit=10)
    assert 0 == await store.purge_finished(before=T0 + 100, limit=10)

    listed = await store.list_watches(state=None, task_id=None, limit=10, after=None)
    assert {
        "wt_03": WatchState.WATCHING,
        "wt_04": WatchState.WATCHING,
        "wt_05": WatchState.DELIVERING,
    } == {w.watch_id: w.state for w in listed}
    claims = await store.claim_due_tasks(now=T0 + 10, limit=10, lease_s=LEASE)
    assert [TASK_A, TASK_C] == sorted(c.task_id for c in claims)
    [job] = await store.claim_due_deliveries(now=T0 + 10, limit=10, lease_s=LEASE)
    assert "wt_05" == job.watch_id


async def test_a_redelivered_watch_is_not_purged_until_it_ends_again(store: Store) -> None:
    """Redelivery makes the watch active: it stays; once it ends again, its age counts from
    that end."""
    await delivered_watch(store, "wt_01", outcome=DeliveryOutcome.GAVE_UP)  # ended at T0 + 2
    assert await store.redeliver("wt_01", now=T0 + 50) is not None

    assert 0 == await store.purge_finished(before=T0 + 100, limit=10)
    assert WatchState.DELIVERING == (await get(store, "wt_01")).state

    await deliver_now(store, "wt_01", T0 + 60)
    ended = record("wt_01", DeliveryOutcome.DELIVERED, lease_until=T0 + 60 + LEASE)
    assert {"wt_01"} == await store.record_deliveries([ended], now=T0 + 61)
    assert 0 == await store.purge_finished(before=T0 + 61, limit=10)  # strictly before its end
    assert 1 == await store.purge_finished(before=T0 + 62, limit=10)
    assert None is await store.get_watch("wt_01")
    assert None is await store.cancel_watch("wt_01", now=T0 + 63)
    assert None is await store.redeliver("wt_01", now=T0 + 63)


# --- listing, counting, schedule ------------------------------------------------------------------


async def test_list_watches_filters_by_state_and_task_and_pages_by_id(store: Store) -> None:
    """Filters combine; pages follow watch id order strictly after the cursor."""
    await register(store, "wt_01", TASK_A)
    await register(store, "wt_02", TASK_B)
    await register(store, "wt_03", TASK_A, OTHER_HOOK)
    await register(store, "wt_04", TASK_C)
    await register(store, "wt_05", TASK_B, OTHER_HOOK)
    await store.cancel_watch("wt_03", now=T0 + 1)
    await store.apply_poll_results([finish(TASK_B)], now=T0 + 2)

    async def ids(
        state: WatchState | None = None,
        task_id: str | None = None,
        limit: int = 10,
        after: str | None = None,
    ) -> list[str]:
        found = await store.list_watches(state=state, task_id=task_id, limit=limit, after=after)
        return [w.watch_id for w in found]

    assert ["wt_01", "wt_02", "wt_03", "wt_04", "wt_05"] == await ids()
    assert ["wt_01", "wt_04"] == await ids(state=WatchState.WATCHING)
    assert ["wt_02", "wt_05"] == await ids(state=WatchState.DELIVERING)
    assert ["wt_01", "wt_03"] == await ids(task_id=TASK_A)
    assert ["wt_03"] == await ids(state=WatchState.CANCELLED, task_id=TASK_A)
    assert [] == await ids(state=WatchState.FAILED)
    assert ["wt_01", "wt_02"] == await ids(limit=2)
    assert ["wt_03", "wt_04"] == await ids(limit=2, after="wt_02")
    assert ["wt_05"] == await ids(limit=2, after="wt_04")
    assert [] == await ids(limit=2, after="wt_05")
    assert ["wt_05"] == await ids(task_id=TASK_B, after="wt_02")


async def test_list_watches_shows_the_same_view_as_get_watch(store: Store) -> None:
    """Listed watches carry their stream's fields exactly as get_watch shows them."""
    await register(store, "wt_01")
    await store.claim_due_tasks(now=T0, limit=10, lease_s=LEASE)
    await store.apply_poll_results([update(next_poll_at=T0 + 4)], now=T0 + 1)

    [listed] = await store.list_watches(state=None, task_id=None, limit=10, after=None)

    assert await store.get_watch("wt_01") == listed
    assert ("handling", 1, T0 + 4) == (listed.task_status, listed.polls, listed.next_poll_at)


async def test_count_by_state_counts_every_state(store: Store) -> None:
    """Every state is present, at zero when no watch is in it."""
    assert dict.fromkeys(WatchState, 0) == await store.count_by_state()

    await delivered_watch(store, "wt_01", outcome=DeliveryOutcome.GAVE_UP)
    await register(store, "wt_02", TASK_B)
    await register(store, "wt_03", TASK_C)
    await register(store, "wt_04", TASK_C, OTHER_HOOK)
    await store.cancel_watch("wt_04", now=T0 + 3)

    assert {
        WatchState.WATCHING: 2,
        WatchState.DELIVERING: 0,
        WatchState.DELIVERED: 0,
        WatchState.FAILED: 1,
        WatchState.CANCELLED: 1,
    } == await store.count_by_state()


async def test_next_due_times_are_none_when_empty_and_take_the_earliest(store: Store) -> None:
    """next_poll_due_at is the earliest poll, next_deadline_at the earliest deadline of a watch
    still watching, next_delivery_due_at the earliest attempt."""
    assert (None, None, None) == (
        await store.next_poll_due_at(),
        await store.next_deadline_at(),
        await store.next_delivery_due_at(),
    )

    await register(store, "wt_01", TASK_A, deadline_at=T0 + 5)
    await store.claim_due_tasks(now=T0, limit=10, lease_s=LEASE)
    assert (T0 + LEASE, T0 + 5) == (await store.next_poll_due_at(), await store.next_deadline_at())

    await register(store, "wt_02", TASK_B, now=T0 + 3)
    assert T0 + 3 == await store.next_poll_due_at()

    await store.apply_poll_results([finish(TASK_B)], now=T0 + 4)
    assert T0 + 4 == await store.next_delivery_due_at()


async def test_watch_view_shows_stream_fields_only_while_watching(store: Store) -> None:
    """next_poll_at and the stream's last error show while watching; a finish clears them."""
    await register(store, "wt_01")
    await store.claim_due_tasks(now=T0, limit=10, lease_s=LEASE)
    await store.apply_poll_results(
        [update(next_poll_at=T0 + 9, error_streak=1, last_error="upstream timed out")],
        now=T0 + 1,
    )
    watching = await get(store, "wt_01")

    await store.apply_poll_results([finish(status="success")], now=T0 + 9)
    delivering = await get(store, "wt_01")

    assert ("handling", 1, T0 + 9, "upstream timed out") == (
        watching.task_status,
        watching.polls,
        watching.next_poll_at,
        watching.last_error,
    )
    assert ("success", 2, None, None, T0 + 9) == (
        delivering.task_status,
        delivering.polls,
        delivering.next_poll_at,
        delivering.last_error,
        delivering.updated_at,
    )


async def test_released_stream_is_due_again_at_once(store: Store) -> None:
    """A stream handed back after a cut-short poll is claimable at the given time, not at lease end."""
    await register(store, "wt_1")
    [claim] = await store.claim_due_tasks(now=T0, limit=10, lease_s=LEASE)
    assert [] == await store.claim_due_tasks(now=T0 + 1, limit=10, lease_s=LEASE)
    await store.release_tasks([(claim.task_id, claim.lease_until)], due_at=T0 + 1)
    [again] = await store.claim_due_tasks(now=T0 + 1, limit=10, lease_s=LEASE)
    assert (TASK_A, T0 + 1, 0) == (again.task_id, again.due_at, again.polls)


async def test_a_late_hand_back_leaves_a_stream_another_claim_holds(store: Store) -> None:
    """A poller whose lease ran out (a paused replica) hands its stream back after another took
    it: the other's lease stands, so the stream is not polled twice at once."""
    await register(store, "wt_1")
    [stale] = await store.claim_due_tasks(now=T0, limit=10, lease_s=LEASE)
    [current] = await store.claim_due_tasks(now=T0 + LEASE, limit=10, lease_s=LEASE)

    await store.release_tasks([(stale.task_id, stale.lease_until)], due_at=T0 + LEASE + 1)

    assert [] == await store.claim_due_tasks(now=T0 + LEASE + 1, limit=10, lease_s=LEASE)
    assert current.lease_until == await store.next_poll_due_at()


async def test_deferred_callback_comes_back_without_an_attempt_counted(store: Store) -> None:
    """Deferring a claimed callback moves its due time only; a cancelled watch stays untouched."""
    await register(store, "wt_1")
    await register(store, "wt_2", callback_url=HOOK + "/2")
    await store.apply_poll_results([finish()], now=T0 + 1)
    jobs = await store.claim_due_deliveries(now=T0 + 2, limit=10, lease_s=LEASE)
    assert ["wt_1", "wt_2"] == sorted(j.watch_id for j in jobs)
    await store.cancel_watch("wt_2", now=T0 + 2)
    await store.defer_deliveries([(j.watch_id, j.lease_until) for j in jobs], due_at=T0 + 3)

    [job] = await store.claim_due_deliveries(now=T0 + 3, limit=10, lease_s=LEASE)
    assert ("wt_1", 0, T0 + 3) == (job.watch_id, job.attempts, job.due_at)
    assert WatchState.CANCELLED == (await get(store, "wt_2")).state


async def test_a_late_poll_result_leaves_a_stream_another_claim_holds(store: Store) -> None:
    """A poller paused past its lease writes its result after another took the stream: the
    other's lease (and so its schedule) stands."""
    await register(store, "wt_1")
    [stale] = await store.claim_due_tasks(now=T0, limit=10, lease_s=LEASE)
    [current] = await store.claim_due_tasks(now=T0 + LEASE, limit=10, lease_s=LEASE)

    late = update(next_poll_at=T0 + LEASE + 1, lease_until=stale.lease_until)
    await store.apply_poll_results([late], now=T0 + LEASE + 1)

    assert current.lease_until == await store.next_poll_due_at()
    assert 0 == (await get(store, "wt_1")).polls


async def test_a_late_outcome_leaves_a_callback_another_claim_holds(store: Store) -> None:
    """A deliverer paused past its lease records after another took the callback: its give-up
    changes nothing (the receiver's Retry-After, recorded by the other, stands), nor does its
    delivery (the other claim delivers again: at least once, same webhook-id)."""
    await register(store, "wt_1")
    await register(store, "wt_2", callback_url=HOOK + "/2")
    await store.apply_poll_results([finish()], now=T0 + 1)
    stale = {
        j.watch_id: j for j in await store.claim_due_deliveries(now=T0 + 2, limit=10, lease_s=LEASE)
    }
    current = {
        j.watch_id: j
        for j in await store.claim_due_deliveries(now=T0 + 2 + LEASE, limit=10, lease_s=LEASE)
    }
    ahead = record("wt_1", DeliveryOutcome.RETRY, T0 + 900, "Retry-After: 850",
                   lease_until=current["wt_1"].lease_until)  # fmt: skip
    assert {"wt_1"} == await store.record_deliveries([ahead], now=T0 + 40)

    late = [
        record(
            "wt_1", DeliveryOutcome.GAVE_UP, None, "timeout", lease_until=stale["wt_1"].lease_until
        ),
        record("wt_2", DeliveryOutcome.DELIVERED, lease_until=stale["wt_2"].lease_until),
    ]
    assert set() == await store.record_deliveries(late, now=T0 + 41)

    first = await get(store, "wt_1")
    assert (WatchState.DELIVERING, 1, "Retry-After: 850") == (
        first.state,
        first.delivery_attempts,
        first.last_error,
    )
    second = await get(store, "wt_2")
    assert (WatchState.DELIVERING, 0) == (second.state, second.delivery_attempts)


async def test_a_late_delivery_leaves_a_redelivery_queued_since(store: Store) -> None:
    """Another claimer delivered the callback, the watch was then redelivered (queued again):
    the paused claimer's late delivery does not mark it delivered, so the redelivery goes."""
    await register(store, "wt_1")
    await store.apply_poll_results([finish()], now=T0 + 1)
    [stale] = await store.claim_due_deliveries(now=T0 + 2, limit=10, lease_s=LEASE)
    [current] = await store.claim_due_deliveries(now=T0 + 2 + LEASE, limit=10, lease_s=LEASE)
    done = record("wt_1", DeliveryOutcome.DELIVERED, lease_until=current.lease_until)
    assert {"wt_1"} == await store.record_deliveries([done], now=T0 + 40)
    assert await store.redeliver("wt_1", now=T0 + 41) is not None

    late = record("wt_1", DeliveryOutcome.DELIVERED, lease_until=stale.lease_until)
    assert set() == await store.record_deliveries([late], now=T0 + 42)

    assert WatchState.DELIVERING == (await get(store, "wt_1")).state
    [again] = await store.claim_due_deliveries(now=T0 + 42, limit=10, lease_s=LEASE)
    assert "wt_1" == again.watch_id


async def test_a_late_hand_back_leaves_a_callback_another_claim_holds(store: Store) -> None:
    """A deliverer whose lease ran out hands its callback back after another took it: the
    other's lease stands (no second attempt at once), and a recorded attempt's next time too."""
    await register(store, "wt_1")
    await register(store, "wt_2", callback_url=HOOK + "/2")
    await store.apply_poll_results([finish()], now=T0 + 1)
    stale = await store.claim_due_deliveries(now=T0 + 2, limit=10, lease_s=LEASE)
    current = await store.claim_due_deliveries(now=T0 + 2 + LEASE, limit=10, lease_s=LEASE)
    by_id = {j.watch_id: j for j in current}
    await store.record_deliveries(
        [
            record(
                "wt_2",
                DeliveryOutcome.RETRY,
                T0 + 1000,
                "Retry-After: 900",
                lease_until=by_id["wt_2"].lease_until,
            )
        ],
        now=T0 + 40,
    )

    await store.defer_deliveries([(j.watch_id, j.lease_until) for j in stale], due_at=T0 + 41)

    assert [] == await store.claim_due_deliveries(now=T0 + 41, limit=10, lease_s=LEASE)
    assert by_id["wt_1"].lease_until == await store.next_delivery_due_at()
    # wt_1 comes back when the current lease ends; wt_2 keeps the receiver's Retry-After.
    late = await store.claim_due_deliveries(now=T0 + 999, limit=10, lease_s=LEASE)
    assert ["wt_1"] == [j.watch_id for j in late]


async def test_hastened_callbacks_are_due_at_once_unless_their_due_time_moved_since(
    store: Store,
) -> None:
    """Only callbacks still at the deferral they were parked at come forward: one claimed again
    meanwhile (its due time is now its lease) keeps its lease."""
    for n in (1, 2):
        await register(store, f"wt_{n}", callback_url=f"{HOOK}/{n}")
    await store.apply_poll_results([finish()], now=T0 + 1)
    claimed = await store.claim_due_deliveries(now=T0 + 2, limit=10, lease_s=LEASE)
    await store.defer_deliveries([(j.watch_id, j.lease_until) for j in claimed], due_at=T0 + 3)
    [reclaimed] = await store.claim_due_deliveries(now=T0 + 3, limit=1, lease_s=LEASE)

    await store.hasten_deliveries(["wt_1", "wt_2"], deferred_to=T0 + 3, due_at=T0 + 2.5)

    [hastened] = await store.claim_due_deliveries(now=T0 + 2.5, limit=10, lease_s=LEASE)
    assert {"wt_1", "wt_2"} == {reclaimed.watch_id, hastened.watch_id}
    assert (0, T0 + 2.5) == (hastened.attempts, hastened.due_at)
    assert [] == await store.claim_due_deliveries(now=T0 + 3 + LEASE - 1, limit=10, lease_s=LEASE)


# --- PostgreSQL only ------------------------------------------------------------------------------


@pytest.fixture
def pair_schema(schemas: Schemas) -> str:
    return schemas(f"pair_{secrets.token_hex(3)}")


@pytest.fixture
async def pg_pair(pg_dsn: str, pair_schema: str) -> AsyncIterator[tuple[PostgresStore, ...]]:
    """Two stores (two replicas) on one fresh schema."""
    schema = pair_schema
    stores = (PostgresStore(pg_dsn, schema=schema), PostgresStore(pg_dsn, schema=schema))
    for opened in stores:
        await opened.open()
    yield stores
    for opened in stores:
        await opened.close()


async def test_a_cancel_that_loses_its_watch_to_the_sweep_finds_none(
    pg_pair: tuple[PostgresStore, ...], pg_dsn: str, pair_schema: str
) -> None:
    """cancel_watch reads the watch's task, locks the task's stream, then locks the watch: a
    sweep (or any delete) between the first read and the lock leaves no row. It answers None
    (404), not an error (a 500)."""
    first, _ = pg_pair
    await register(first, "wt_01")
    other = await asyncpg.connect(pg_dsn)
    try:
        await other.execute(f'SET search_path TO "{pair_schema}"')
        holding = other.transaction()
        await holding.start()
        await other.execute("SELECT 1 FROM tasks WHERE task_id = $1 FOR UPDATE", TASK_A)
        cancel = asyncio.create_task(first.cancel_watch("wt_01", now=T0 + 1))

        async def cancel_waits_for_the_stream() -> bool:
            waiting = await other.fetchval(  # backends that wait for this connection's locks
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))"
            )
            return bool(waiting)

        assert await settle(cancel_waits_for_the_stream, True)
        await other.execute("DELETE FROM watches WHERE watch_id = 'wt_01'")
        await holding.commit()
        assert None is await asyncio.wait_for(cancel, 10)
    finally:
        await other.close()


async def test_concurrent_claimers_never_get_the_same_stream(
    pg_pair: tuple[PostgresStore, ...],
) -> None:
    """Four claims at once from two replicas over 200 due streams split them with no overlap."""
    first, second = pg_pair
    task_ids = [f"tk-hiapi-{n:03d}" for n in range(200)]
    for n, task_id in enumerate(task_ids):
        await register(first, f"wt_{n:03d}", task_id)

    for round_ in range(5):
        now = T0 + round_ * (LEASE + 1)
        batches = await asyncio.gather(
            *(s.claim_due_tasks(now=now, limit=50, lease_s=LEASE) for s in (*pg_pair, *pg_pair))
        )
        claimed = [c.task_id for batch in batches for c in batch]
        assert sorted(task_ids) == sorted(claimed), f"round {round_}"
        assert [50, 50, 50, 50] == [len(b) for b in batches]
    assert [] == await second.claim_due_tasks(now=now, limit=50, lease_s=LEASE)


async def test_heartbeats_count_live_replicas_and_forget_stale_and_retired_ones(
    pg_pair: tuple[PostgresStore, ...],
) -> None:
    """Two beating replicas count 2; a silent one drops out after the stale window; retire is at once."""
    first, second = pg_pair
    assert 1 == await first.heartbeat("a", now=T0, stale_after_s=15.0)
    assert 2 == await second.heartbeat("b", now=T0 + 1, stale_after_s=15.0)
    assert 2 == await first.heartbeat("a", now=T0 + 15, stale_after_s=15.0)
    assert 1 == await first.heartbeat("a", now=T0 + 17, stale_after_s=15.0)  # b went silent
    assert 2 == await second.heartbeat("b", now=T0 + 18, stale_after_s=15.0)
    await second.retire("b")
    assert 1 == await first.heartbeat("a", now=T0 + 19, stale_after_s=15.0)


async def test_registration_on_one_replica_wakes_the_other(
    pg_pair: tuple[PostgresStore, ...],
) -> None:
    """A watch registered through one store NOTIFYs a listener on the other at commit."""
    first, second = pg_pair
    stopping = asyncio.Event()
    wakes: list[int] = []
    woken = asyncio.Event()

    def wake() -> None:
        wakes.append(1)
        woken.set()

    listener = asyncio.create_task(second.listen_registrations(wake, stopping))
    await asyncio.wait_for(woken.wait(), 10)  # the first wake comes once it listens
    woken.clear()
    await register(first, "wt_notify", "tk-hiapi-notify")
    await asyncio.wait_for(woken.wait(), 10)
    stopping.set()
    await asyncio.wait_for(listener, 10)
    assert 2 == len(wakes)


async def test_sqlite_store_is_always_a_single_replica(tmp_path: Path) -> None:
    """SQLite serves one process: its heartbeat always counts one replica."""
    store = SQLiteStore(str(tmp_path / "relay.db"))
    await store.open()
    try:
        assert 1 == await store.heartbeat("a", now=T0, stale_after_s=15.0)
        assert 1 == await store.heartbeat("b", now=T0, stale_after_s=15.0)
    finally:
        await store.close()


async def test_concurrent_registrations_of_one_pair_make_one_watch(
    pg_pair: tuple[PostgresStore, ...],
) -> None:
    """Replicas registering the same pair at once: one creates, all answer that watch."""
    results = await asyncio.gather(
        *(
            pg_pair[n % 2].register(
                NewWatch(task_id=TASK_A, callback_url=HOOK, metadata=None),
                watch_id=f"wt_{n:02d}",
                now=T0,
                deadline_at=T0 + HOUR,
            )
            for n in range(10)
        )
    )

    assert 1 == sum(created for _, created in results)
    assert 1 == len({watch.watch_id for watch, _ in results})
    assert 1 == (await pg_pair[0].count_by_state())[WatchState.WATCHING]


async def test_registrations_racing_finishes_cancels_and_expiries_never_orphan_a_watch(
    pg_pair: tuple[PostgresStore, ...], pg_dsn: str, pair_schema: str
) -> None:
    """A watch registered while another replica ends its task's stream is still polled."""
    first, second = pg_pair
    other = NewWatch(task_id="", callback_url=OTHER_HOOK, metadata=None)

    async def join(task_id: str, watch_id: str) -> None:
        await second.register(
            dataclasses.replace(other, task_id=task_id),
            watch_id=watch_id,
            now=T0,
            deadline_at=T0 + HOUR,
        )

    for n in range(40):
        for kind in ("finish", "cancel", "expire"):
            task_id = f"tk-hiapi-{kind}-{n:03d}"
            watch_id = f"wt_{n:03d}_{kind}"
            await register(first, watch_id, task_id, deadline_at=T0 + 1)
            if kind == "finish":
                end = first.apply_poll_results([finish(task_id)], now=T0 + 1)
            elif kind == "cancel":
                end = first.cancel_watch(watch_id, now=T0 + 1)
            else:
                end = first.expire_watches(now=T0 + 1, limit=1)
            await asyncio.gather(end, join(task_id, f"{watch_id}_join"))

    conn = await asyncpg.connect(pg_dsn)
    try:
        orphans = await conn.fetch(
            f'SELECT w.watch_id FROM "{pair_schema}".watches w WHERE w.state = $1'
            f' AND NOT EXISTS (SELECT 1 FROM "{pair_schema}".tasks t WHERE t.task_id = w.task_id)',
            WatchState.WATCHING.value,
        )
    finally:
        await conn.close()
    assert [] == [r["watch_id"] for r in orphans]


async def test_replicas_starting_at_once_migrate_without_error(
    pg_dsn: str, schemas: Schemas
) -> None:
    """Three stores opening together on a new schema apply each migration exactly once."""
    schema = schemas("migrate")
    stores = [PostgresStore(pg_dsn, schema=schema) for _ in range(3)]

    await asyncio.gather(*(s.open() for s in stores))
    try:
        for opened in stores:
            assert 0 == sum((await opened.count_by_state()).values())
        conn = await asyncpg.connect(pg_dsn)
        try:
            versions = await conn.fetch(
                f'SELECT version FROM "{schema}".relay_schema_migrations ORDER BY version'
            )
        finally:
            await conn.close()
        assert list(range(1, len(MIGRATIONS) + 1)) == [r["version"] for r in versions]
    finally:
        for opened in stores:
            await opened.close()


@pytest.mark.parametrize("scheme", ["postgresql://", "postgres://"])
async def test_open_store_opens_postgres_for_its_urls(
    pg_dsn: str, schemas: Schemas, scheme: str
) -> None:
    """Both PostgreSQL URL schemes open a migrated PostgresStore."""
    url = scheme + pg_dsn.split("://", 1)[1]

    opened = await open_store(url, postgres_schema=schemas("open_store"))
    try:
        assert isinstance(opened, PostgresStore)
        await opened.ping()
        assert 0 == sum((await opened.count_by_state()).values())
    finally:
        await opened.close()


async def test_unreachable_database_is_unavailable_without_echoing_the_password() -> None:
    """A refused connection raises StoreUnavailable whose message never holds the password."""
    store = PostgresStore(
        "postgresql://relay:s3cret-pw@127.0.0.1:1/relay", schema="relay", connect_timeout_s=5
    )

    with pytest.raises(StoreUnavailable) as caught:
        await store.open()

    assert "s3cret-pw" not in str(caught.value)
    with pytest.raises(StoreUnavailable):
        await store.ping()


async def test_the_longest_schema_name_accepted_still_registers(
    pg_dsn: str, pg_prefix: str, schemas: Schemas
) -> None:
    """A 63-character schema: its LISTEN/NOTIFY channel would pass PostgreSQL's 63-byte limit,
    so it is a digest; registrations go through and still wake a listening replica."""
    schema = schemas("s" * (62 - len(pg_prefix)))
    assert 63 == len(schema)
    store = PostgresStore(pg_dsn, schema=schema)
    await store.open()
    stopping = asyncio.Event()
    woken = asyncio.Event()
    listener = asyncio.create_task(store.listen_registrations(woken.set, stopping))
    try:
        await asyncio.wait_for(woken.wait(), 10)  # the first wake comes once it listens
        woken.clear()
        await register(store, "wt_01")
        await asyncio.wait_for(woken.wait(), 10)
    finally:
        stopping.set()
        await asyncio.wait_for(listener, 10)
        await store.close()


async def test_a_read_only_database_is_not_ready(pg_dsn: str, schemas: Schemas) -> None:
    """A standby after a failover (here: sessions read-only by default) answers SELECT 1 but
    refuses every registration: /readyz must say so."""
    schema = schemas("readonly")
    writable = PostgresStore(pg_dsn, schema=schema)
    await writable.open()
    await writable.ping()
    await writable.close()
    separator = "&" if "?" in pg_dsn else "?"
    read_only = PostgresStore(f"{pg_dsn}{separator}default_transaction_read_only=on", schema=schema)
    await read_only.open()
    try:
        with pytest.raises(StoreUnavailable, match="read-only"):
            await read_only.ping()
    finally:
        await read_only.close()


async def test_a_closed_sqlite_store_is_unavailable_every_time(tmp_path: Path) -> None:
    """After close, calls raise StoreUnavailable, the second write as the first (it once
    waited forever behind a flush that could not be scheduled); a write made before close
    is committed."""
    store = SQLiteStore(str(tmp_path / "relay.db"))
    await store.open()
    before_close = asyncio.ensure_future(register(store, "wt_01"))
    await asyncio.sleep(0)  # queued for the writer
    await store.close()
    await before_close
    for _ in range(2):
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(store.ping(), 5)
    with pytest.raises(StoreUnavailable):
        await store.get_watch("wt_01")
    await store.close()  # a second close is harmless

    reopened = SQLiteStore(str(tmp_path / "relay.db"))
    await reopened.open()
    try:
        assert WatchState.WATCHING == (await get(reopened, "wt_01")).state
    finally:
        await reopened.close()


async def test_closed_store_is_unavailable(pg_dsn: str, schemas: Schemas) -> None:
    """After close, calls raise StoreUnavailable rather than anything else."""
    store = PostgresStore(pg_dsn, schema=schemas("contract"))
    await store.open()
    await store.close()

    with pytest.raises(StoreUnavailable):
        await store.ping()
