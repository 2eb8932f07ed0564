"""Row <-> record conversions both stores share (their SELECTs list the same columns in order)."""

from __future__ import annotations

from typing import Any, Protocol

from relay import jsondata
from relay.models import (
    DeliveryJob,
    DeliveryOutcome,
    DeliveryRecord,
    EventType,
    NewWatch,
    TaskClaim,
    TaskUpdate,
    Watch,
    WatchState,
)

# JSON is stored as the text of jsondata's bytes (orjson's, every integer exact): it keeps key
# order and every value, so a callback carries the upstream data verbatim (PostgreSQL's jsonb
# would reorder keys).


def dumps_or_none(value: Any) -> str | None:
    return None if value is None else jsondata.dumps(value).decode()


def loads_or_none(value: str | None) -> Any:
    return None if value is None else jsondata.loads(value)


class Row(Protocol):
    """A result row: an sqlite3 tuple or an asyncpg Record."""

    def __getitem__(self, index: int, /) -> Any: ...


def watch_from_row(row: Row) -> Watch:
    """A Watch from the stores' watch SELECT: id, task, url, metadata, state, created, updated,
    deadline, task status, polls, next poll, delivery attempts, last error."""
    return Watch(
        watch_id=row[0],
        task_id=row[1],
        callback_url=row[2],
        metadata=loads_or_none(row[3]),
        state=WatchState(row[4]),
        created_at=row[5],
        updated_at=row[6],
        deadline_at=row[7],
        task_status=row[8],
        polls=row[9],
        next_poll_at=row[10],
        delivery_attempts=row[11],
        last_error=row[12],
    )


def fresh_watch(new: NewWatch, *, watch_id: str, now: float, deadline_at: float) -> Watch:
    """What a store reads back for a watch it just created on a new poll stream, without the
    read: nothing polled yet, the first poll due at once."""
    return Watch(
        watch_id=watch_id,
        task_id=new.task_id,
        callback_url=new.callback_url,
        metadata=new.metadata,
        state=WatchState.WATCHING,
        created_at=now,
        updated_at=now,
        deadline_at=deadline_at,
        task_status=None,
        polls=0,
        next_poll_at=now,
        delivery_attempts=0,
        last_error=None,
    )


# A watch's state after an attempt with each outcome.
_STATE_AFTER = {
    DeliveryOutcome.DELIVERED: WatchState.DELIVERED,
    DeliveryOutcome.RETRY: WatchState.DELIVERING,
    DeliveryOutcome.GAVE_UP: WatchState.FAILED,
}


def delivery_record_params(record: DeliveryRecord, now: float) -> tuple[Any, ...]:
    """Parameters of both stores' delivery-record statement: new state, next attempt, last
    error, updated at, watch id, the claim's lease."""
    return (
        _STATE_AFTER[record.outcome].value,
        record.next_attempt_at,
        record.last_error,
        now,
        record.watch_id,
        record.lease_until,
    )


def task_update_params(update: TaskUpdate, now: float) -> tuple[Any, ...]:
    """Parameters of both stores' task-update statement: status, next poll, interval, error
    streak, first not-found, last error, updated at, task id, the claim's lease."""
    return (
        update.status,
        update.next_poll_at,
        update.interval,
        update.error_streak,
        update.first_not_found_at,
        update.last_error,
        now,
        update.task_id,
        update.lease_until,
    )


def claim_from_row(row: Row, lease_until: float) -> TaskClaim:
    """A TaskClaim from the stores' claim: task id, polls, interval, error streak, first
    not-found, and the due time before the claim moved it to `lease_until`."""
    return TaskClaim(
        task_id=row[0],
        polls=row[1],
        interval=row[2],
        error_streak=row[3],
        first_not_found_at=row[4],
        due_at=row[5],
        lease_until=lease_until,
    )


def job_from_row(row: Row, lease_until: float) -> DeliveryJob:
    """A DeliveryJob from the stores' delivery claim: watch, task, url, metadata, event type,
    task data, event time, attempts, and the due time before the claim moved it."""
    return DeliveryJob(
        watch_id=row[0],
        task_id=row[1],
        callback_url=row[2],
        metadata=loads_or_none(row[3]),
        event_type=EventType(row[4]),
        task_data=loads_or_none(row[5]),
        event_at=row[6],
        attempts=row[7],
        due_at=row[8],
        lease_until=lease_until,
    )
